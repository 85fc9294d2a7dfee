"""A dedup run keeps the number of false pairs its threshold lets through, expected from the model's
per-pair false-match rate and the catalogue's size.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("dedup_runs") as batch:
        batch.add_column(sa.Column("expected_false_pairs", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dedup_runs") as batch:
        batch.drop_column("expected_false_pairs")
