"""The catalogue database's queries and writes: the only module that builds SQL. Each function works
inside the caller's session/transaction."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, aliased, selectinload

from indexer.catalogue import ItemState
from indexer.models import (
    DECISIONS,
    REVIEW_STATUSES,
    STATUS_OF_DECISION,
    CatalogueState,
    DedupCalibration,
    DedupRun,
    DuplicateGroup,
    DuplicatePair,
    IndexGeneration,
    Item,
    MatchReview,
    ReviewStatus,
    utcnow,
)

_IN_CHUNK = 500  # ids per IN (...) clause: well below SQLite's and PostgreSQL's parameter limits


def _chunks(values: Sequence, size: int = _IN_CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


# ------------------------------------------------------------------------------------ catalogue version


def bump_version(session: Session) -> int:
    """Mark a change to the items; call once in every transaction that changes them."""
    session.execute(update(CatalogueState).where(CatalogueState.id == 1).values(version=CatalogueState.version + 1))
    return catalogue_version(session)


def catalogue_version(session: Session) -> int:
    return int(session.scalar(select(CatalogueState.version).where(CatalogueState.id == 1)) or 0)


# ------------------------------------------------------------------------------------ items


def item_states(session: Session, model_key: str) -> list[ItemState]:
    """Every item as the diff sees it (without loading embeddings)."""
    rows = session.execute(
        select(Item.id, Item.source, Item.origin, Item.listing, Item.sha256, Item.size_bytes, Item.mtime_ns,
               (Item.shard.is_not(None) & (Item.model_key == model_key)).label("embedded"))
    )
    return [ItemState(r.id, r.source, r.origin, r.listing, r.sha256, r.size_bytes, r.mtime_ns, bool(r.embedded)) for r in rows]


def embedded_shas(session: Session, model_key: str) -> dict[str, int]:
    """sha256 → id of an item holding an embedding by ``model_key`` (for exact duplicates)."""
    rows = session.execute(
        select(Item.sha256, func.min(Item.id))
        .where(Item.shard.is_not(None), Item.model_key == model_key)
        .group_by(Item.sha256)
    )
    return {sha: int(item_id) for sha, item_id in rows}


def get_item(session: Session, item_id: int) -> Item | None:
    return session.get(Item, item_id)


def items_by_ids(session: Session, ids: Iterable[int]) -> dict[int, Item]:
    ids = [int(i) for i in ids]
    found: dict[int, Item] = {}
    for chunk in _chunks(ids):
        for item in session.scalars(select(Item).where(Item.id.in_(chunk))):
            found[item.id] = item
    return found


def item_shards(session: Session, ids: Iterable[int] | None, model_key: str) -> Iterator[tuple[str, list[int]]]:
    """(shard, ids of the items whose row it holds) for the items embedded by ``model_key``: all of them,
    one shard at a time (``indexer.vectors``), or only ``ids``."""
    if ids is None:
        names = session.scalars(select(Item.shard).where(Item.shard.is_not(None), Item.model_key == model_key)
                                .distinct().order_by(Item.shard)).all()
        for name in names:
            yield name, list(session.scalars(select(Item.id).where(Item.shard == name, Item.model_key == model_key).order_by(Item.id)))
        return
    by_shard: dict[str, list[int]] = {}
    for chunk in _chunks(sorted({int(i) for i in ids})):
        for item_id, name in session.execute(select(Item.id, Item.shard).where(
                Item.id.in_(chunk), Item.shard.is_not(None), Item.model_key == model_key)):
            by_shard.setdefault(name, []).append(item_id)
    yield from sorted(by_shard.items())


def embedded_ids_after(session: Session, model_key: str, after: int, limit: int) -> list[int]:
    """Up to ``limit`` ids of items embedded by ``model_key``, the first above ``after``, in order."""
    return list(session.scalars(select(Item.id).where(Item.id > after, Item.shard.is_not(None), Item.model_key == model_key)
                                .order_by(Item.id).limit(limit)))


def live_rows(session: Session) -> dict[str, int]:
    """shard → how many items point at it (its live rows)."""
    rows = session.execute(select(Item.shard, func.count()).where(Item.shard.is_not(None)).group_by(Item.shard))
    return {name: int(n) for name, n in rows}


def shard_members(session: Session, names: Sequence[str]) -> dict[int, str]:
    """item id → shard, for the items pointing at any of ``names``."""
    found: dict[int, str] = {}
    for chunk in _chunks(list(names)):
        found.update({int(i): name for i, name in session.execute(select(Item.id, Item.shard).where(Item.shard.in_(chunk)))})
    return found


def move_to_shard(session: Session, moved: Mapping[int, str], target: str) -> int:
    """Point the items of ``moved`` (id → the shard they were read from) at ``target``: only those still
    pointing where they were read from, so a row rewritten meanwhile is never replaced by an older one."""
    n = 0
    by_source: dict[str, list[int]] = {}
    for item_id, name in moved.items():
        by_source.setdefault(name, []).append(item_id)
    for name, ids in by_source.items():
        for chunk in _chunks(ids):
            n += session.execute(update(Item).where(Item.id.in_(chunk), Item.shard == name)  # housekeeping: updated_at stays
                                 .values(shard=target, updated_at=Item.updated_at)).rowcount or 0
    return n


def embedded_item_keys(session: Session, model_key: str) -> list[tuple[int, str, str | None, str]]:
    """(id, source, listing, sha256) of every item embedded by ``model_key``."""
    rows = session.execute(select(Item.id, Item.source, Item.listing, Item.sha256)
                           .where(Item.shard.is_not(None), Item.model_key == model_key))
    return [(row.id, row.source, row.listing, row.sha256) for row in rows]


def add_item(session: Session, source: str, **values: Any) -> Item:
    """A new item (its id is known once the session flushes)."""
    item = Item(source=source, **values)
    session.add(item)
    return item


def update_item(session: Session, item_id: int, **values: Any) -> None:
    """Set an item's columns (and its ``updated_at``)."""
    session.execute(update(Item).where(Item.id == item_id).values(**values, updated_at=utcnow()))


