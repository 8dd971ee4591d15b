"""`facefind check`: verify the index (catalog, runs, checkpoints, snapshots, FAISS, files on disk)
and, with --repair, rebuild what is derived. The work is ``facefind.db.check.check_index``.

Exit code 0 when healthy (warnings allowed), 1 with one line per problem otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from facefind.db.paths import default_index_dir
from facefind.retrieval.cli.common import IndexOpt, JsonOpt, guard, index_or_demo_hint, print_json


def check(
    index_dir: IndexOpt = None,
    repair: Annotated[
        bool, typer.Option("--repair", help="Rebuild snapshots and FAISS files, mark dead runs interrupted, "
                           "remove leftovers of interrupted saves. Never deletes an image's row.")
    ] = False,
    prune: Annotated[
        bool, typer.Option("--prune", help="Also forget indexed files that no longer exist on disk (implies --repair).")
    ] = False,
    skip_files: Annotated[
        bool, typer.Option("--skip-files", help="Do not look for indexed files missing from disk (one stat per image).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Verify the index: catalog integrity, runs, model checkpoints, snapshot + FAISS in step, files on disk."""
    from facefind.db.check import check_index  # SQLAlchemy: not at the top, query loads this module

    index_dir = index_or_demo_hint(index_dir)
    folder = Path(index_dir).expanduser() if index_dir is not None else default_index_dir()
    report = check_index(folder, repair=repair, prune=prune, check_files=not skip_files)
    if as_json:
        print_json(report.to_dict())
    else:
        _print_report(report)
    if not report.healthy:
        raise typer.Exit(1)


def _print_report(report: Any) -> None:
    s = report.stats
    counts = ", ".join(f"model {m}: {n:,}" for m, n in (s.get("predictions") or {}).items()) or "none"
    typer.echo(f"index {report.index_dir}: {s.get('images', 0):,} images, predictions {counts}, "
               f"{s.get('failures', 0):,} failures")
    for line in report.repaired:
        typer.echo(f"repaired: {line}")
    for f in report.warnings:
        typer.echo(f"warning: {f.message}{_examples(f)}")
    for f in report.problems:
        typer.echo(f"problem: {f.message}{_examples(f)}")
    if report.healthy:
        typer.echo("healthy" + (f" ({len(report.warnings)} warnings)" if report.warnings else ""))
    else:
        fixable = sum(f.repairable for f in report.problems)
        hint = f"; {fixable} repairable with `facefind check --repair`" if fixable and not report.repaired else ""
        typer.echo(f"{len(report.problems)} problems{hint}")


def _examples(f: Any) -> str:
    if f.count <= 1 or not f.examples:
        return ""
    more = f", ... {f.count - len(f.examples):,} more" if f.count > len(f.examples) else ""
    return " [" + ", ".join(repr(e) for e in f.examples) + more + "]"


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("check", help="Verify the index and, with --repair, rebuild what is derived.")(guard(check))
