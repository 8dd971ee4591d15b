"""`facefind audit`: ground-truth labels beside predictions, label errors first, subgroup gaps.

The work is ``facefind.retrieval.audit.run_audit`` over the index's snapshot (no model, no torch);
this module parses options and renders (``facefind.retrieval.audit_report``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from facefind.db.errors import FacefindError
from facefind.retrieval.audit import DEFAULT_BY, parse_by, run_audit
from facefind.retrieval.audit_report import render_tables, write_html
from facefind.retrieval.cli.common import IndexOpt, JsonOpt, guard, print_json
from facefind.retrieval.cli.query import ThresholdsOpt
from facefind.retrieval.index import open_index


def audit(
    index: IndexOpt = None,
    where: Annotated[str | None, typer.Option("--where", help="Audit only the entries matching this expression, "
                                              "e.g. 'split:val' or 'not split:train and label:Male'.",
                                              show_default=False)] = None,
    by: Annotated[str, typer.Option("--by", help="Comma-separated attributes to compare groups by (each: A and "
                                    "not A, by label where labels exist, else by prediction); 'none': no groups.")]
        = ",".join(DEFAULT_BY),
    thresholds: ThresholdsOpt = None,
    top: Annotated[int, typer.Option("--top", min=0, help="Disagreement ids listed each way per attribute.")] = 10,
    html: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained HTML report with charts.",
                                              show_default=False)] = None,
    base_url: Annotated[str | None, typer.Option(
        "--base-url", help="With --html: link each bar and cell to this `facefind serve` page, e.g. "
        "http://127.0.0.1:8000.", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check predictions against the ground-truth labels: per-attribute metrics, the confident
    disagreements (likeliest label errors first) and the gaps between groups."""
    if base_url is not None and html is None:
        raise FacefindError("--base-url only applies to --html: add --html FILE")
    with open_index(index) as idx:
        report = run_audit(idx.engine, where=where, by=parse_by(by), thresholds=thresholds, top=top).to_dict()
    if html is not None:
        write_html(html, report, base_url.rstrip("/") if base_url else None)
        typer.echo(f"report: {html}", err=True)
    for warning in report["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    if as_json:
        print_json(report)
        return
    render_tables(report, Console())


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("audit", help="Check predictions against the labels: metrics, likeliest label errors, group gaps.")(
        guard(audit))
