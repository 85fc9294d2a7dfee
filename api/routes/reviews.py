"""``POST /api/reviews`` (write) and ``GET /api/reviews``: reviewers' accept/reject decisions on pairs.

Reviews are only ever added (a pair's newest review wins), each committed in its own transaction
before the response is sent, so an acknowledged review survives restarts.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from api.deps import ReadAccess, State, WriteAccess
from api.schemas import Review, ReviewCreate, ReviewPage
from indexer import crud
from indexer.models import MatchReview, as_utc

router = APIRouter(tags=["reviews"])


def review_out(review: MatchReview) -> Review:
    return Review(id=review.id, item_a=review.item_a_id, item_b=review.item_b_id, decision=review.decision,
                  note=review.note, reviewer=review.reviewer, created_at=as_utc(review.created_at))


@router.post("/reviews", response_model=Review, status_code=201, dependencies=[WriteAccess],
             summary="Record a decision on a pair")
def add_review(state: State, body: ReviewCreate) -> Review:
    """Accept or reject a pair (any two catalogue items), with an optional note; stored with the time."""
    with state.catalogue.db.session() as session:
        found = crud.items_by_ids(session, [body.item_a, body.item_b])
        missing = [i for i in (body.item_a, body.item_b) if i not in found]
        if missing:
            raise HTTPException(404, f"no catalogue item {missing[0]}")
        review = crud.add_review(session, body.item_a, body.item_b, body.decision, body.reviewer, body.note)
        return review_out(review)


@router.get("/reviews", response_model=ReviewPage, dependencies=[ReadAccess], summary="Reviews, newest first")
def list_reviews(
    state: State,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    item: Annotated[int | None, Query(ge=1, description="Only reviews of pairs containing this item.")] = None,
) -> ReviewPage:
    with state.catalogue.db.session() as session:
        total, reviews = crud.list_reviews(session, offset, limit, item)
        return ReviewPage(offset=offset, limit=limit, total=total, reviews=[review_out(r) for r in reviews])