def item_ids_by_source(session: Session, sources: Iterable[str]) -> dict[str, int]:
    sources = list(sources)
    found: dict[str, int] = {}
    for chunk in _chunks(sources):
        found.update({s: i for s, i in session.execute(select(Item.source, Item.id).where(Item.source.in_(chunk)))})
    return found


def item_ids_by_sha(session: Session, sha256: str) -> list[int]:
    return list(session.scalars(select(Item.id).where(Item.sha256 == sha256).order_by(Item.id)))


def delete_items(session: Session, ids: Sequence[int]) -> int:
    """Delete items (their reviews and duplicate pairs go with them: ON DELETE CASCADE)."""
    n = 0
    for chunk in _chunks(list(ids)):
        n += session.execute(delete(Item).where(Item.id.in_(chunk))).rowcount or 0
    return n


def clear_embeddings(session: Session, origin: str | None = None, ids: Sequence[int] | None = None) -> int:
    """Forget the embeddings of an origin's items (``--rebuild``), of the items ``ids``, or of all: their
    files will be re-read, re-hashed and re-embedded by the next index run of their origin (their rows in
    the shards are dead from now on)."""
    statement = update(Item).values(shard=None, model_key=None, embedded_version=None, updated_at=utcnow())
    if origin is not None:
        statement = statement.where(Item.origin == origin)
    if ids is None:
        return session.execute(statement).rowcount or 0
    return sum(session.execute(statement.where(Item.id.in_(chunk))).rowcount or 0 for chunk in _chunks(list(ids)))


def count_items(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(Item)) or 0)


def count_embedded(session: Session, model_key: str) -> int:
    return int(session.scalar(select(func.count()).select_from(Item).where(Item.shard.is_not(None), Item.model_key == model_key)) or 0)


def embedded_ids(session: Session, model_key: str) -> np.ndarray:
    rows = session.scalars(select(Item.id).where(Item.shard.is_not(None), Item.model_key == model_key).order_by(Item.id))
    return np.fromiter(rows, dtype=np.int64)


def ids_embedded_since(session: Session, model_key: str, version: int) -> list[int]:
    """Items whose embedding was written after catalogue ``version`` (i.e. not in that index)."""
    return list(session.scalars(
        select(Item.id).where(Item.shard.is_not(None), Item.model_key == model_key, Item.embedded_version > version)
    ))


# ------------------------------------------------------------------------------------ index generations


def latest_generation(session: Session) -> IndexGeneration | None:
    return session.scalars(
        select(IndexGeneration).where(IndexGeneration.status == "complete").order_by(IndexGeneration.id.desc()).limit(1)
    ).first()


def start_generation(session: Session, **fields) -> IndexGeneration:
    generation = IndexGeneration(status="building", filename="", **fields)
    session.add(generation)
    session.flush()
    return generation


def complete_generation(session: Session, generation_id: int, filename: str) -> None:
    session.execute(
        update(IndexGeneration).where(IndexGeneration.id == generation_id)
        .values(status="complete", filename=filename, finished_at=utcnow())
    )
    # Rows of runs killed while saving their index never became complete: drop them.
    session.execute(delete(IndexGeneration).where(IndexGeneration.status == "building", IndexGeneration.id < generation_id))


def complete_filenames(session: Session, keep_last: int = 2) -> set[str]:
    rows = session.scalars(
        select(IndexGeneration.filename).where(IndexGeneration.status == "complete").order_by(IndexGeneration.id.desc()).limit(keep_last)
    )
    return set(rows)


