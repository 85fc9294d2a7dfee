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
from api.schemas import SearchResponse
from api.uploads import (
    decode_upload,
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
            effects: bool = False, concepts: bool = False) -> dict:
    """Decode, search and (optionally) remember the explanations; runs in the model pool."""
    catalogue = state.catalogue
    upload = decode_upload(data, label=label, max_pixels=state.settings.max_pixels,
                           target_size=int(catalogue.model.config.input_size))
    try:
        result = catalogue.search(upload.data, k=k, explain=explain, effects=effects, concepts=concepts)
    except ImageLoadError as exc:  # e.g. a pixel limit above the engine's default
        raise HTTPException(status_for(exc), f"{label}: {one_line(str(exc))}") from exc
    if explain and result.matches:
        state.explanations.remember_upload(upload.sha256, display_copy(upload.image))
    response = _response(state, result, upload_identity(upload.sha256), Picture(upload_sha256=upload.sha256), base)
    return {**response, "query": name, "query_sha256": upload.sha256, "query_image_url": None}


def _search_item(state: ApiState, item_id: int, k: int, explain: bool, base: str, effects: bool, concepts: bool) -> dict:
    """More like a catalogue item, from its stored embedding and description; runs in the model pool."""
    try:
        result = state.catalogue.search_item(item_id, k=k, explain=explain, effects=effects, concepts=concepts)
    except UnknownItemError as exc:
        raise HTTPException(404, f"item: {exc}") from exc
    except ImageLoadError as exc:  # concepts and effects read the item's file
        raise HTTPException(422, f"item: the image of item {item_id} cannot be read: {one_line(str(exc))}") from exc
    response = _response(state, result, item_identity(item_id, result.query_sha256), Picture(item_id=item_id), base)
    return {**response, "query_image_url": f"{base}/items/{item_id}/image"}


def _response(state: ApiState, result: SearchResult, query_identity: str, query_picture: Picture, base: str) -> dict:
    """The result as JSON, each match with its image URL and, when explained, its cached explanation's key and overlays."""
    response = result.to_dict()
    for match, out in zip(result.matches, response["matches"]):
        out["image_url"] = f"{base}/items/{match.item_id}/image"
        if match.explanation is not None:
            key = pair_key(state.catalogue.model_key, query_identity, item_identity(match.item_id, match.sha256))
            state.explanations.put(key, StoredExplanation(match.explanation, query_picture, Picture(item_id=match.item_id)))
            out["explanation_key"] = key
            out["overlays"] = overlay_urls(base, key)
        else:
            out.pop("overlays", None)
    return response


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
) -> dict:
    """The ``k`` best matches of an upload (``image``) or of a catalogue item (``item``): FAISS candidates
    re-scored by the Siamese head, with both ranks. Catalogue items with the upload's exact bytes, or the item
    itself, are left out (``excluded``). With ``explain`` each match carries its maps and the URLs of overlay
    PNGs (``a`` = the query, ``b`` = the match) and region correspondences; ``concepts`` and ``effects`` add
    those."""
    if (image is None) == (item is None):
        raise HTTPException(422, "give exactly one of image (an upload) and item (a catalogue item id)")
    explain = explain or effects or concepts
    if item is not None:
        return await state.run_model(_search_item, state, item, k, explain, api_base(request), effects, concepts)
    data = await read_upload(image, field="image", max_bytes=state.settings.max_upload_bytes)
    return await state.run_model(_search, state, data, label_of(image, "image"), filename_of(image) or "<upload>", k,
                                 explain, api_base(request), effects, concepts)
