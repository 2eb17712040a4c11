"""score and revise modes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 12:50:52.339549
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("judgments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("response_id", sa.Integer(), nullable=True))
        batch_op.alter_column("pair_id", existing_type=sa.INTEGER(), nullable=True)
        batch_op.create_index(batch_op.f("ix_judgments_response_id"), ["response_id"], unique=False)
        batch_op.create_unique_constraint(
            batch_op.f("uq_judgments_response_id_principle_id_judge_id"),
            ["response_id", "principle_id", "judge_id"],
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_judgments_response_id_responses"),
            "responses",
            ["response_id"],
            ["id"],
            ondelete="CASCADE",
        )
        batch_op.create_check_constraint(
            op.f("ck_judgments_one_subject"), "(pair_id IS NULL) <> (response_id IS NULL)"
        )

    with op.batch_alter_table("pairs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), server_default="sample", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("pairs", schema=None) as batch_op:
        batch_op.drop_column("kind")

    with op.batch_alter_table("judgments", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_judgments_one_subject"), type_="check")
        batch_op.drop_constraint(batch_op.f("fk_judgments_response_id_responses"), type_="foreignkey")
        batch_op.drop_constraint(batch_op.f("uq_judgments_response_id_principle_id_judge_id"), type_="unique")
        batch_op.drop_index(batch_op.f("ix_judgments_response_id"))
        batch_op.alter_column("pair_id", existing_type=sa.INTEGER(), nullable=False)
        batch_op.drop_column("response_id")
