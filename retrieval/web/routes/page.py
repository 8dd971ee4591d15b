"""The search page and the model page (static HTML; the JSON API fills them in)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

STATIC = Path(__file__).parents[1] / "static"  # retrieval/web/static

router = APIRouter(include_in_schema=False)


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/")
def page() -> FileResponse:
    return _page("index.html")


@router.get("/model")
def model_page() -> FileResponse:
    return _page("model.html")


@router.get("/favicon.ico")
def favicon() -> Response:
    return Response(status_code=204)