def get_generation(session: Session, generation_id: int) -> IndexGeneration | None:
    return session.get(IndexGeneration, generation_id)


# ------------------------------------------------------------------------------------ reviews


def add_review(session: Session, item_a: int, item_b: int, decision: str, reviewer: str, note: str | None = None) -> MatchReview:
    """Record a reviewer's decision on a pair (stored with the smaller id first)."""
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
    if item_a == item_b:
        raise ValueError("a review needs two different items")
    a, b = sorted((int(item_a), int(item_b)))
    review = MatchReview(item_a_id=a, item_b_id=b, decision=decision, reviewer=reviewer, note=note)
    session.add(review)
    session.flush()
    return review


def latest_reviews(session: Session) -> dict[tuple[int, int], str]:
    """(item_a, item_b) → the latest decision on that pair."""
    decisions: dict[tuple[int, int], str] = {}
    for review in session.scalars(select(MatchReview).order_by(MatchReview.created_at, MatchReview.id)):
        decisions[(review.item_a_id, review.item_b_id)] = review.decision
    return decisions


def reviews_of(session: Session, item_a: int, item_b: int) -> list[MatchReview]:
    a, b = sorted((int(item_a), int(item_b)))
    return list(session.scalars(
        select(MatchReview).where(MatchReview.item_a_id == a, MatchReview.item_b_id == b).order_by(MatchReview.id)
    ))


# ------------------------------------------------------------------------------------ dedup


def latest_calibration(session: Session, model_key: str) -> DedupCalibration | None:
    return session.scalars(
        select(DedupCalibration).where(DedupCalibration.model_key == model_key).order_by(DedupCalibration.id.desc()).limit(1)
    ).first()


def latest_dedup_run(session: Session) -> DedupRun | None:
    return session.scalars(select(DedupRun).order_by(DedupRun.id.desc()).limit(1)).first()


def dedup_groups(session: Session, run_id: int) -> list[DuplicateGroup]:
    return list(session.scalars(select(DuplicateGroup).where(DuplicateGroup.run_id == run_id).order_by(DuplicateGroup.id)))


def stored_pair_rows(session: Session, run_id: int) -> list[tuple]:
    """A stored run's pairs, strongest first: (group_id, item_a, item_b, source_a, source_b, listing_a,
    listing_b, index_similarity, head_score, exact, verified). Pairs of items deleted since are left out."""
    item_a, item_b = aliased(Item), aliased(Item)
    return [tuple(row) for row in session.execute(
        select(DuplicatePair.group_id, DuplicatePair.item_a_id, DuplicatePair.item_b_id, item_a.source, item_b.source,
               item_a.listing, item_b.listing, DuplicatePair.index_similarity, DuplicatePair.head_score, DuplicatePair.exact,
               DuplicatePair.verified)
        .join(item_a, item_a.id == DuplicatePair.item_a_id).join(item_b, item_b.id == DuplicatePair.item_b_id)
        .where(DuplicatePair.run_id == run_id)
        .order_by(DuplicatePair.head_score.desc(), DuplicatePair.item_a_id, DuplicatePair.item_b_id)
    )]


def add_calibration(session: Session, model_key: str, calibration: Mapping[str, Any]) -> DedupCalibration:
    """Store a threshold calibrated for a precision target (``dedup.calibrate``'s result and its labels)."""
    row = DedupCalibration(model_key=model_key, precision_target=calibration["precision_target"],
                           threshold=calibration["threshold"], n_pairs=calibration["n_pairs"],
                           n_positive=calibration["n_positive"], recall=calibration["recall"], labels=calibration.get("labels"))
    session.add(row)
    return row


def add_dedup_run(session: Session, groups: Sequence[Mapping[str, Any]], pairs: Sequence[Mapping[str, Any]],
                  **fields: Any) -> tuple[DedupRun, list[int]]:
    """Store a dedup run (``fields``: its columns), its groups and its pairs, each pair's ``group`` the
    position of its group in ``groups``. Returns the run and its groups' ids, in order."""
    run = DedupRun(**fields)
    session.add(run)
    session.flush()
    rows = [DuplicateGroup(run_id=run.id, **group) for group in groups]
    session.add_all(rows)
    session.flush()
    session.add_all(DuplicatePair(run_id=run.id, group_id=rows[pair["group"]].id,
                                  **{name: value for name, value in pair.items() if name != "group"}) for pair in pairs)
    return run, [row.id for row in rows]


# ------------------------------------------------------------------------------------ review queue (API)

_DECISION_OF_STATUS = {status: decision for decision, status in STATUS_OF_DECISION.items() if decision is not None}


