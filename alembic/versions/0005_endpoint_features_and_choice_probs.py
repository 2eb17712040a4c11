"""endpoint features per judge, verdict probabilities per judgment

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 15:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("judges") as batch:
        batch.add_column(sa.Column("endpoint_features", sa.JSON(), nullable=True))
    with op.batch_alter_table("judgments") as batch:
        batch.add_column(sa.Column("choice_probs", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("judgments") as batch:
        batch.drop_column("choice_probs")
    with op.batch_alter_table("judges") as batch:
        batch.drop_column("endpoint_features")
