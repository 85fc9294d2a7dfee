"""Initial catalogue schema: items, index generations, dedup results, calibrations, reviews.

Revision ID: 0001
Revises:
Create Date: 2025-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(2048), nullable=False),
        sa.Column("origin", sa.String(2048), nullable=False),
        sa.Column("listing", sa.String(512), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("mtime_ns", sa.BigInteger(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.Column("model_key", sa.String(64), nullable=True),
        sa.Column("embedded_version", sa.BigInteger(), nullable=True),
        sa.Column("added_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_items"),
        sa.UniqueConstraint("source", name="uq_items_source"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_items_origin", "items", ["origin"])
    op.create_index("ix_items_listing", "items", ["listing"])
    op.create_index("ix_items_sha256", "items", ["sha256"])

    state = op.create_table(
        "catalogue_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_catalogue_state"),
    )
    op.bulk_insert(state, [{"id": 1, "version": 0}])

    op.create_table(
        "index_generations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("finished_at", TZ, nullable=True),
        sa.Column("catalogue_version", sa.BigInteger(), nullable=False),
        sa.Column("model_key", sa.String(64), nullable=False),
        sa.Column("metric", sa.String(8), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("factory", sa.String(256), nullable=False),
        sa.Column("ntotal", sa.Integer(), nullable=False),
        sa.Column("filename", sa.String(256), nullable=False),
        sa.Column("n_added", sa.Integer(), nullable=False),
        sa.Column("n_updated", sa.Integer(), nullable=False),
        sa.Column("n_removed", sa.Integer(), nullable=False),
        sa.Column("n_exact_duplicates", sa.Integer(), nullable=False),
        sa.Column("n_skipped", sa.Integer(), nullable=False),
        sa.CheckConstraint("status IN ('building', 'complete')", name="ck_index_generations_status"),
        sa.PrimaryKeyConstraint("id", name="pk_index_generations"),
    )

    op.create_table(
        "dedup_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("generation_id", sa.Integer(), nullable=True),
        sa.Column("model_key", sa.String(64), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("threshold_source", sa.String(16), nullable=False),
        sa.Column("precision_target", sa.Float(), nullable=True),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("n_items", sa.Integer(), nullable=False),
        sa.Column("n_candidates", sa.Integer(), nullable=False),
        sa.Column("n_pairs", sa.Integer(), nullable=False),
        sa.Column("n_groups", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["generation_id"], ["index_generations.id"], name="fk_dedup_runs_generation_id_index_generations", ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name="pk_dedup_runs"),
    )

    op.create_table(
        "duplicate_groups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("n_listings", sa.Integer(), nullable=False),
        sa.Column("max_score", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["dedup_runs.id"], name="fk_duplicate_groups_run_id_dedup_runs", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_duplicate_groups"),
    )
    op.create_index("ix_duplicate_groups_run_id", "duplicate_groups", ["run_id"])

    op.create_table(
        "duplicate_pairs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("item_a_id", sa.Integer(), nullable=False),
        sa.Column("item_b_id", sa.Integer(), nullable=False),
        sa.Column("index_similarity", sa.Float(), nullable=False),
        sa.Column("head_score", sa.Float(), nullable=False),
        sa.Column("exact", sa.Boolean(), nullable=False),
        sa.CheckConstraint("item_a_id < item_b_id", name="ck_duplicate_pairs_ordered"),
        sa.ForeignKeyConstraint(["run_id"], ["dedup_runs.id"], name="fk_duplicate_pairs_run_id_dedup_runs", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["group_id"], ["duplicate_groups.id"], name="fk_duplicate_pairs_group_id_duplicate_groups", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["item_a_id"], ["items.id"], name="fk_duplicate_pairs_item_a_id_items", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["item_b_id"], ["items.id"], name="fk_duplicate_pairs_item_b_id_items", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_duplicate_pairs"),
        sa.UniqueConstraint("run_id", "item_a_id", "item_b_id", name="uq_duplicate_pairs_run_id_item_a_id_item_b_id"),
    )
    op.create_index("ix_duplicate_pairs_group_id", "duplicate_pairs", ["group_id"])
    op.create_index("ix_duplicate_pairs_item_a_id", "duplicate_pairs", ["item_a_id"])
    op.create_index("ix_duplicate_pairs_item_b_id", "duplicate_pairs", ["item_b_id"])

    op.create_table(
        "dedup_calibrations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("model_key", sa.String(64), nullable=False),
        sa.Column("precision_target", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("n_pairs", sa.Integer(), nullable=False),
        sa.Column("n_positive", sa.Integer(), nullable=False),
        sa.Column("recall", sa.Float(), nullable=False),
        sa.Column("labels", sa.String(2048), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_dedup_calibrations"),
    )
    op.create_index("ix_dedup_calibrations_model_key", "dedup_calibrations", ["model_key"])

    op.create_table(
        "match_reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("item_a_id", sa.Integer(), nullable=False),
        sa.Column("item_b_id", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("reviewer", sa.String(256), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.CheckConstraint("decision IN ('accept', 'reject')", name="ck_match_reviews_decision"),
        sa.CheckConstraint("item_a_id < item_b_id", name="ck_match_reviews_ordered"),
        sa.ForeignKeyConstraint(["item_a_id"], ["items.id"], name="fk_match_reviews_item_a_id_items", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["item_b_id"], ["items.id"], name="fk_match_reviews_item_b_id_items", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_match_reviews"),
    )
    op.create_index("ix_match_reviews_item_a_id", "match_reviews", ["item_a_id"])
    op.create_index("ix_match_reviews_item_b_id", "match_reviews", ["item_b_id"])


def downgrade() -> None:
    op.drop_table("match_reviews")
    op.drop_table("dedup_calibrations")
    op.drop_table("duplicate_pairs")
    op.drop_table("duplicate_groups")
    op.drop_table("dedup_runs")
    op.drop_table("index_generations")
    op.drop_table("catalogue_state")
    op.drop_table("items")
