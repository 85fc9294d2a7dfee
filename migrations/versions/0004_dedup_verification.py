"""Dedup verifies candidate pairs below its threshold geometrically: each kept pair says whether it was
verified, each run how many pairs it checked and how many verified.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("duplicate_pairs") as batch:
        batch.add_column(sa.Column("verified", sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table("dedup_runs") as batch:
        batch.add_column(sa.Column("n_verify_checked", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("n_verified", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dedup_runs") as batch:
        batch.drop_column("n_verified")
        batch.drop_column("n_verify_checked")
    with op.batch_alter_table("duplicate_pairs") as batch:
        batch.drop_column("verified")
