"""revision chains (SL-CAI) and SFT runs: round kinds, the revising statuses, revision steps

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 11:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = (
    "created", "generating", "generated", "judging", "judged", "exported",
    "training", "trained", "evaluating", "done", "failed",
)  # fmt: skip
NEW_STATUSES = ("created", "revising", "revised", *OLD_STATUSES[1:])
OLD_KINDS = ("generate", "judge", "export", "train", "eval", "calibrate", "loop")
NEW_KINDS = (*OLD_KINDS, "revise", "sft")


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def upgrade() -> None:
    # Batch mode: SQLite changes a CHECK constraint only by copying the table.
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=8), server_default="rl", nullable=False))
        batch_op.drop_constraint(op.f("ck_rounds_status"), type_="check")
        batch_op.create_check_constraint("status", _in("status", NEW_STATUSES))
        batch_op.create_check_constraint("kind", _in("kind", ("rl", "sl")))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_jobs_kind"), type_="check")
        batch_op.create_check_constraint("kind", _in("kind", NEW_KINDS))
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("method", sa.String(length=8), server_default="dpo", nullable=False))
    op.create_table(
        "revision_steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("principle_id", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=8), nullable=False),
        sa.Column("source_response_id", sa.Integer(), nullable=True),
        sa.Column("revision_response_id", sa.Integer(), nullable=True),
        sa.Column("critique", sa.Text(), nullable=True),
        sa.Column("reviser_model", sa.Text(), nullable=True),
        sa.Column("template_sha256", sa.String(length=64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('pending', 'done', 'failed')", name=op.f("ck_revision_steps_status")),
        sa.CheckConstraint("step >= 1", name=op.f("ck_revision_steps_step")),
        sa.ForeignKeyConstraint(
            ["principle_id"], ["principles.id"], name=op.f("fk_revision_steps_principle_id_principles")
        ),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name=op.f("fk_revision_steps_prompt_id_prompts")
        ),
        sa.ForeignKeyConstraint(
            ["revision_response_id"],
            ["responses.id"],
            name=op.f("fk_revision_steps_revision_response_id_responses"),
        ),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"], name=op.f("fk_revision_steps_round_id_rounds"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["source_response_id"],
            ["responses.id"],
            name=op.f("fk_revision_steps_source_response_id_responses"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_revision_steps")),
        sa.UniqueConstraint(
            "round_id", "prompt_id", "step", name=op.f("uq_revision_steps_round_id_prompt_id_step")
        ),
    )
    op.create_index("ix_revision_steps_round_status", "revision_steps", ["round_id", "status"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_revision_steps_round_status", table_name="revision_steps")
    op.drop_table("revision_steps")
    op.execute("DELETE FROM jobs WHERE kind IN ('revise', 'sft')")
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_column("method")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_jobs_kind"), type_="check")
        batch_op.create_check_constraint("kind", _in("kind", OLD_KINDS))
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_rounds_kind"), type_="check")
        batch_op.drop_constraint(op.f("ck_rounds_status"), type_="check")
        batch_op.drop_column("kind")
        batch_op.create_check_constraint("status", _in("status", OLD_STATUSES))
