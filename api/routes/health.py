"""``GET /api/health``: model, index size and generation, database reachability. Always open (healthchecks)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from api.deps import State
from api.schemas import Health
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
def health(state: State) -> dict | JSONResponse:
    catalogue, settings = state.catalogue, state.settings
    model = catalogue.model
    body = {
        "status": "ok", "version": VERSION, "index": None, "items": None,
        "model": {"preset": model.config.preset, "backbone": model.config.backbone,
                  "input_size": model.config.input_size, "embed_dim": model.config.embed_dim,
                  "threshold": model.threshold, "duplicate_threshold": model.duplicate_threshold,
                  "key": catalogue.model_key},
        "db": {"ok": True, "dialect": catalogue.db.dialect},
        "auth": {"reads": "open" if settings.api_read_token is None else "token",
                 "writes": "disabled" if settings.api_token is None else "token"},
    }
    try:
        with catalogue.db.session() as session:
            body["items"] = crud.count_items(session)
        index, generation, stale = catalogue.current_index()
        body["index"] = {"size": int(index.ntotal), "generation": generation, "stale": stale}
    except (SQLAlchemyError, OSError, RuntimeError) as exc:
        body["status"] = "error"
        body["db"] = {"ok": False, "dialect": catalogue.db.dialect, "error": one_line(str(exc))[:300]}
        return JSONResponse(Health.model_validate(body).model_dump(mode="json"), status_code=503)
    return body
