"""What every route needs: the app's state (settings, catalogue, worker pools, explanations) and access checks.

Auth is a bearer token compared in constant time:

* **writes** (``POST /api/index``, ``POST /api/reviews``) need ``Authorization: Bearer <api_token>``;
  with no ``api_token`` configured they are refused (403) — ``whymatch serve`` generates and prints one;
* **reads** are open unless ``api_read_token`` is set; then they need it or the write token. ``GET``
  requests may pass it as ``?access_token=`` (RFC 6750 §2.3) because ``<img src>`` cannot send headers.

A missing or wrong token is 401 (with ``WWW-Authenticate: Bearer``); a valid token that lacks the right
(the read token on a write, or writes disabled) is 403. ``GET /api/health`` is always open.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from api.explanations import ExplanationStore
from api.settings import ApiSettings
from indexer import Catalogue

T = TypeVar("T")


@dataclass
class ApiState:
    """One per app: the model is loaded once, in the catalogue; model calls go through ``model_pool``."""

    settings: ApiSettings
    catalogue: Catalogue
    model_pool: ThreadPoolExecutor  # bounded (settings.api_workers): search, compare, decoding, rendering
    index_pool: ThreadPoolExecutor  # one thread: index runs are serialised and never block searches' workers
    explanations: ExplanationStore

    async def run_model(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run CPU-heavy work in the bounded pool; requests beyond its size wait their turn."""
        return await asyncio.get_running_loop().run_in_executor(self.model_pool, partial(fn, *args, **kwargs))

    async def run_index(self, fn: Callable[..., T], *args, **kwargs) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.index_pool, partial(fn, *args, **kwargs))


def get_state(request: Request) -> ApiState:
    return request.app.state.whymatch


State = Annotated[ApiState, Depends(get_state)]

_bearer = HTTPBearer(auto_error=False, description="The API token (writes) or the read token (reads, when configured).")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def api_base(request: Request) -> str:
    """The API's URL prefix as the client sees it (honours a proxy's root path)."""
    return f"{request.scope.get('root_path', '').rstrip('/')}/api"


def _presented(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    if credentials is not None:
        return credentials.credentials
    if request.method == "GET":
        return request.query_params.get("access_token")
    return None


def _matches(token: str | None, expected: SecretStr | None) -> bool:
    return token is not None and expected is not None and secrets.compare_digest(
        token.encode(), expected.get_secret_value().encode())


def _unauthorised(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def require_read(request: Request, state: State, credentials: Credentials) -> None:
    """Reads are open unless a read token is configured; the write token reads too."""
    settings = state.settings
    if settings.api_read_token is None:
        return
    token = _presented(request, credentials)
    if token is None:
        raise _unauthorised("this API needs a token for reads: send 'Authorization: Bearer <token>'")
    if not (_matches(token, settings.api_read_token) or _matches(token, settings.api_token)):
        raise _unauthorised("invalid token")


def require_write(state: State, credentials: Credentials) -> None:
    """Writes need the write token; without one configured they are disabled."""
    settings = state.settings
    if settings.api_token is None:
        raise HTTPException(403, "writes are disabled: no API token is configured (set WHYMATCH_API_TOKEN)")
    token = credentials.credentials if credentials is not None else None  # never from the URL
    if token is None:
        raise _unauthorised("writes need the API token: send 'Authorization: Bearer <token>'")
    if _matches(token, settings.api_token):
        return
    if _matches(token, settings.api_read_token):
        raise HTTPException(403, "the read token cannot write: use the API token")
    raise _unauthorised("invalid token")


ReadAccess = Depends(require_read)
WriteAccess = Depends(require_write)
