"""``POST /api/search``: the catalogue's best matches of an uploaded image, re-ranked by the head, optionally explained."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile

from api.deps import ApiState, ReadAccess, State, api_base
from api.explanations import (
    Picture,
    StoredExplanation,
    item_identity,
    overlay_urls,
    pair_key,
    upload_identity,
)
from api.routes.items import item_image_url
from api.schemas import Explanation, SearchMatch, SearchResponse, Unreadable
from api.uploads import (
    decode_for_model,
    display_copy,
    filename_of,
    label_of,
    one_line,
    read_upload,
    status_for,
)
from engine.errors import ImageLoadError
from indexer.search import SearchResult, UnknownItemError

router = APIRouter(tags=["search"], dependencies=[ReadAccess])


def _search(state: ApiState, data: bytes, label: str, name: str, k: int, explain: bool, base: str,
            effects: bool = False, concepts: bool = False, verify: bool = False) -> SearchResponse:
    """Decode, search and (optionally) remember the explanations; runs in the model pool."""
    upload = decode_for_model(state, data, label)
    try:
        result = state.catalogue.search(upload.data, k=k, explain=explain, effects=effects, concepts=concepts,
                                        verify=verify)
    except ImageLoadError as exc:  # e.g. a pixel limit above the engine's default
        raise HTTPException(status_for(exc), f"{label}: {one_line(str(exc))}") from exc
    if explain and result.matches:
        state.explanations.remember_upload(upload.sha256, display_copy(upload.image))
    return _response(state, result, name, upload_identity(upload.sha256), Picture(upload_sha256=upload.sha256), base)


def _search_item(state: ApiState, item_id: int, k: int, explain: bool, base: str, effects: bool,
                 concepts: bool, verify: bool = False) -> SearchResponse:
    """More like a catalogue item, from its stored embedding and description; runs in the model pool."""
    try:
        result = state.catalogue.search_item(item_id, k=k, explain=explain, effects=effects, concepts=concepts,
                                             verify=verify)
    except UnknownItemError as exc:
        raise HTTPException(404, f"item: {exc}") from exc
    except ImageLoadError as exc:  # concepts, effects and verify read the item's file
        raise HTTPException(422, f"item: the image of item {item_id} cannot be read: {one_line(str(exc))}") from exc
    return _response(state, result, None, item_identity(item_id, result.query_sha256), Picture(item_id=item_id), base)


def _response(state: ApiState, result: SearchResult, upload_name: str | None, query_identity: str,
              query_picture: Picture, base: str) -> SearchResponse:
    """The result with catalogue-relative sources, each match with its image URL and, when explained, its
    cached explanation's key and overlays. ``upload_name`` names an upload query; an item query is its source."""
    shown = state.catalogue.relative_sources([*(m.source for m in result.matches), *(s.source for s in result.unreadable),
                                              *([result.query] if result.query_item is not None else [])])
    matches = []
    for match in result.matches:
        key, overlays, explanation = None, {}, None
        if match.explanation is not None:
            key = pair_key(state.catalogue.model_key, query_identity, item_identity(match.item_id, match.sha256))
            state.explanations.put(key, StoredExplanation(match.explanation, query_picture, Picture(item_id=match.item_id)))
            overlays, explanation = overlay_urls(base, key), Explanation(**match.explanation.to_dict())
        matches.append(SearchMatch(
            item_id=match.item_id, source=shown[match.source], listing=match.listing, sha256=match.sha256,
            index_similarity=match.index_similarity, head_score=match.head_score, is_match=match.is_match,
            decided_by=match.decided_by, verification=match.verification, rank_before=match.rank_before, rank_after=match.rank_after, image_url=item_image_url(base, match.item_id),
            explanation=explanation, explanation_key=key, overlays=overlays))
    item = result.query_item
    return SearchResponse(
        query=upload_name if item is None else shown[result.query], query_item=item, query_sha256=result.query_sha256,
        query_image_url=None if item is None else item_image_url(base, item), k=result.k, threshold=result.threshold,
        n_candidates=result.n_candidates, index_size=result.index_size, excluded=result.excluded,
        generation=result.generation, stale_index=result.stale_index,
        unreadable=[Unreadable(source=shown[s.source], reason=s.reason) for s in result.unreadable], matches=matches)


@router.post("/search", response_model=SearchResponse, summary="Search the catalogue by image")
async def search(
    request: Request,
    state: State,
    image: Annotated[UploadFile | None, File(description="The query image (JPEG, PNG, WebP, ...), or give item.")] = None,
    item: Annotated[int | None, Form(ge=1, description="A catalogue item id to search with instead of an upload "
                                                      "(more like this: its stored embedding and description).")] = None,
    k: Annotated[int, Form(ge=1, le=100, description="How many matches.")] = 10,
    explain: Annotated[bool, Form(description="Also explain each match (factual/counterfactual maps and region "
                                              "correspondences, from the stored descriptions: no backbone pass).")] = False,
    concepts: Annotated[bool, Form(description="Also name the ImageNet concepts each match rests on "
                                               "(implies explain; one backbone pass over the matches).")] = False,
    effects: Annotated[bool, Form(description="Also measure how the score moves when each map's region is masked "
                                              "(implies explain; four more backbone passes per match).")] = False,
    verify: Annotated[bool, Form(description="Also verify each match geometrically (SIFT + homography inliers: "
                                             "decodes the query and each match, ~45 ms a match); a verified match is "
                                             "a match whatever its head score.")] = False,
) -> SearchResponse:
    """The ``k`` best matches of an upload (``image``) or of a catalogue item (``item``): FAISS candidates
    re-scored by the Siamese head, with both ranks. Catalogue items with the upload's exact bytes, or the item
    itself, are left out (``excluded``). With ``explain`` each match carries its maps and the URLs of overlay
    PNGs (``a`` = the query, ``b`` = the match) and region correspondences; ``concepts`` and ``effects`` add
    those. With ``verify`` each match carries its ``verification`` and ``decided_by``, and ``is_match`` is the
    tier rule's (head score ≥ threshold or geometrically verified)."""
    if (image is None) == (item is None):
        raise HTTPException(422, "give exactly one of image (an upload) and item (a catalogue item id)")
    explain = explain or effects or concepts
    if item is not None:
        return await state.run_model(_search_item, state, item, k, explain, api_base(request), effects, concepts, verify)
    data = await read_upload(image, field="image", max_bytes=state.settings.max_upload_bytes)
    return await state.run_model(_search, state, data, label_of(image, "image"), filename_of(image) or "<upload>", k,
                                 explain, api_base(request), effects, concepts, verify)
