"""Rendering an audit (``facefind.retrieval.audit``) for people: rich tables, and a self-contained
HTML report.

The HTML report is the page's Audit view (``web/static/audit.html`` + ``audit.js``) with the JSON
and the script inlined, so the file, the served page and ``--json`` show the same numbers from the
same code. In the file, the bars and cells link to ``BASE/?q=EXPR`` when a base URL is given (a
running ``facefind serve``), else they show their expression on hover.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

STATIC = Path(__file__).parent / "web" / "static"  # audit.html and audit.js, shared with the page


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ids(ids: list[int], n: int = 5) -> str:
    return " ".join(str(i) for i in ids[:n]) + (" ..." if len(ids) > n else "")


def render_tables(report: dict[str, Any], console: Console) -> None:
    """Coverage, one row per attribute, one table per grouping and the largest gaps."""
    cov = report["coverage"]
    splits = cov.get("splits")
    split_text = "" if not splits or not any(splits.values()) else " (" + ", ".join(f"{k} {v:,}" for k, v in splits.items() if v) + ")"
    console.print(f"audit of {cov['entries']:,} of {cov['indexed']:,} entries{split_text}"
                  + (f" where {cov['where']}" if cov.get("where") else "")
                  + f"; {cov['with_labels']:,} carry ground-truth labels; {report['thresholds']} thresholds",
                  highlight=False)
    checked = report["checked_against_labels"]
    if checked:
        wide = console.width >= 150  # precision, recall and the ids need a wide terminal (all are in --json)
        cols = ["attribute", "label", "pred", "acc"] + (["prec", "recall"] if wide else []) + ["F1", "AP", "FN/conf",
                "FP/conf"] + (["first FN ids", "first FP ids"] if wide else [])
        table = Table(title=f"per attribute, against the labels (FN/FP: disagreements / confident ones, margin >= {report['confident_margin']:g} log-odds"
                            + ("; ids: first hits of each disagreement query)" if wide else "; ids: --json)"),
                      box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
        for name in cols:
            table.add_column(name, justify="left" if name == "attribute" or "ids" in name else "right",
                             no_wrap="ids" not in name, overflow="fold")
        for row in report["attributes"]:
            if row["tp"] is None:
                table.add_row(row["attribute"], "-", _f(row["predicted_rate"]), *["-"] * (len(cols) - 3))
                continue
            fn, fp = row["false_negatives"], row["false_positives"]
            cells = [row["attribute"], _f(row["label_rate"]), _f(row["predicted_rate"]), _f(row["accuracy"])]
            cells += [_f(row["precision"]), _f(row["recall"])] if wide else []
            cells += [_f(row["f1"]), _f(row["ap"]), f"{fn['count']:,}/{fn['confident']:,}",
                      f"{fp['count']:,}/{fp['confident']:,}"]
            cells += [_ids(fn["top"]), _ids(fp["top"])] if wide else []
            table.add_row(*cells)
    else:
        table = Table(title="per attribute: predicted positive rate (nothing checked against labels)")
        table.add_column("attribute")
        table.add_column("predicted rate", justify="right")
        table.add_column("predicted", justify="right")
        for row in report["attributes"]:
            table.add_row(row["attribute"], _f(row["predicted_rate"]), f"{row['predicted']['count']:,}")
    console.print(table)
    for block in report["groups"]:
        g0, g1 = block["groups"]
        t = Table(title=f"by {block['by']} ({'by label' if block['source'] == 'label' else 'by prediction: no labels'}): "
                        f"A = {g0['name']} ({g0['entries']:,}), B = {g1['name']} ({g1['entries']:,})",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
        t.add_column("attribute", no_wrap=True)
        cols = ("pred", "TPR", "FPR") if checked else ("pred",)
        for g in "AB":
            for c in cols:
                t.add_column(f"{g} {c}", justify="right", no_wrap=True)
        t.add_column("parity", justify="right", no_wrap=True)
        if checked:
            t.add_column("odds", justify="right", no_wrap=True)
        for a, gap in block["gaps"].items():
            cells = []
            for g in (g0, g1):
                r = g["attributes"][a]
                cells += [_f(r["predicted_rate"])] + ([_f(r["tpr"]), _f(r["fpr"])] if checked else [])
            t.add_row(a, *cells, _f(gap["demographic_parity"]), *([_f(gap["equalized_odds"])] if checked else []))
        console.print(t)
    if report["groups"]:
        console.print("parity: demographic-parity difference (|A pred - B pred|)"
                      + ("; odds: equalized-odds difference (the larger of the TPR and FPR gaps)" if checked else ""),
                      highlight=False)
    if report["largest_gaps"]:
        key = "equalized_odds" if checked else "demographic_parity"
        console.print(f"largest gaps ({key.replace('_', ' ')} difference):", highlight=False)
        for gap in report["largest_gaps"][:5]:
            support = f", over {gap['support']:,} labelled faces in the smaller group" if gap.get("support") is not None else ""
            console.print(f"  {gap['attribute']} by {gap['by']}: {_f(gap[key])} (worse: {gap['worse']}{support}); "
                          f"see `facefind query \"{gap['query']}\"`", highlight=False, markup=False)


def html_report(report: dict[str, Any], base_url: str | None = None) -> str:
    """The self-contained HTML report: the Audit page with its script, styles and data inlined."""
    page = (STATIC / "audit.html").read_text(encoding="utf-8")
    script = (STATIC / "audit.js").read_text(encoding="utf-8")
    style = "\n".join((STATIC / name).read_text(encoding="utf-8") for name in ("style.css", "audit.css"))
    data = json.dumps({"report": report, "base": base_url}, allow_nan=False).replace("</", "<\\/")
    page = page.replace('<link rel="stylesheet" href="/static/style.css">', f"<style>\n{style}\n</style>")
    page = page.replace('<link rel="stylesheet" href="/static/audit.css">\n', "")
    return page.replace('<script src="/static/audit.js"></script>',
                        f"<script>window.AUDIT = {data};</script>\n<script>\n{script.replace('</', '<' + chr(92) + '/')}\n</script>")


def write_html(path: Path, report: dict[str, Any], base_url: str | None = None) -> None:
    path.write_text(html_report(report, base_url), encoding="utf-8")
