"""judge batches: a phase's judgments sent as one OpenAI Batch API job (cai judge --batch)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 01:20:45.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "judge_batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("judge_id", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("base_url", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("remote_id", sa.String(length=128), nullable=True),
        sa.Column("input_file_id", sa.String(length=128), nullable=True),
        sa.Column("remote_status", sa.String(length=32), nullable=True),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("answered", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("released", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('submitting', 'submitted', 'ingested')", name=op.f("ck_judge_batches_status")
        ),
        sa.ForeignKeyConstraint(["judge_id"], ["judges.id"], name=op.f("fk_judge_batches_judge_id_judges")),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"], name=op.f("fk_judge_batches_round_id_rounds"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_judge_batches")),
        sa.UniqueConstraint("remote_id", name=op.f("uq_judge_batches_remote_id")),
    )
    op.create_index("ix_judge_batches_round_judge", "judge_batches", ["round_id", "judge_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_judge_batches_round_judge", table_name="judge_batches")
    op.drop_table("judge_batches")
