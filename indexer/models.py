"""The catalogue's tables as SQLAlchemy 2 typed ORM classes.

The schema itself is created only by the Alembic migrations in ``migrations/`` (which must match
these classes; ``tests/indexer/test_db.py`` compares them). The database is the source of truth:
each embedded item names the vector shard (``indexer.vectors``) that holds its embedding, from which the
FAISS file can always be rebuilt, and the head's description of it.

* ``items`` — one image of the catalogue; ``id`` is also its FAISS id.
* ``catalogue_state`` — one row whose ``version`` grows with every committed change to the items;
  an index generation records the version it was built from, so a stale FAISS file is detected.
* ``index_generations`` — each saved FAISS index (file name, factory, size, run counts).
* ``dedup_runs`` / ``duplicate_groups`` / ``duplicate_pairs`` — results of ``whymatch dedup``.
* ``dedup_calibrations`` — thresholds calibrated for a precision target, per model.
* ``match_reviews`` — a person's accept/reject decision on a pair.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal, get_args

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Decision = Literal["accept", "reject"]
DECISIONS: tuple[Decision, ...] = get_args(Decision)

# A pair's status is its newest review's decision (none: unreviewed); lists of pairs filter by one, or "all".
PairStatus = Literal["unreviewed", "accepted", "rejected"]
ReviewStatus = Literal[PairStatus, "all"]
REVIEW_STATUSES: tuple[ReviewStatus, ...] = get_args(ReviewStatus)
STATUS_OF_DECISION: dict[Decision | None, PairStatus] = {None: "unreviewed", "accept": "accepted", "reject": "rejected"}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime) -> datetime:
    """A stored time in UTC: SQLite hands it back without its zone, PostgreSQL in the session's."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Item(Base):
    """One catalogue image. ``shard`` is NULL until the file has been embedded by ``model_key``."""

    __tablename__ = "items"
    # AUTOINCREMENT on SQLite: ids of deleted rows are never reused, so an id in an older FAISS
    # file can never point at a different image.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(2048), unique=True)
    origin: Mapped[str] = mapped_column(String(2048), index=True)
    listing: Mapped[str | None] = mapped_column(String(512), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    # The vector shard (``indexer.vectors``) holding the item's embedding and the head's description of it
    # (re-scoring and explanations need neither the file nor the backbone); NULL until embedded.
    shard: Mapped[str | None] = mapped_column(String(64), index=True)
    model_key: Mapped[str | None] = mapped_column(String(64))
    # Catalogue version of the transaction that wrote the embedding: an index generation built at
    # version v holds exactly the embeddings with embedded_version <= v.
    embedded_version: Mapped[int | None] = mapped_column(BigInteger)
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    def __repr__(self) -> str:
        return f"Item(id={self.id}, source={self.source!r}, listing={self.listing!r})"


class CatalogueState(Base):
    """A single row (id 1): ``version`` is bumped in every transaction that changes ``items``."""

    __tablename__ = "catalogue_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0)


class IndexGeneration(Base):
    """A FAISS index file; only ``status == 'complete'`` generations are ever loaded."""

    __tablename__ = "index_generations"
    __table_args__ = (CheckConstraint("status IN ('building', 'complete')", name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="building")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    catalogue_version: Mapped[int] = mapped_column(BigInteger)
    model_key: Mapped[str] = mapped_column(String(64))
    metric: Mapped[str] = mapped_column(String(8))
    dim: Mapped[int] = mapped_column(Integer)
    factory: Mapped[str] = mapped_column(String(256))
    ntotal: Mapped[int] = mapped_column(Integer, default=0)
    filename: Mapped[str] = mapped_column(String(256))
    n_added: Mapped[int] = mapped_column(Integer, default=0)
    n_updated: Mapped[int] = mapped_column(Integer, default=0)
    n_removed: Mapped[int] = mapped_column(Integer, default=0)
    n_exact_duplicates: Mapped[int] = mapped_column(Integer, default=0)
    n_skipped: Mapped[int] = mapped_column(Integer, default=0)


class DedupRun(Base):
    """One ``whymatch dedup``: how pairs were found and which threshold kept them."""

    __tablename__ = "dedup_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    generation_id: Mapped[int | None] = mapped_column(ForeignKey("index_generations.id", ondelete="SET NULL"))
    model_key: Mapped[str] = mapped_column(String(64))
    threshold: Mapped[float] = mapped_column(Float)
    threshold_source: Mapped[str] = mapped_column(String(16))
    precision_target: Mapped[float | None] = mapped_column(Float)
    k: Mapped[int] = mapped_column(Integer)
    n_items: Mapped[int] = mapped_column(Integer, default=0)
    n_candidates: Mapped[int] = mapped_column(Integer, default=0)
    n_pairs: Mapped[int] = mapped_column(Integer, default=0)
    n_groups: Mapped[int] = mapped_column(Integer, default=0)
    # False pairs expected at the threshold: the model's per-pair false-match rate × the catalogue's pairs.
    expected_false_pairs: Mapped[float | None] = mapped_column(Float)
    # Candidate pairs below the threshold checked geometrically, and how many of them verified (None: not checked).
    n_verify_checked: Mapped[int | None] = mapped_column(Integer)
    n_verified: Mapped[int | None] = mapped_column(Integer)

    groups: Mapped[list[DuplicateGroup]] = relationship(back_populates="run", cascade="all, delete-orphan", passive_deletes=True)


class DuplicateGroup(Base):
    """A group of kept pairs that cannot chain (``indexer.dedup.anchored_groups``)."""

    __tablename__ = "duplicate_groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("dedup_runs.id", ondelete="CASCADE"), index=True)
    size: Mapped[int] = mapped_column(Integer)
    n_listings: Mapped[int] = mapped_column(Integer)
    max_score: Mapped[float] = mapped_column(Float)

    run: Mapped[DedupRun] = relationship(back_populates="groups")
    pairs: Mapped[list[DuplicatePair]] = relationship(back_populates="group", cascade="all, delete-orphan", passive_deletes=True)


class DuplicatePair(Base):
    """Two items (``item_a_id < item_b_id``) kept as duplicates, with both scores."""

    __tablename__ = "duplicate_pairs"
    __table_args__ = (
        UniqueConstraint("run_id", "item_a_id", "item_b_id"),
        CheckConstraint("item_a_id < item_b_id", name="ordered"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("dedup_runs.id", ondelete="CASCADE"))
    group_id: Mapped[int] = mapped_column(ForeignKey("duplicate_groups.id", ondelete="CASCADE"), index=True)
    item_a_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    item_b_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    index_similarity: Mapped[float] = mapped_column(Float)
    head_score: Mapped[float] = mapped_column(Float)
    exact: Mapped[bool] = mapped_column(Boolean, default=False)
    # Geometrically verified (``engine.explain.decision``): a pair below the threshold is kept only when verified.
    verified: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    group: Mapped[DuplicateGroup] = relationship(back_populates="pairs")
    item_a: Mapped[Item] = relationship(foreign_keys=[item_a_id])
    item_b: Mapped[Item] = relationship(foreign_keys=[item_b_id])


class DedupCalibration(Base):
    """A threshold reaching ``precision_target`` on labelled candidate pairs, for one model."""

    __tablename__ = "dedup_calibrations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    model_key: Mapped[str] = mapped_column(String(64), index=True)
    precision_target: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    n_pairs: Mapped[int] = mapped_column(Integer)
    n_positive: Mapped[int] = mapped_column(Integer)
    recall: Mapped[float] = mapped_column(Float)
    labels: Mapped[str | None] = mapped_column(String(2048))


class MatchReview(Base):
    """A reviewer's decision on a pair (``item_a_id < item_b_id``); the latest review of a pair wins."""

    __tablename__ = "match_reviews"
    __table_args__ = (
        CheckConstraint(f"decision IN ({', '.join(repr(decision) for decision in DECISIONS)})", name="decision"),
        CheckConstraint("item_a_id < item_b_id", name="ordered"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_a_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    item_b_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    decision: Mapped[str] = mapped_column(String(8))
    note: Mapped[str | None] = mapped_column(Text)
    reviewer: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
