"""`facefind serve`'s HTTP layer: a FastAPI app over one long-lived ``Engine``.

Every endpoint is a thin wrapper around the library calls the CLI makes (``Engine.query``,
``Result.to_dict``, ``Engine.same_file``, ``Engine.evaluate_quality``, the indexer's reader, the
index's own checkpoint, ``identity_of`` for identity), so the page and ``facefind query --json`` can
never disagree. One router per concern, each route taking the snapshot and server parts as
dependencies (``deps``):

- ``routes/page.py``: the search page and the model page (and /static, mounted here)
- ``routes/search.py``: /api/query and /api/export
- ``routes/images.py``: /api/images/{id}, its thumbnail and its file
- ``routes/upload.py``: /api/similar, search by an uploaded photo
- ``routes/index.py``: /api/attributes, /api/info, /api/model
- ``routes/people.py``: /api/people (the People view) and /api/people/of/{id}

``guard.Guard`` checks Host or token, caps request bodies and adds the security headers;
``errors`` makes every failure one line of JSON. No endpoint writes to the index (the thumbnail
cache is a separate folder of derived files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles

from facefind.db.paths import default_index_dir
from facefind.retrieval.web.routes import audit, images, index, page, people, search, upload
from facefind.retrieval.web.errors import add_error_handlers
from facefind.retrieval.web.guard import MAX_UPLOAD, Guard
from facefind.retrieval.web.live import LiveIndex, Source
from facefind.retrieval.web.refs import References
from facefind.retrieval.web.routes.page import STATIC
from facefind.retrieval.web.routes.upload import Embedder
from facefind.retrieval.web.thumbs import ThumbnailCache, Warmer, default_cache_folder

__all__ = ["MAX_UPLOAD", "create_app"]

WARM_WAIT = 30.0  # seconds create_app waits for the first view's thumbnails before serving anyway


def create_app(index_dir: Path | None = None, *, source: Source | None = None, token: str | None = None,
               thumbs_dir: Path | None = None, device: str = "auto", check_every: float = 1.0) -> FastAPI:
    """The facefind web app over ``index_dir`` (default: the default index), or over ``source``
    (e.g. a ``FixedIndex`` over an in-memory engine: no catalog, no uploads, no reloads).

    Opens the index now, so a missing or empty one fails here with its one-line CatalogError.
    """
    if source is None:
        index_dir = Path(index_dir).expanduser() if index_dir is not None else default_index_dir()
        source = LiveIndex(index_dir, check_every=check_every)
    app = FastAPI(title="facefind", version="0.1.0",
                  description="Search faces by attributes and by example. The JSON shapes are those of "
                              "`facefind query --json`. Every refusal is `{\"error\": one line}`; without "
                              "a token only localhost is answered (403), with one every request needs "
                              "it (401); request bodies over 20 MB get 413.")
    app.state.source = source  # what the dependencies in ``deps`` and the routers hand to routes
    app.state.thumbs = ThumbnailCache(thumbs_dir or default_cache_folder(index_dir))
    # The first view's thumbnails (thumbs.Warmer): made before the server answers anyone (at most
    # WARM_WAIT s; found on disk after a restart), then again in the background after each publish.
    app.state.warmer = Warmer(app.state.thumbs)
    app.state.warmer.start(source.current().engine).join(WARM_WAIT)
    if isinstance(source, LiveIndex):
        source.on_publish.append(lambda live: app.state.warmer.start(live.engine))
    app.state.references = References()
    app.state.embedder = Embedder(device)
    app.state.token_required = token is not None
    app.state.model_reports = {}
    app.add_middleware(Guard, token=token, max_body=MAX_UPLOAD)
    add_error_handlers(app)
    for module in (page, search, images, upload, index, audit, people):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.openapi = lambda: _contract(app)  # type: ignore[method-assign]
    return app


def _contract(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document less the 422 it adds to every route: this server never sends one
    (a parameter out of its schema is a one-line 400, declared with the other refusals)."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for item in doc.get("paths", {}).values():
            for operation in item.values():
                operation.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = doc
    return app.openapi_schema
