"""``GET /api/explanations/{key}`` and its overlay PNGs, rendered on demand from the cached maps."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from PIL import Image

from api.deps import ApiState, ReadAccess, State, api_base
from api.explanations import KEY_PATTERN, Picture, StoredExplanation, overlay_urls
from api.explanations import render_png as render
from api.schemas import ExplanationWithOverlays
from api.uploads import DISPLAY_SIZE, display_copy
from indexer.search import UnknownItemError
from indexer.service import ItemImageError

router = APIRouter(tags=["explanations"], dependencies=[ReadAccess])

Key = Annotated[str, Path(pattern=KEY_PATTERN, description="An explanation_key from /api/search or /api/compare.")]
Which = Literal["factual_a", "factual_b", "counterfactual_a", "counterfactual_b", "image_a", "image_b"]
_GONE = "unknown or expired explanation: search or compare again"


def _stored(state: ApiState, key: str) -> StoredExplanation:
    stored = state.explanations.get(key)
    if stored is None:
        raise HTTPException(404, _GONE)
    return stored


@router.get("/explanations/{key}", response_model=ExplanationWithOverlays, summary="A cached explanation")
def get_explanation(request: Request, state: State, key: Key) -> ExplanationWithOverlays:
    stored = _stored(state, key)
    return ExplanationWithOverlays(**stored.explanation.to_dict(), explanation_key=key,
                                   overlays=overlay_urls(api_base(request), key))


def _picture(state: ApiState, picture: Picture) -> Image.Image:
    if picture.upload_sha256 is not None:
        image = state.explanations.upload_picture(picture.upload_sha256)
        if image is None:
            raise HTTPException(404, _GONE)
        return image
    try:
        return display_copy(Image.fromarray(state.catalogue.item_image(picture.item_id, size=DISPLAY_SIZE)))
    except UnknownItemError as exc:
        raise HTTPException(404, f"catalogue item {picture.item_id} no longer exists") from exc
    except ItemImageError as exc:
        raise HTTPException(404, f"the image of catalogue item {picture.item_id} cannot be read") from exc


def _render(state: ApiState, key: str, which: str, alpha: float) -> bytes:
    stored = _stored(state, key)
    side = which[-1]
    picture = _picture(state, stored.a if side == "a" else stored.b)
    heatmap = None if which.startswith("image_") else getattr(stored.explanation, which)
    return render(picture, heatmap, alpha)


@router.get("/explanations/{key}/{which}.png", summary="An overlay PNG (or the photo) of an explained pair",
            response_class=Response, responses={200: {"content": {"image/png": {}}}})
async def explanation_png(
    state: State,
    key: Key,
    which: Which,
    alpha: Annotated[float, Query(ge=0.0, le=1.0, description="Heatmap opacity; 1 = the coloured map alone.")] = 0.5,
) -> Response:
    """``factual_a`` … ``counterfactual_b``: the JET-coloured map blended on the photo (a = the query or first
    image, b = the match or second); ``image_a`` / ``image_b``: the photo itself."""
    png = await state.run_model(_render, state, key, which, alpha)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
