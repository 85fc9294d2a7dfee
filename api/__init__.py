"""whymatch's REST API (FastAPI) and the server of the web page: ``create_app`` and ``whymatch serve``."""

from api.app import create_app

__all__ = ["create_app"]
