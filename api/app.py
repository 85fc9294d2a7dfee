"""The FastAPI application: ``create_app(settings)`` wires the catalogue, the worker pools, the routers and the page.

The model is loaded once, here, inside the catalogue; every request shares it. CPU-heavy work (decoding,
the network, rendering overlays) runs in a bounded thread pool of ``api_workers`` threads — torch
inference and Grad-CAM (functional autograd, no hooks) are safe to run concurrently, and the catalogue
guards its FAISS index with a lock. Index runs get their own single thread. The page in ``web/`` is
served at ``/`` after the API routes, when it exists.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import ApiState
from api.explanations import ExplanationStore
from api.routes import ROUTERS
from api.routes.health import VERSION
from api.uploads import one_line, status_for
from api.settings import ApiSettings
from engine.errors import ImageLoadError
from indexer import Catalogue

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
_MULTIPART_SLACK = 1 << 20  # form fields and part headers around the files

log = logging.getLogger("whymatch.api")


class RequestTooLarge(HTTPException):
    """Raised while the body streams in; an HTTPException so FastAPI's form parsing passes it on as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than the limit of {limit} bytes")


class BodyLimitMiddleware:
    """Refuses request bodies over a per-path limit: by Content-Length up front, else while they stream in,
    so an oversized upload is never spooled to disk in full."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await JSONResponse({"detail": RequestTooLarge(limit).detail}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


def _body_limits(settings: ApiSettings) -> Callable[[str], int]:
    single = 2 * settings.max_upload_bytes + _MULTIPART_SLACK  # compare: two images
    many = settings.max_upload_files * settings.max_upload_bytes + _MULTIPART_SLACK

    def limit_for(path: str) -> int:
        return many if path.rstrip("/").endswith("/api/index") else single

    return limit_for


def _image_error(_: Request, exc: ImageLoadError) -> JSONResponse:
    return JSONResponse({"detail": one_line(str(exc))}, status_code=status_for(exc))


def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc)
    return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)


def create_app(settings: ApiSettings, catalogue: Catalogue) -> FastAPI:
    """The API (and the page) for one catalogue. The catalogue's model, database and index are opened now,
    so a broken setup fails at start and the first request is not slow."""
    catalogue.model  # noqa: B018 - load the model once, now
    catalogue.model_key  # noqa: B018
    catalogue.current_index()
    state = ApiState(
        settings=settings,
        catalogue=catalogue,
        model_pool=ThreadPoolExecutor(settings.api_workers, thread_name_prefix="whymatch-model"),
        index_pool=ThreadPoolExecutor(1, thread_name_prefix="whymatch-index"),
        explanations=ExplanationStore(settings.explanation_cache_size),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.model_pool.shutdown(wait=False, cancel_futures=True)
        state.index_pool.shutdown(wait=True, cancel_futures=True)  # let a running index run commit

    app = FastAPI(
        title="whymatch",
        version=VERSION,
        summary="Image similarity search that says why two images match.",
        lifespan=lifespan,
    )
    app.state.whymatch = state
    app.add_middleware(BodyLimitMiddleware, limit_for=_body_limits(settings))
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    app.add_exception_handler(ImageLoadError, _image_error)
    app.add_exception_handler(Exception, _unexpected_error)
    for router in ROUTERS:
        app.include_router(router, prefix="/api")
    if WEB_DIR.is_dir():
        app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")
    return app
