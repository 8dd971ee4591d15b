"""Search by an uploaded photo: /api/similar, with the index's own checkpoint (by look) or the
photo's largest face's identity descriptor (by person, ``identity_of``, as `similar --by person`).

The photo is read in memory, decoded as the indexer decodes, and never kept; the reference comes
back so that /api/query can page the same search (``like=``).
"""

from __future__ import annotations

import re
import threading
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile

from facefind.db.errors import FacefindError, ImageError
from facefind.indexer.faces.detect import identity_of
from facefind.retrieval.index import open_predictor
from facefind.retrieval.web.deps import (MAX_LIMIT, LiveDep, encode_reference, expr_of, ranking_by,
                                         require_identity, run_query, timing)
from facefind.retrieval.web.errors import REFUSALS, ApiError
from facefind.retrieval.web.guard import MAX_UPLOAD, too_large
from facefind.retrieval.web.live import Live
from facefind.retrieval.web.models import SimilarOut
from facefind.trainer.decode import Unreadable, decode_rgb


class Embedder:
    """The index's own checkpoint, loaded on the first upload and kept (one inference at a time)."""

    def __init__(self, device: str = "auto") -> None:
        self.device = device
        self._lock = threading.Lock()
        self._predictor: Any = None
        self._sha: str | None = None

    def embed(self, live: Live, data: bytes, name: str, detect_face: bool | None) -> tuple[np.ndarray, list[int] | None]:
        """(unit embedding, face box or None) of an uploaded photo; ImageError with predict's reason."""
        if live.opened is None:
            raise FacefindError("this server has no model to embed photos with (an in-memory index)")
        rgb = decode_upload(data, name)
        with self._lock:
            predictor = self._load(live)
            pred = predictor.predict_images([rgb], [name], detect_face)[0]
        return pred.embedding, [int(v) for v in pred.face_box] if pred.face_box is not None else None

    def describe(self, data: bytes, name: str) -> np.ndarray:
        """The identity descriptor of an uploaded photo's largest face (what the CLI's ``--by person``
        computes; dlib, no torch); ImageError when no face is found."""
        rgb = decode_upload(data, name)
        with self._lock:  # dlib's detector and models are shared: one photo at a time
            found = identity_of(rgb)
        if found is None:
            raise ImageError(f"no face found in {name}: by=person needs a clearly visible face "
                             "(rank by look to compare whole images)")
        return found

    def _load(self, live: Live) -> Any:
        path = live.opened.checkpoint()  # verified against the snapshot's sha256
        sha = live.engine.snapshot.sha256 or str(path)
        if self._predictor is None or self._sha != sha:
            self._predictor = open_predictor(path, self.device)
            self._sha = sha
        return self._predictor


def decode_upload(data: bytes, name: str) -> np.ndarray:
    """An upload's RGB pixels, decoded as the indexer does; ImageError with predict's reason."""
    try:
        return decode_rgb(data)
    except Unreadable as err:  # the reason `facefind predict` gives for the same bytes
        raise ImageError(f"cannot read image {name}: {err}") from None


def clean_name(name: str | None) -> str:
    """An upload's file name to show: its last path part, printable, at most 120 characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable())[:120]
    return base or "upload"


async def embedder(request: Request) -> Embedder:
    return request.app.state.embedder


router = APIRouter(prefix="/api", responses=REFUSALS)


@router.post("/similar", response_model=SimilarOut, response_model_exclude_unset=True,
             summary="Search by an uploaded photo (multipart field 'file'), optionally filtered")
def similar(
    live: LiveDep,
    photos: Annotated[Embedder, Depends(embedder)],
    response: Response,
    file: Annotated[UploadFile, File(description="A face photo or an aligned crop (at most 20 MB)")],
    q: Annotated[str | None, Form()] = None,
    limit: Annotated[int, Form(ge=0, le=MAX_LIMIT)] = 60,
    detect_face: Annotated[str, Form(description="auto | true | false, as `similar --detect-face`")] = "auto",
    thresholds: Annotated[str | None, Form(description="f1 | accuracy (default: the index's)")] = None,
    by: Annotated[str, Form(description="look | person, as `similar --by`: person ranks by identity "
                            "distance to the photo's largest face (needs `index --identity`)")] = "look",
) -> dict[str, Any]:
    eng = live.engine
    how = ranking_by(by)
    if how == "person":
        require_identity(eng)  # before anything is read or loaded
    expr = expr_of(q)
    if expr is not None:
        eng.parse(expr)  # a typo fails before the model loads
    eng.threshold_set(thresholds)  # so does an unknown threshold set
    choice = {"auto": None, "true": True, "false": False}.get(detect_face.lower(), "bad")
    if choice == "bad":
        raise ApiError(400, "detect_face must be auto, true or false")
    name = clean_name(file.filename)
    try:
        data = file.file.read(MAX_UPLOAD + 1)
    finally:
        file.file.close()
    if len(data) > MAX_UPLOAD:
        raise ApiError(413, too_large(MAX_UPLOAD))
    if how == "person":
        vec = photos.describe(data, name)
        ref = {"name": name, "descriptor": encode_reference(vec, "person")}
    else:
        vec, box = photos.embed(live, data, name, choice)  # type: ignore[arg-type]
        ref = {"name": name, "embedding": encode_reference(vec), "face_box": box}
    del data
    start = time.perf_counter()
    result = run_query(eng, expr, limit=limit, offset=0, thresholds=thresholds,
                       **({"person": vec} if how == "person" else {"like": vec}))
    response.headers["Server-Timing"] = timing(time.perf_counter() - start)
    out = result.to_dict()
    out["reference"] = ref
    return out
