"""``GET /api/items/{id}`` and its image, served only from the path the catalogue stored for that id."""

from __future__ import annotations

import os
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import FileResponse
from PIL import Image

from api.deps import ReadAccess, State, api_base
from api.schemas import ItemResponse
from engine.images import IMAGE_SUFFIXES
from indexer import crud
from indexer.models import as_utc
from indexer.service import catalogue_path

router = APIRouter(tags=["items"], dependencies=[ReadAccess])

ItemId = Annotated[int, Path(ge=1, description="A catalogue item id (as in search results).")]


def item_image_url(base: str, item_id: int) -> str:
    """Where a client fetches a catalogue item's image (``base`` is the API prefix, e.g. ``/api``)."""
    return f"{base}/items/{item_id}/image"


@router.get("/items/{item_id}", response_model=ItemResponse, summary="A catalogue item")
def get_item(request: Request, state: State, item_id: ItemId) -> ItemResponse:
    with state.catalogue.db.session() as session:
        item = crud.get_item(session, item_id)
        if item is None:
            raise HTTPException(404, f"no catalogue item {item_id}")
        return ItemResponse(
            id=item.id, source=catalogue_path(item.source, item.origin), listing=item.listing, sha256=item.sha256,
            width=item.width, height=item.height, size_bytes=item.size_bytes, added_at=as_utc(item.added_at),
            updated_at=as_utc(item.updated_at), embedded=item.shard is not None,
            image_url=item_image_url(api_base(request), item.id),
        )


@router.get("/items/{item_id}/image", response_class=FileResponse, summary="A catalogue item's image file",
            responses={200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}}})
def get_item_image(state: State, item_id: ItemId) -> FileResponse:
    """The file as indexed. The path comes from the database only; no client input ever names a file."""
    with state.catalogue.db.session() as session:
        item = crud.get_item(session, item_id)
        source = item.source if item is not None else None
    if source is None:
        raise HTTPException(404, f"no catalogue item {item_id}")
    if not os.path.isfile(source):
        raise HTTPException(404, f"the image file of item {item_id} is missing")
    media_type = Image.MIME.get(IMAGE_SUFFIXES.get(os.path.splitext(source)[1].lower(), ""), "application/octet-stream")
    return FileResponse(source, media_type=media_type, headers={"Cache-Control": "private, max-age=300"})
