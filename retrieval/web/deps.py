"""What the routes share: the server's parts as dependencies (``Depends``), and the rules every
route applies to the same parameters (ids, ``by``, ``like``, expressions).

The parts live on ``app.state`` (``create_app`` puts them there); the dependencies are ``async``
because FastAPI runs a plain ``def`` dependency on a worker thread, and /api/query stays on the
event loop on purpose (see ``routes/search.py``).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Request

from facefind.db.errors import CatalogError
from facefind.retrieval.engine import NO_IDENTITY, Engine, Result
from facefind.retrieval.web.errors import ApiError
from facefind.retrieval.web.live import Live, Source
from facefind.retrieval.web.thumbs import ThumbnailCache

MAX_LIMIT = 1000                # hits per page; /api/export streams everything


async def current_live(request: Request) -> Live:
    """The snapshot generation this request answers from, held for the whole request."""
    return request.app.state.source.current()


async def server_source(request: Request) -> Source:
    return request.app.state.source


async def thumbnail_cache(request: Request) -> ThumbnailCache:
    return request.app.state.thumbs


LiveDep = Annotated[Live, Depends(current_live)]
SourceDep = Annotated[Source, Depends(server_source)]
ThumbsDep = Annotated[ThumbnailCache, Depends(thumbnail_cache)]


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


# What ``like=`` holds for each ``by``: the field of /api/similar's reference, and its dtype. An
# identity descriptor travels as float32, so a person search paged through /api/query measures the
# very distances (and same_person marks at 0.6) of its first page.
_LIKE = {"look": ("embedding", "<f2"), "person": ("descriptor", "<f4")}


def reference(raw: str | None, dim: int, by: str = "look") -> np.ndarray | None:
    """A ``like=`` reference: base64url of the values /api/similar returned (see ``_LIKE``)."""
    if not raw:
        return None
    field, dtype = _LIKE[by]
    size = np.dtype(dtype).itemsize
    hint = f"pass the '{field}' that /api/similar returned" + (" with by=person" if by == "person" else "")
    try:
        data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        raise ApiError(400, f"like= is not base64: {hint}") from None
    if len(data) != size * dim:
        what = "identity descriptors" if by == "person" else "embeddings"
        raise ApiError(400, f"like= holds {len(data) / size:g} values but this index's {what} have {dim}: "
                       f"{hint} for this index")
    vec = np.frombuffer(data, dtype=dtype).astype(np.float32)
    if not np.all(np.isfinite(vec)):
        raise ApiError(400, "like= holds values that are not finite numbers")
    return vec


def encode_reference(vec: np.ndarray, by: str = "look") -> str:
    """The inverse of ``reference``: base64url (no padding) of the values in ``by``'s dtype."""
    return base64.urlsafe_b64encode(np.asarray(vec, dtype=_LIKE[by][1]).tobytes()).decode().rstrip("=")


def ranking_by(raw: str) -> str:
    """``by=``: 'look' or 'person' (any case), as the CLI's ``--by``; a one-line 400 otherwise."""
    choice = raw.strip().lower()
    if choice not in _LIKE:
        raise ApiError(400, f"by must be look or person, not {raw[:40]!r}")
    return choice


def ranking(eng: Engine, by: str, like: str | None, like_id: int | None) -> dict[str, Any]:
    """``Engine.query``'s reference arguments for ``by`` and a ``like``/``like_id`` reference."""
    if like is not None and like_id is not None:
        raise ApiError(400, "give like or like_id, not both")
    if ranking_by(by) == "look":
        return {"like": reference(like, eng.emb.shape[1]), "like_id": like_id}
    if not like and like_id is None:
        raise ApiError(400, "by=person ranks by likeness to a face: give like_id (an indexed image) or "
                       "like (the 'descriptor' of a photo, from /api/similar with by=person)")
    require_identity(eng)
    return {"person": reference(like, eng.identity.shape[1], "person"), "person_id": like_id}


def require_identity(eng: Engine) -> None:
    if eng.identity is None:
        raise CatalogError(NO_IDENTITY)


def run_query(eng: Engine, expr: str | None, *, limit: int, offset: int, thresholds: str | None = None,
              **ref: Any) -> Result:
    """``eng.query`` with a reference from ``ranking`` (like, like_id, person, person_id)."""
    try:
        return eng.query(expr, limit=limit, offset=offset, thresholds=thresholds, **ref)
    except CatalogError as err:
        image_id = ref.get("like_id", ref.get("person_id"))
        if image_id is not None and "not in the index" in str(err):
            raise ApiError(404, f"no image with id {image_id} in the index (like_id)") from None
        raise
