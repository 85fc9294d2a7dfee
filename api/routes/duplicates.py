"""``GET /api/duplicates``: the review queue of a dedup run (pairs strongest first), its groups and listing report; the runs.

Duplicates are found by ``whymatch dedup`` or ``POST /api/duplicates/run`` (stored in the database); the
API shows the latest run unless ``run`` names another. A pair's status is its newest review (``POST /api/reviews``), whichever run it
was found in, so decisions carry over to later runs.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from sqlalchemy.orm import Session

from api.deps import ApiState, ReadAccess, State, WriteAccess, api_base
from api.routes.items import item_image_url
from api.routes.reviews import review_out
from api.schemas import (
    DedupRequest,
    DedupRunInfo,
    DedupRunOut,
    DedupRunPage,
    DuplicateGroupOut,
    DuplicatePage,
    DuplicatePairOut,
    GroupPage,
    ItemBrief,
    ListingPage,
    ListingShareOut,
    ReviewStatus,
    StatusCounts,
)
from indexer import crud
from indexer.dedup import stored_listing_report
from indexer.models import STATUS_OF_DECISION, DedupRun, Item, as_utc
from indexer.service import catalogue_path

router = APIRouter(tags=["duplicates"], dependencies=[ReadAccess])

Offset = Annotated[int, Query(ge=0)]
Limit = Annotated[int, Query(ge=1, le=500)]
RunId = Annotated[int | None, Query(ge=1, description="A dedup run id; default: the latest run.")]


def _run(session: Session, run_id: int | None) -> DedupRun | None:
    if run_id is None:
        return crud.latest_dedup_run(session)
    run = crud.get_dedup_run(session, run_id)
    if run is None:
        raise HTTPException(404, f"no dedup run {run_id}")
    return run


def _brief(item: Item, base: str) -> ItemBrief:
    return ItemBrief(id=item.id, source=catalogue_path(item.source, item.origin), listing=item.listing,
                     image_url=item_image_url(base, item.id))


def _run_info(run: DedupRun) -> DedupRunInfo:
    return DedupRunInfo(id=run.id, created_at=as_utc(run.created_at), threshold=run.threshold,
                        threshold_source=run.threshold_source, precision_target=run.precision_target, k=run.k,
                        n_items=run.n_items, n_candidates=run.n_candidates, n_pairs=run.n_pairs, n_groups=run.n_groups,
                        expected_false_pairs=run.expected_false_pairs, n_verify_checked=run.n_verify_checked,
                        n_verified=run.n_verified)


@router.get("/duplicates", response_model=DuplicatePage, summary="Duplicate pairs to review, strongest first")
def list_duplicates(request: Request, state: State, offset: Offset = 0, limit: Limit = 50,
                    status: ReviewStatus = "unreviewed", run: RunId = None) -> DuplicatePage:
    base = api_base(request)
    with state.catalogue.db.session() as session:
        dedup_run = _run(session, run)
        if dedup_run is None:
            empty = StatusCounts(unreviewed=0, accepted=0, rejected=0, all=0)
            return DuplicatePage(run=None, status=status, offset=offset, limit=limit, total=0, counts=empty, pairs=[])
        total, rows = crud.duplicate_pairs_page(session, dedup_run.id, status, offset, limit)
        pairs = [DuplicatePairOut(
            id=pair.id, group_id=pair.group_id, item_a=_brief(pair.item_a, base), item_b=_brief(pair.item_b, base),
            index_similarity=pair.index_similarity, head_score=pair.head_score, exact=pair.exact,
            verified=pair.verified,
            status=STATUS_OF_DECISION[review.decision if review is not None else None],
            review=review_out(review) if review is not None else None,
        ) for pair, review in rows]
        return DuplicatePage(run=_run_info(dedup_run), status=status, offset=offset, limit=limit, total=total,
                             counts=StatusCounts(**crud.duplicate_status_counts(session, dedup_run.id)), pairs=pairs)


def _dedup(state: ApiState, request: DedupRequest) -> DedupRunOut:
    try:
        report = state.catalogue.dedup(k=request.k, threshold=request.threshold, precision=request.precision,
                                       verify=request.verify)
    except ValueError as exc:  # e.g. a precision target without any reviewed duplicate to calibrate on
        raise HTTPException(422, str(exc)) from exc
    with state.catalogue.db.session() as session:
        run = crud.get_dedup_run(session, report.run_id)
        return DedupRunOut(run=_run_info(run), seconds=report.seconds)


@router.post("/duplicates/run", response_model=DedupRunOut, status_code=201, dependencies=[WriteAccess],
             summary="Find duplicates across the catalogue (a new dedup run)")
async def run_dedup(state: State, request: DedupRequest) -> DedupRunOut:
    """The FAISS k-NN graph re-scored by the head, kept above the threshold; the new run becomes the review
    queue. Reviews of earlier runs carry over (a pair's status is its newest review)."""
    if request.threshold is not None and request.precision is not None:
        raise HTTPException(422, "give either a threshold or a precision target, not both")
    return await state.run_model(_dedup, state, request)


@router.get("/duplicates/runs", response_model=DedupRunPage, summary="The dedup runs, newest first")
def list_runs(state: State, offset: Offset = 0, limit: Limit = 50) -> DedupRunPage:
    """Each run's id (for ``run=`` on the other duplicate routes), time, threshold and counts."""
    with state.catalogue.db.session() as session:
        total, runs = crud.dedup_runs_page(session, offset, limit)
        return DedupRunPage(offset=offset, limit=limit, total=total, runs=[_run_info(run) for run in runs])


@router.get("/duplicates/groups", response_model=GroupPage, summary="Duplicate groups, strongest first")
def list_groups(state: State, offset: Offset = 0, limit: Limit = 50, run: RunId = None) -> GroupPage:
    with state.catalogue.db.session() as session:
        dedup_run = _run(session, run)
        if dedup_run is None:
            return GroupPage(run_id=None, offset=offset, limit=limit, total=0, groups=[])
        total, rows = crud.duplicate_groups_page(session, dedup_run.id, offset, limit)
        groups = [DuplicateGroupOut(id=g.id, size=g.size, n_listings=g.n_listings, max_score=g.max_score, items=members)
                  for g, members in rows]
        return GroupPage(run_id=dedup_run.id, offset=offset, limit=limit, total=total, groups=groups)


@router.get("/duplicates/listings", response_model=ListingPage, summary="Listings sharing photos")
def list_listings(state: State, offset: Offset = 0, limit: Limit = 50, run: RunId = None) -> ListingPage:
    """Pairs of different listings that share photos, strongest evidence first (the dedup listing report)."""
    with state.catalogue.db.session() as session:
        dedup_run = _run(session, run)
        if dedup_run is None:
            return ListingPage(run_id=None, offset=offset, limit=limit, total=0, listings=[])
        report = stored_listing_report(session, dedup_run.id)
    shares = [ListingShareOut(**vars(share)) for share in report[offset : offset + limit]]
    return ListingPage(run_id=dedup_run.id, offset=offset, limit=limit, total=len(report), listings=shares)
