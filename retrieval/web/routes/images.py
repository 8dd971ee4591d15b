"""One entry by catalog id: its details, its thumbnail (made once and cached), and its file.

Files are looked up by catalog id only: an id is plain decimal digits, anything else is a 404.
"""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import FileResponse, Response

from facefind.db.errors import CatalogError
from facefind.retrieval.web.deps import EXPRESSION, MAX_EXPR, LiveDep, Thresholds, ThumbsDep, expr_of, parse_id
from facefind.retrieval.web.errors import REFUSALS, ApiError
from facefind.retrieval.web.live import Live
from facefind.retrieval.web.models import ImageOut
from facefind.retrieval.web.thumbs import SourceGone, identity

MEDIA = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
         ".bmp": "image/bmp", ".gif": "image/gif"}

router = APIRouter(prefix="/api/images", responses=REFUSALS)

# Ids are plain decimal digits (the schema says so); anything else is still a one-line 404 (parse_id)
ImageId = Annotated[str, Path(pattern=r"^[0-9]{1,18}$", description="A catalog id, as /api/query returns")]


@router.get("/{image_id}", response_model=ImageOut, response_model_exclude_unset=True,
            summary="One entry: path, face and box, probabilities, matched literals, labels, and every "
                    "face of the same file")
async def image(live: LiveDep, image_id: ImageId,
                q: Annotated[str | None, Query(max_length=MAX_EXPR, json_schema_extra=EXPRESSION, description="Expression whose literals "
                                               "`matched` lists, as /api/query")] = None,
                thresholds: Annotated[Thresholds | None, Query(description="Threshold set (default: "
                                                               "the index's)")] = None,
                ) -> dict[str, Any]:  # on the event loop: see routes/index.py: attributes
    eng = live.engine
    node = eng.parse(q) if expr_of(q) is not None else None
    used = eng.threshold_set(thresholds)
    try:
        hit = eng.describe(parse_id(image_id), node, used)
        same = eng.same_file(hit.id)
    except CatalogError:
        raise ApiError(404, f"no image with id {image_id} in the index") from None
    out = hit.to_dict()
    # The photo view: every face of this entry's file, by face number (a whole-file entry: itself).
    out["faces"] = [{"id": i, "face": face, "box": None if box is None else list(box)} for i, face, box in same]
    del out["score"]
    out["threshold_set"] = used
    out["thresholds"] = dict(zip(eng.attributes, eng.threshold_sets[used].tolist()))
    out["present"] = [a for a, p in hit.attributes.items() if p >= out["thresholds"][a]]
    labels = live.labels
    out["labels"] = labels.of(hit.id) if labels is not None else None
    return out


def _entry(live: Live, image_id: str) -> tuple[str, tuple[int, int, int, int] | None]:
    """The file of an indexed id and its face's box (None: the entry is the whole file)."""
    eng = live.engine
    pos, found = eng.positions(np.array([parse_id(image_id)]))
    if not found[0]:
        raise ApiError(404, f"no image with id {image_id} in the index")
    return eng.snapshot.paths[int(pos[0])], eng.snapshot.face(int(pos[0]))[1]


# Thumbnails and files stay on worker threads: they read (and may make) files.
@router.get("/{image_id}/thumb", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}, "description": "A JPEG"},
                       304: {"description": "Not modified: the If-None-Match ETag is still this thumbnail's"}},
            summary="A small JPEG of the face (a photo's face: cut out), made once and cached")
def thumb(live: LiveDep, thumbs: ThumbsDep, image_id: ImageId, request: Request) -> Response:
    path, box = _entry(live, image_id)
    try:
        t = thumbs.get(path, box)
    except SourceGone as err:
        raise ApiError(404, f"image {image_id} cannot be shown: {err}") from None
    etag = f'"{t.etag}"'
    headers = {"Cache-Control": "private, max-age=86400", "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    if t.path is not None:
        return FileResponse(t.path, media_type="image/jpeg", headers=headers)
    return Response(t.data, media_type="image/jpeg", headers=headers)


@router.get("/{image_id}/full", response_class=FileResponse,
            responses={200: {"content": {"image/*": {}}, "description": "The image file"}},
            summary="The image file itself, as the catalog holds it")
def full(live: LiveDep, image_id: ImageId) -> FileResponse:
    path = _entry(live, image_id)[0]
    try:
        identity(path)
    except SourceGone as err:
        raise ApiError(404, f"image {image_id} cannot be shown: {err}") from None
    media = MEDIA.get(FilePath(path).suffix.lower(), "application/octet-stream")
    return FileResponse(path, media_type=media, headers={"Cache-Control": "private, max-age=3600"},
                        content_disposition_type="inline")