def _latest_review_of_pair():
    """An alias of ``match_reviews`` restricted to each pair's newest review, and its join condition with pairs."""
    newest = select(func.max(MatchReview.id)).group_by(MatchReview.item_a_id, MatchReview.item_b_id)
    review = aliased(MatchReview)
    on = (review.item_a_id == DuplicatePair.item_a_id) & (review.item_b_id == DuplicatePair.item_b_id) & review.id.in_(newest)
    return review, on


def _status_filter(statement, review, status: ReviewStatus):
    if status not in REVIEW_STATUSES:
        raise ValueError(f"status must be one of {REVIEW_STATUSES}, got {status!r}")
    if status == "unreviewed":
        return statement.where(review.id.is_(None))
    if status in _DECISION_OF_STATUS:
        return statement.where(review.decision == _DECISION_OF_STATUS[status])
    return statement


def duplicate_pairs_page(session: Session, run_id: int, status: ReviewStatus = "all", offset: int = 0,
                         limit: int = 50) -> tuple[int, list[tuple[DuplicatePair, MatchReview | None]]]:
    """(total, page) of a dedup run's pairs with their newest review, strongest first; ``status`` filters
    by that review (``unreviewed``, ``accepted``, ``rejected`` or ``all``). Both items are loaded."""
    review, on = _latest_review_of_pair()
    base = _status_filter(select(DuplicatePair, review).outerjoin(review, on).where(DuplicatePair.run_id == run_id),
                          review, status)
    total = int(session.scalar(select(func.count()).select_from(base.subquery())) or 0)
    rows = session.execute(
        base.options(selectinload(DuplicatePair.item_a), selectinload(DuplicatePair.item_b))
        .order_by(DuplicatePair.head_score.desc(), DuplicatePair.id).offset(offset).limit(limit)
    ).all()
    return total, [(pair, latest) for pair, latest in rows]


def duplicate_status_counts(session: Session, run_id: int) -> dict[ReviewStatus, int]:
    """How many of a run's pairs are unreviewed, accepted, rejected, and all of them."""
    review, on = _latest_review_of_pair()
    rows = session.execute(
        select(review.decision, func.count()).select_from(DuplicatePair).outerjoin(review, on)
        .where(DuplicatePair.run_id == run_id).group_by(review.decision)
    ).all()
    by_decision = {decision: int(n) for decision, n in rows}
    counts: dict[ReviewStatus, int] = {status: by_decision.get(decision, 0) for decision, status in STATUS_OF_DECISION.items()}
    counts["all"] = sum(counts.values())
    return counts


def duplicate_groups_page(session: Session, run_id: int, offset: int = 0,
                          limit: int = 50) -> tuple[int, list[tuple[DuplicateGroup, list[int]]]]:
    """(total, page) of a run's groups, strongest first, each with its member item ids."""
    total = int(session.scalar(select(func.count()).select_from(DuplicateGroup).where(DuplicateGroup.run_id == run_id)) or 0)
    groups = list(session.scalars(
        select(DuplicateGroup).where(DuplicateGroup.run_id == run_id)
        .order_by(DuplicateGroup.max_score.desc(), DuplicateGroup.id).offset(offset).limit(limit)
    ))
    members: dict[int, set[int]] = {group.id: set() for group in groups}
    if members:
        for group_id, a, b in session.execute(
            select(DuplicatePair.group_id, DuplicatePair.item_a_id, DuplicatePair.item_b_id)
            .where(DuplicatePair.group_id.in_(list(members)))
        ):
            members[group_id].update((a, b))
    return total, [(group, sorted(members[group.id])) for group in groups]


def get_dedup_run(session: Session, run_id: int) -> DedupRun | None:
    return session.get(DedupRun, run_id)


def dedup_runs_page(session: Session, offset: int = 0, limit: int = 50) -> tuple[int, list[DedupRun]]:
    """(total, page) of the dedup runs, newest first."""
    total = int(session.scalar(select(func.count()).select_from(DedupRun)) or 0)
    return total, list(session.scalars(select(DedupRun).order_by(DedupRun.id.desc()).offset(offset).limit(limit)))


def list_reviews(session: Session, offset: int = 0, limit: int = 50,
                 item_id: int | None = None) -> tuple[int, list[MatchReview]]:
    """(total, page) of reviews, newest first; ``item_id`` keeps those of pairs containing that item."""
    statement = select(MatchReview)
    if item_id is not None:
        statement = statement.where((MatchReview.item_a_id == item_id) | (MatchReview.item_b_id == item_id))
    total = int(session.scalar(select(func.count()).select_from(statement.subquery())) or 0)
    page = session.scalars(statement.order_by(MatchReview.id.desc()).offset(offset).limit(limit))
    return total, list(page)
