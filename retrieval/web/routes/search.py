"""Search: /api/query (one page, the shape of `facefind query --json`) and /api/export (every match,
streamed). ``by=look|person`` is the CLI's ``--by``: rank by the model's embedding, or by dlib
identity distance (an index built with ``index --identity``; hits then carry ``distance`` and
``same_person``). Each query answer carries ``Server-Timing: engine;dur=MS``, the engine's own time.
"""

from __future__ import annotations

import csv
import io
import time
from typing import Annotated, Any, Iterator, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import StreamingResponse
from pydantic_core import to_json

from facefind.retrieval.engine import Engine, Result
from facefind.retrieval.web.deps import (EXPRESSION, MAX_EXPR, MAX_LIMIT, By, LiveDep, RefsDep, Thresholds, expr_of, ranking,
                                         run_query, timing)
from facefind.retrieval.web.errors import REFUSALS
from facefind.retrieval.web.refs import REF_PATTERN
from facefind.retrieval.web.models import QueryOut

EXPORT_PAGE = 2000              # hits per engine call while exporting

router = APIRouter(prefix="/api", responses=REFUSALS)

ThresholdsParam = Annotated[Thresholds | None, Query(description="Threshold set bare names use (default: "
                                                     "the index's), as `query --thresholds`")]
ExprParam = Annotated[str | None, Query(max_length=MAX_EXPR, json_schema_extra=EXPRESSION, description='Expression, e.g. "Eyeglasses and not '
                                        'Male" or "Young > 0.2"; empty: all')]
LikeIdParam = Annotated[int | None, Query(ge=0, le=2**62, description="Rank by similarity to this indexed "
                                          "image (not with like)")]
LikeParam = Annotated[str | None, Query(pattern=REF_PATTERN, description="Rank by similarity to an uploaded "
                                        "photo: the `reference.id` /api/similar returned, kept for a day "
                                        "(not with like_id)")]
ByParam = Annotated[By, Query(description="look: rank by the model's embedding; person: by identity "
                              "distance (needs `index --identity` and like or like_id), as `query --by`")]


# The query runs on the event loop itself: on the shared 2-core machine, handing it to a worker
# thread cost ~10 ms per request of waiting for a core (HTTP - engine p50 13 ms vs 1.4 ms
# inline), more than filter + rank take. Thumbnails, files, uploads and exports stay on threads.
@router.get("/query", response_model=QueryOut, response_model_exclude_unset=True,
            summary="Filter by an expression and rank: the shape of `facefind query --json`")
async def query(
    live: LiveDep,
    refs: RefsDep,
    response: Response,
    q: ExprParam = None,
    limit: Annotated[int, Query(ge=0, le=MAX_LIMIT)] = 60,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    like_id: LikeIdParam = None,
    like: LikeParam = None,
    by: ByParam = "look",
    with_quality: Annotated[bool, Query(alias="eval", description="Add `--eval`'s quality block when the "
                                        "index holds labels")] = True,
    thresholds: ThresholdsParam = None,
) -> dict[str, Any]:
    eng = live.engine
    ref = ranking(eng, refs, by, like, like_id)
    start = time.perf_counter()
    result = run_query(eng, expr_of(q), limit=limit, offset=offset, thresholds=thresholds, **ref)
    response.headers["Server-Timing"] = timing(time.perf_counter() - start)
    out = result.to_dict()
    if with_quality:
        quality = live.quality(result)
        if quality is not None:
            out["quality"] = quality.to_dict()
    return out


@router.get("/export", response_class=StreamingResponse,
            responses={200: {"content": {"text/csv": {}, "application/json": {}, "text/plain": {}},
                             "description": "Every match, as an attachment; X-Total-Count: how many"}},
            summary="All matches, streamed as csv, json or paths")
def export(
    live: LiveDep,
    refs: RefsDep,
    q: ExprParam = None,
    format: Annotated[Literal["csv", "json", "paths"], Query()] = "csv",
    like_id: LikeIdParam = None,
    like: LikeParam = None,
    thresholds: ThresholdsParam = None,
    by: ByParam = "look",
) -> StreamingResponse:
    eng = live.engine  # held for the whole export: one consistent generation
    ref = ranking(eng, refs, by, like, like_id)
    expr = expr_of(q)
    first = run_query(eng, expr, limit=EXPORT_PAGE, offset=0, thresholds=thresholds, **ref)
    media = {"csv": "text/csv; charset=utf-8", "json": "application/json",
             "paths": "text/plain; charset=utf-8"}[format]
    name = "facefind-export." + {"csv": "csv", "json": "json", "paths": "txt"}[format]
    return StreamingResponse(
        export_chunks(eng, first, format, expr, ref, first.thresholds), media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{name}"', "X-Total-Count": str(first.total)})


def export_chunks(eng: Engine, first: Result, fmt: str, expr: str | None, ref: dict[str, Any],
                  thresholds: str | None) -> Iterator[bytes]:
    """The export body, one page of hits at a time (the engine is asked again for each page)."""
    names = list(eng.attributes)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["rank", "id", "path", "score", "matched", *names])
    elif fmt == "json":
        head = {k: v for k, v in first.to_dict().items() if k != "hits"}
        yield to_json(head, inf_nan_mode="null")[:-1] + b',"hits":['  # one serialiser for head and hits
    page, offset, rank = first, 0, 0
    while True:
        if fmt == "csv":
            for h in page.hits:
                rank += 1
                writer.writerow([rank, h.id, h.path, repr(h.score), "; ".join(h.matched),
                                 *(repr(h.attributes[a]) for a in names)])
            chunk = buf.getvalue()
            buf.seek(0)
            buf.truncate()
            yield chunk.encode()
        elif fmt == "json":
            parts = b",".join(to_json(h.to_dict(), inf_nan_mode="null") for h in page.hits)
            yield (b"," if offset and parts else b"") + parts
        else:
            yield "".join(h.path + "\n" for h in page.hits).encode("utf-8", "surrogateescape")
        offset += len(page.hits)
        if offset >= first.total or not page.hits:
            break
        page = eng.query(expr, limit=EXPORT_PAGE, offset=offset, thresholds=thresholds, **ref)
    if fmt == "json":
        yield b"]}\n"
