"""What the routes share: the server's parts as dependencies (``Depends``), and the rules every
route applies to the same parameters (ids, ``by``, ``like``, expressions).

The parts live on ``app.state`` (``create_app`` puts them there); the dependencies are ``async``
because FastAPI runs a plain ``def`` dependency on a worker thread, and /api/query stays on the
event loop on purpose (see ``routes/search.py``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, Request

from facefind.db.errors import CatalogError
from facefind.retrieval.engine import NO_IDENTITY, Engine, Result
from facefind.retrieval.web.errors import ApiError
from facefind.retrieval.web.live import Live, Source
from facefind.retrieval.web.refs import EXPIRED, References
from facefind.retrieval.web.thumbs import ThumbnailCache

MAX_LIMIT = 1000                # hits per page; /api/export streams everything
MAX_EXPR = 2000                 # characters of an expression
# The expression's grammar (retrieval/query.py) is no regular language and its names are the index's:
# the document names it as a format of its own, which a fuzzer is taught (tests/contract_hooks.py).
EXPRESSION = {"format": "facefind-expression"}


async def current_live(request: Request) -> Live:
    """The snapshot generation this request answers from, held for the whole request."""
    return request.app.state.source.current()


async def server_source(request: Request) -> Source:
    return request.app.state.source


async def thumbnail_cache(request: Request) -> ThumbnailCache:
    return request.app.state.thumbs


async def upload_references(request: Request) -> References:
    return request.app.state.references


LiveDep = Annotated[Live, Depends(current_live)]
SourceDep = Annotated[Source, Depends(server_source)]
ThumbsDep = Annotated[ThumbnailCache, Depends(thumbnail_cache)]
RefsDep = Annotated[References, Depends(upload_references)]


# ------------------------------------------------------------------------------------ parameters


def parse_id(raw: str) -> int:
    """A catalog id from a URL segment: plain decimal digits only, else 404 (nothing names a file)."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise ApiError(404, f"no image with id {raw[:40]!r}: ids are the numbers /api/query returns")
    return int(raw)


def expr_of(q: str | None) -> str | None:
    return q if q is not None and q.strip() else None


def timing(seconds: float) -> str:
    """A ``Server-Timing`` value: the engine's own time, beside which a client sees HTTP's cost."""
    return f"engine;dur={seconds * 1e3:.3f}"


By = Literal["look", "person"]
Thresholds = Literal["accuracy", "f1"]  # engine.THRESHOLD_SETS; a set this index lacks falls back, with a warning
CONFLICT = "give like or like_id, not both"
NO_REFERENCE = ("by=person ranks by likeness to a face: give like_id (an indexed image) or like (the "
                "'reference' of a photo, from /api/similar with by=person)")


def reference(refs: References, key: str, eng: Engine, by: str) -> np.ndarray:
    """The vector an upload's reference names (``like=``), for ranking ``by``; 404 once expired."""
    ref = refs.get(key)
    if ref is None:
        raise ApiError(404, EXPIRED)
    if ref.by != by:
        raise ApiError(409, f"like= names a photo searched by {ref.by}: search by the photo again "
                       f"with by={by}, or page it with by={ref.by}")
    dim = eng.identity.shape[1] if by == "person" else eng.emb.shape[1]
    if ref.vector.shape[0] != dim or (by == "look" and ref.model != model_of(eng)):
        raise ApiError(404, "this photo search was made with another model than the index now serves: "
                       "search by the photo again")
    return ref.vector


def model_of(eng: Engine) -> str:
    """What a look embedding depends on: the snapshot's model."""
    return str(eng.snapshot.sha256 or eng.snapshot.model_id)


def ranking(eng: Engine, refs: References, by: str, like: str | None, like_id: int | None) -> dict[str, Any]:
    """``Engine.query``'s reference arguments for ``by`` and a ``like``/``like_id`` reference.

    Rules the OpenAPI document cannot state (they join two parameters) answer 409, documented there.
    """
    if like is not None and like_id is not None:
        raise ApiError(409, CONFLICT)
    if by == "person":
        if like is None and like_id is None:
            raise ApiError(409, NO_REFERENCE)
        require_identity(eng)
    vec = reference(refs, like, eng, by) if like is not None else None
    if by == "look":
        return {"like": vec, "like_id": like_id}
    return {"person": vec, "person_id": like_id}


def require_identity(eng: Engine) -> None:
    """409: the index holds no identity descriptors (the request is fine; the index is not built for it)."""
    if eng.identity is None:
        raise ApiError(409, NO_IDENTITY)


def run_query(eng: Engine, expr: str | None, *, limit: int, offset: int, thresholds: str | None = None,
              **ref: Any) -> Result:
    """``eng.query`` with a reference from ``ranking`` (like, like_id, person, person_id)."""
    try:
        return eng.query(expr, limit=limit, offset=offset, thresholds=thresholds, **ref)
    except CatalogError as err:
        image_id = ref.get("like_id", ref.get("person_id"))
        if image_id is not None and "not in the index" in str(err):
            raise ApiError(404, f"no image with id {image_id} in the index (like_id)") from None
        if image_id is not None and "no identity descriptor" in str(err):
            raise ApiError(409, str(err).splitlines()[0]) from None
        raise
