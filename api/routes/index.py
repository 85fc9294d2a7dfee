"""``POST /api/index`` (write): store uploaded images in the upload folder and index them incrementally.

Files are content-addressed (``<upload_dir>/[<listing>/]<sha256>.<ext>``), written to a hidden temporary
name and renamed, so the same image uploaded twice is stored once and a crash never leaves half a
file where the indexer looks. Every upload is checked before any is stored: one bad file refuses the
request. The indexer then runs on the whole upload folder (the catalogue's ``uploads`` origin): only
the new files are read and embedded, and the FAISS index is updated.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile

from api.deps import ApiState, State, WriteAccess, api_base
from api.routes.items import item_image_url
from api.schemas import IndexReportOut, IndexResponse, StoredUpload, Unreadable
from api.uploads import (
    INDEXABLE_SUFFIXES,
    Upload,
    decode_for_model,
    filename_of,
    label_of,
    read_upload,
)
from indexer import crud
from indexer.service import catalogue_path

router = APIRouter(tags=["index"], dependencies=[WriteAccess])

# Folder names only: every part starts with a letter or digit (no '..', no hidden folders), at most 4 deep.
_PART = r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,127}"
LISTING_PATTERN = rf"^{_PART}(/{_PART}){{0,3}}$"


def upload_dir(state: ApiState) -> Path:
    settings = state.settings
    return Path(os.path.abspath(settings.upload_dir or state.catalogue.data_dir / "uploads"))


def _check(state: ApiState, files: list[tuple[str, bytes]]) -> list[Upload]:
    uploads = []
    for label, data in files:
        upload = decode_for_model(state, data, label)
        if upload.format not in INDEXABLE_SUFFIXES:
            raise HTTPException(415, f"{label}: {upload.format} images cannot be indexed: upload JPEG, PNG or WebP")
        uploads.append(upload)
    return uploads


def _write_once(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically unless it is there already; True when written."""
    if path.is_file():
        return False
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return True


def _store_and_index(state: ApiState, uploads: list[Upload], names: list[str | None], listing: str | None,
                     base: str) -> IndexResponse:
    root = upload_dir(state)
    folder = root.joinpath(*listing.split("/")) if listing else root
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for upload in uploads:
        path = folder / f"{upload.sha256}{INDEXABLE_SUFFIXES[upload.format]}"
        written.append((upload, path, _write_once(path, upload.data)))
    report = state.catalogue.index(root, progress=False)
    with state.catalogue.db.session() as session:
        ids = crud.item_ids_by_source(session, [str(path) for _, path, _ in written])
    stored = [StoredUpload(
        filename=name, sha256=upload.sha256, path=catalogue_path(str(path), str(root)), listing=listing,
        item_id=ids.get(str(path)), new_file=new,
        image_url=item_image_url(base, ids[str(path)]) if str(path) in ids else None,
    ) for (upload, path, new), name in zip(written, names)]
    skipped = [Unreadable(source=catalogue_path(s.source, str(root)), reason=s.reason) for s in report.skipped]
    return IndexResponse(stored=stored, report=IndexReportOut(**{**report.to_dict(), "source": root.name, "skipped": skipped}))


@router.post("/index", response_model=IndexResponse, summary="Add images to the catalogue")
async def index_images(
    request: Request,
    state: State,
    images: Annotated[list[UploadFile], File(description="One or more JPEG, PNG or WebP images.")],
    listing: Annotated[str | None, Form(pattern=LISTING_PATTERN, description="Listing key (a folder name).")] = None,
) -> IndexResponse:
    """Store the images in the upload folder and index them (incremental: only new files are embedded).
    Returns where each was stored, its catalogue item id and the indexing report."""
    settings = state.settings
    if len(images) > settings.max_upload_files:
        raise HTTPException(413, f"too many files: {len(images)} > the limit of {settings.max_upload_files} per request")
    files = [(label_of(f, "images"), await read_upload(f, field="images", max_bytes=settings.max_upload_bytes))
             for f in images]
    uploads = await state.run_model(_check, state, files)
    names = [filename_of(f) for f in images]
    return await state.run_index(_store_and_index, state, uploads, names, listing, api_base(request))
