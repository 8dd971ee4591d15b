"""Search by an uploaded photo: /api/similar, with the index's own checkpoint (by look) or the
photo's largest face's identity descriptor (by person, ``identity_of``, as `similar --by person`).

The photo is read in memory, decoded as the indexer decodes, and never kept; its embedding (or
descriptor) is kept for a day under a content hash (``refs``), whose id comes back so that
/api/query can page the same search (``like=``) with a short URL.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile

from facefind.db.errors import FacefindError, ImageError
from facefind.indexer.faces.detect import identity_of
from facefind.retrieval.index import open_predictor
from facefind.retrieval.web.deps import (EXPRESSION, MAX_EXPR, MAX_LIMIT, By, LiveDep, RefsDep, Thresholds, expr_of, model_of,
                                         require_identity, run_query, timing)
from facefind.retrieval.web.errors import REFUSALS, ApiError
from facefind.retrieval.web.guard import MAX_UPLOAD, too_large
from facefind.retrieval.web.live import Live
from facefind.retrieval.web.models import SimilarOut
from facefind.retrieval.web.refs import Reference, reference_key
from facefind.trainer.decode import Unreadable, decode_rgb


NO_FACE = ("no face found in {name}: untick 'Find the face' (detect_face=false) to compare the whole "
           "photo, or use a photo with a clearly visible frontal face")


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
            try:
                pred = predictor.predict_images([rgb], [name], detect_face)[0]
            except ImageError as err:
                if not str(err).startswith("no face found"):
                    raise
                # predict's advice names a CLI flag; a web user has the page's switch (detect_face=false)
                raise ImageError(NO_FACE.format(name=name)) from None
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


CHOICES = ("limit", "detect_face", "thresholds", "by")  # the form fields that are no free text


async def no_empty_choices(request: Request) -> None:
    """FastAPI reads an empty form field as a missing one (its default), and a repeated one as one of
    its values; the schema promises one enum value or integer there, so both are refused."""
    form = await request.form()  # Starlette keeps the parsed form: the route reads this same one
    for name in ("file", "q", *CHOICES):
        if len(form.getlist(name)) > 1:  # FastAPI would take one of them silently
            raise ApiError(400, f"bad {name}: given {len(form.getlist(name))} times; give it once")
    for name in CHOICES:
        if form.get(name) == "":
            raise ApiError(400, f"bad {name}: it is empty; give one of its values, or leave it out for the default")


router = APIRouter(prefix="/api", responses=REFUSALS)


# The photo part's media types, which FastAPI's File() cannot declare (what a fuzzer should send in it)
PHOTO_PART = {"requestBody": {"content": {"multipart/form-data": {"encoding": {
    "file": {"contentType": "image/jpeg, image/png, image/webp, image/bmp"}}}}}}


@router.post("/similar", response_model=SimilarOut, response_model_exclude_unset=True, openapi_extra=PHOTO_PART,
             dependencies=[Depends(no_empty_choices)],
             summary="Search by an uploaded photo (multipart field 'file'), optionally filtered")
def similar(
    live: LiveDep,
    refs: RefsDep,
    photos: Annotated[Embedder, Depends(embedder)],
    response: Response,
    file: Annotated[UploadFile, File(description="A face photo or an aligned crop (JPEG, PNG, WebP, BMP; "
                                     "at most 20 MB)")],
    # Form fields are declared without null (a multipart form has no null), defaulting to the index's own
    q: Annotated[str, Form(max_length=MAX_EXPR, json_schema_extra=EXPRESSION,
                           description="Expression to filter by, as /api/query")] = "",
    limit: Annotated[int, Form(ge=0, le=MAX_LIMIT)] = 60,
    detect_face: Annotated[Literal["auto", "true", "false"], Form(
        description="auto | true | false, as `similar --detect-face`: false embeds the whole photo, for a "
                    "photo where no face is found")] = "auto",
    thresholds: Annotated[Thresholds, Form(description="Threshold set (default: the index's)")] = None,  # type: ignore[assignment]
    by: Annotated[By, Form(description="look | person, as `similar --by`: person ranks by identity "
                           "distance to the photo's largest face (needs `index --identity`)")] = "look",
) -> dict[str, Any]:
    eng = live.engine
    how = by
    if how == "person":
        require_identity(eng)  # before anything is read or loaded
    expr = expr_of(q)
    if expr is not None:
        eng.parse(expr)  # a typo fails before the model loads
    eng.threshold_set(thresholds)  # so does an unknown threshold set
    choice = {"auto": None, "true": True, "false": False}[detect_face]
    name = clean_name(file.filename)
    try:
        data = file.file.read(MAX_UPLOAD + 1)
    finally:
        file.file.close()
    if len(data) > MAX_UPLOAD:
        raise ApiError(413, too_large(MAX_UPLOAD))
    key = reference_key(data, how, choice)
    if how == "person":
        vec = np.asarray(photos.describe(data, name), np.float32)
        ref = {"id": key, "by": how, "name": name}
    else:
        vec, box = photos.embed(live, data, name, choice)
        vec = np.asarray(vec, np.float32)
        ref = {"id": key, "by": how, "name": name, "face_box": box}
    del data
    refs.put(key, Reference(how, vec, model_of(eng)))
    start = time.perf_counter()
    result = run_query(eng, expr, limit=limit, offset=0, thresholds=thresholds,
                       **({"person": vec} if how == "person" else {"like": vec}))
    response.headers["Server-Timing"] = timing(time.perf_counter() - start)
    out = result.to_dict()
    out["reference"] = ref
    return out
