"""``GET /api/health``: model, index size and generation, database reachability. Always open (healthchecks)."""

from __future__ import annotations

from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from api.deps import State
from api.schemas import AuthInfo, DatabaseInfo, Health, IndexInfo, ModelInfo
from api.uploads import one_line
from indexer import crud


def _version() -> str:
    try:
        return version("whymatch")
    except PackageNotFoundError:
        return "unknown"


router = APIRouter(tags=["health"])
VERSION = _version()


@router.get("/health", response_model=Health, summary="Is the service up?",
            responses={503: {"model": Health, "description": "The database or the index is unreachable."}})
def health(state: State) -> Health | JSONResponse:
    catalogue, settings = state.catalogue, state.settings
    body = Health(
        status="ok", version=VERSION, index=None, items=None, model=ModelInfo(**asdict(catalogue.model_summary())),
        db=DatabaseInfo(ok=True, dialect=catalogue.db.dialect),
        auth=AuthInfo(reads="open" if settings.api_read_token is None else "token",
                      writes="disabled" if settings.api_token is None else "token"),
    )
    try:
        with catalogue.db.session() as session:
            body.items = crud.count_items(session)
        index, generation, stale = catalogue.current_index()
        body.index = IndexInfo(size=int(index.ntotal), generation=generation, stale=stale)
    except (SQLAlchemyError, OSError, RuntimeError) as exc:
        body.status = "error"
        body.db = DatabaseInfo(ok=False, dialect=catalogue.db.dialect, error=one_line(str(exc))[:300])
        return JSONResponse(body.model_dump(mode="json"), status_code=503)
    return body
