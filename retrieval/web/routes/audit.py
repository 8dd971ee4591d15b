"""The audit: /api/audit (the JSON of `facefind audit --json`) and the Audit page (/audit).

The page is ``static/audit.html`` + ``audit.js``, which draw /api/audit's answer: per-attribute
bars and a heatmap of attribute x group gaps, each a link to the search page's query for those
faces. ``facefind audit --html`` inlines the same page, script and answer into one file.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel

from facefind.retrieval.audit import DEFAULT_BY, parse_by, run_audit
from facefind.retrieval.web.deps import LiveDep, expr_of
from facefind.retrieval.web.errors import REFUSALS
from facefind.retrieval.web.routes.page import STATIC

router = APIRouter(responses=REFUSALS)


class AuditOut(BaseModel):
    """The audit report (``facefind.retrieval.audit.Audit.to_dict``); every count that stands for
    faces is ``{"count": n, "query": EXPR}``."""

    coverage: dict[str, Any]
    thresholds: str
    confident_margin: float
    checked_against_labels: bool
    warnings: list[str]
    attributes: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    largest_gaps: list[dict[str, Any]]


# A plain def: a report over a large index takes up to a second, so it runs on a worker thread
# instead of holding up the event loop (and every /api/query behind it). The default report is
# kept with the snapshot generation; other parameters are computed per request.
@router.get("/api/audit", response_model=AuditOut, summary="Labels beside predictions: the JSON of "
            "`facefind audit --json`")
def audit(
    live: LiveDep,
    where: Annotated[str | None, Query(description="Audit only entries matching this expression, as `audit --where`")] = None,
    by: Annotated[str, Query(description="Comma-separated attributes to group by; 'none': no groups")] = ",".join(DEFAULT_BY),
    thresholds: Annotated[str | None, Query(description="f1 | accuracy (default: the index's)")] = None,
    top: Annotated[int, Query(ge=0, le=100, description="Disagreement ids listed each way")] = 10,
) -> dict[str, Any]:
    names = parse_by(by)
    where = expr_of(where)

    def make() -> dict[str, Any]:
        return run_audit(live.engine, where=where, by=names, thresholds=thresholds, top=top).to_dict()

    if where is None and names == list(DEFAULT_BY) and thresholds is None and top == 10:
        return live.once("audit", make)
    return make()


@router.get("/audit", include_in_schema=False)
def audit_page() -> FileResponse:
    return FileResponse(STATIC / "audit.html", media_type="text/html", headers={"Cache-Control": "no-cache"})
