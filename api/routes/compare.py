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
    png_url,
    upload_identity,
)
from api.routes.items import item_image_url
from api.schemas import CompareResponse
from api.uploads import (
    Upload,
    decode_for_model,
    display_copy,
    label_of,
    one_line,
    read_upload,
)
from engine.images import image_size
from indexer import crud
from indexer.search import UnknownItemError
from indexer.service import ItemImageError

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
    """A side checked: a decoded upload, or a catalogue item that exists (read only when the model needs it)."""

    identity: str
    picture: Picture
    upload: Upload | None = None
    size: tuple[int, int] | None = None  # an upload's original (width, height): it is decoded at reduced size

    @property
    def subject(self) -> Image.Image | int:
        """What ``Catalogue.compare`` takes for this side: the decoded upload, or the item id."""
        return self.upload.image if self.upload is not None else self.picture.item_id


def _resolve(state: ApiState, side: _Side) -> _Resolved:
    """Uploads are checked and decoded; items are looked up (404 when unknown) but not read yet."""
    if side.data is not None:
        upload = decode_for_model(state, side.data, side.label)
        return _Resolved(upload_identity(upload.sha256), Picture(upload_sha256=upload.sha256), upload,
                         image_size(side.data))
    with state.catalogue.db.session() as session:
        item = crud.get_item(session, side.item_id)
        if item is None:
            raise HTTPException(404, f"item_{side.name}: no catalogue item {side.item_id}")
        return _Resolved(item_identity(item.id, item.sha256), Picture(item_id=item.id))


def _compare(state: ApiState, side_a: _Side, side_b: _Side, base: str, verify: bool = True) -> CompareResponse:
    """Explain the pair, or take it from the cache (a cached explanation made without verification, e.g. by a
    search, is made again when ``verify`` asks for one); runs in the model pool."""
    catalogue, store = state.catalogue, state.explanations
    a, b = _resolve(state, side_a), _resolve(state, side_b)
    key = pair_key(catalogue.model_key, a.identity, b.identity)
    stored = store.get(key)
    cached = (stored is not None and all(r.upload is None or r.upload.sha256 in store.uploads for r in (a, b))
              and (not verify or stored.explanation.verification is not None))
    if not cached:
        for resolved in (a, b):
            if resolved.upload is not None:
                store.remember_upload(resolved.upload.sha256, display_copy(resolved.upload.image))
        try:
            explanation = catalogue.compare(a.subject, b.subject, sizes=(a.size, b.size), verify=verify)
        except UnknownItemError as exc:  # removed since it was looked up
            raise HTTPException(404, str(exc)) from exc
        except ItemImageError as exc:
            name = side_a.name if exc.item_id == a.picture.item_id else side_b.name
            if exc.missing:
                raise HTTPException(404, f"item_{name}: the image file of item {exc.item_id} is missing") from exc
            raise HTTPException(422, f"item_{name}: the image of item {exc.item_id} cannot be read: "
                                     f"{one_line(exc.reason)}") from exc
        stored = StoredExplanation(explanation, a.picture, b.picture)
        store.put(key, stored)

    def image_url(resolved: _Resolved, which: str) -> str:
        item_id = resolved.picture.item_id
        return item_image_url(base, item_id) if item_id is not None else png_url(base, key, which)

    return CompareResponse(**stored.explanation.to_dict(), explanation_key=key, overlays=overlay_urls(base, key),
                           item_a=a.picture.item_id, item_b=b.picture.item_id, image_a_url=image_url(a, "image_a"),
                           image_b_url=image_url(b, "image_b"), cached=cached)


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
    verify: Annotated[bool, Form(description="Verify the pair geometrically (SIFT + homography inliers, ~0.16 s): a "
                                             "verified pair is a match whatever its similarity.")] = True,
) -> CompareResponse:
    """The head's similarity, the geometric verification (``verification``: inliers and up to 30 inlier lines in
    the photos' pixels), the decision (``is_match``: similarity ≥ threshold or verified; ``decided_by`` says
    which), the four Grad-CAM maps and overlay URLs, the measured effect of masking each map's region, region
    correspondences and the concepts in words. Each side is an upload or a catalogue item (any mix). The same
    pair explained again comes from the cache."""
    max_bytes = state.settings.max_upload_bytes
    side_a = await _side("a", image_a, item_a, max_bytes)
    side_b = await _side("b", image_b, item_b, max_bytes)
    return await state.run_model(_compare, state, side_a, side_b, api_base(request), verify)
