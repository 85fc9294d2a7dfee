"""One router per resource, all mounted under ``/api`` by ``api.app.create_app``."""

from api.routes import (
           compare,
           duplicates,
           explanations,
           health,
           index,
           items,
           reviews,
           search,
)

ROUTERS = (search.router, compare.router, explanations.router, items.router, duplicates.router, reviews.router,
           index.router, health.router)
