"""whymatch's REST API (FastAPI) and the server of the web page: ``create_app`` and ``whymatch serve``."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api.app import create_app

# Exports load on first use, so that the ``whymatch`` command starts (and answers --help or a usage
# error) without importing torch and FastAPI.
_EXPORTS = {
    "create_app": "api.app",
}

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
