"""``POST /api/compare``: score and explain two images, each an upload or a catalogue item."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from PIL import Image

from api.deps import ApiState, ReadAccess, State, api_base
from api.explanations import (
    Picture,
    StoredExplanation,
    item_identity,
    overlay_urls,
    pair_key,
    upload_identity,
)
from api.schemas import CompareResponse
from api.uploads import decode_upload, display_copy, label_of, one_line, read_upload
from engine.errors import ImageLoadError
from engine.images import image_size, load_image
from indexer import crud

router = APIRouter(tags=["compare"], dependencies=[ReadAccess])


@dataclass
class _Side:
    """One image of the pair: given as upload bytes or as a catalogue item id."""

    name: str  # "a" or "b"
    data: bytes | None = None
    label: str = ""
    item_id: int | None = None


@dataclass
class _Resolved:
    identity: str
    picture: Picture
    image: Image.Image | None = None  # uploads: decoded at once; items: read only when the model needs them
    item_id: int | None = None
    source: str | None = None
    upload_sha256: str | None = None
    size: tuple[int, int] | None = None  # (width, height) of the original image: correspondence boxes are in its pixels


def _resolve(state: ApiState, side: _Side) -> _Resolved:
    """Uploads are checked and decoded; items are looked up (404 when unknown) but not read yet."""
    catalogue = state.catalogue
    if side.data is not None:
        upload = decode_upload(side.data, label=side.label, max_pixels=state.settings.max_pixels,
                               target_size=int(catalogue.model.config.input_size))
        return _Resolved(upload_identity(upload.sha256), Picture(upload_sha256=upload.sha256), image=upload.image,
                         upload_sha256=upload.sha256, size=image_size(side.data))
    with catalogue.db.session() as session:
        item = crud.get_item(session, side.item_id)
        if item is None:
            raise HTTPException(404, f"item_{side.name}: no catalogue item {side.item_id}")
        return _Resolved(item_identity(item.id, item.sha256), Picture(item_id=item.id), item_id=item.id,
                         source=item.source, size=(item.width, item.height))


def _read_item(state: ApiState, side: _Side, resolved: _Resolved) -> Image.Image:
    try:
        return load_image(resolved.source, target_size=int(state.catalogue.model.config.input_size),
                          max_pixels=state.settings.max_pixels)
    except ImageLoadError as exc:
        if str(exc).startswith("file not found"):
            raise HTTPException(404, f"item_{side.name}: the image file of item {side.item_id} is missing") from exc
        raise HTTPException(422, f"item_{side.name}: the image of item {side.item_id} cannot be read: "
                                 f"{one_line(str(exc))}") from exc


def _compare(state: ApiState, side_a: _Side, side_b: _Side, base: str) -> dict:
    """Explain the pair, or take it from the cache; runs in the model pool."""
    catalogue, store = state.catalogue, state.explanations
    a, b = _resolve(state, side_a), _resolve(state, side_b)
    key = pair_key(catalogue.model_key, a.identity, b.identity)
    stored = store.get(key)
    cached = stored is not None and all(r.upload_sha256 is None or r.upload_sha256 in store.uploads for r in (a, b))
    if not cached:
        for side, resolved in ((side_a, a), (side_b, b)):
            if resolved.image is None:
                resolved.image = _read_item(state, side, resolved)
            if resolved.upload_sha256 is not None:
                store.remember_upload(resolved.upload_sha256, display_copy(resolved.image))
        explanation = catalogue.model.explain(a.image, [b.image], effects=True, correspondences=True, concepts=True,
                                              sizes=[a.size, b.size])[0]
        stored = StoredExplanation(explanation, a.picture, b.picture)
        store.put(key, stored)

    def image_url(resolved: _Resolved, name: str) -> str:
        if resolved.item_id is not None:
            return f"{base}/items/{resolved.item_id}/image"
        return f"{base}/explanations/{key}/{name}.png"

    return {**stored.explanation.to_dict(), "explanation_key": key, "item_a": a.item_id, "item_b": b.item_id,
            "image_a_url": image_url(a, "image_a"), "image_b_url": image_url(b, "image_b"),
            "overlays": overlay_urls(base, key), "cached": cached}


async def _side(name: str, upload: UploadFile | None, item_id: int | None, max_bytes: int) -> _Side:
    if (upload is None) == (item_id is None):
        raise HTTPException(422, f"give exactly one of image_{name} (an upload) and item_{name} (a catalogue item id)")
    if upload is None:
        return _Side(name, item_id=item_id)
    field = f"image_{name}"
    return _Side(name, data=await read_upload(upload, field=field, max_bytes=max_bytes), label=label_of(upload, field))


@router.post("/compare", response_model=CompareResponse, summary="Score and explain two images")
async def compare(
    request: Request,
    state: State,
    image_a: Annotated[UploadFile | None, File(description="First image (or give item_a).")] = None,
    image_b: Annotated[UploadFile | None, File(description="Second image (or give item_b).")] = None,
    item_a: Annotated[int | None, Form(ge=1, description="Catalogue item id instead of image_a.")] = None,
    item_b: Annotated[int | None, Form(ge=1, description="Catalogue item id instead of image_b.")] = None,
) -> dict:
    """The head's similarity, the decision at the model's threshold, the four Grad-CAM maps and overlay URLs,
    the measured effect of masking each map's region, region correspondences and the concepts in words.
    Each side is an upload or a catalogue item (any mix). The same pair explained again comes from the cache."""
    max_bytes = state.settings.max_upload_bytes
    side_a = await _side("a", image_a, item_a, max_bytes)
    side_b = await _side("b", image_b, item_b, max_bytes)
    return await state.run_model(_compare, state, side_a, side_b, api_base(request))
