"""`facefind demo`: the whole system on synthetic faces, with progress for every step."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from facefind.retrieval.cli.common import DeviceOpt, ThreadsOpt, guard, use_threads

if TYPE_CHECKING:
    from facefind.retrieval.demo import DemoReport


def demo(
    folder: Annotated[Path, typer.Option("--dir", help="Work folder for faces, model, index and galleries.")] = Path("facefind-demo"),
    n: Annotated[int, typer.Option("--n", help="Synthetic faces to make (at least 200).")] = 2000,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Training epochs for the demo model.")] = 20,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
) -> None:
    """Run everything on synthetic faces: make them, train a small CNN, index, query, write galleries.

    No dataset, server or download is needed. A second run reuses what the first one made.
    """
    from facefind.retrieval.demo import run_demo  # torch: query loads this module

    use_threads(threads)
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"), TimeRemainingColumn(), console=console, transient=True,
    ) as bars:
        tasks: dict[str, Any] = {}

        def on_event(step: str, event: Any) -> None:
            done, total, note = _progress_of(step, event, n)
            if step not in tasks:
                tasks[step] = bars.add_task(step, total=total, note="")
            bars.update(tasks[step], completed=done, total=total, note=note)

        report = run_demo(folder, n=n, epochs=epochs, device=device, progress=on_event)
    print_report(report)


def print_report(report: DemoReport) -> None:
    """What each step did, the queries' results, and the commands to go further, on stdout."""
    from facefind.retrieval.demo import DEMO_QUERIES  # torch: query loads this module

    # soft_wrap: lines longer than the terminal are left for it to wrap, so that paths and commands
    # copied from the output are whole (a console wraps lines with newlines of its own otherwise).
    out = Console(soft_wrap=True)
    for step in report.steps:
        out.print(f"[bold]{step.name:<7}[/bold] {step.seconds:6.1f} s  {'(reused) ' if step.reused else ''}"
                  f"{escape(_shorten(step.detail, report.folder))}", highlight=False)
    for expr, result, quality in zip(DEMO_QUERIES, report.queries, report.quality):
        _print_result(out, f'query "{expr}"', result)
        truly = round((quality.base_rate or 0.0) * quality.n_labelled)
        out.print(f"  against the labels: {quality.relevant} of these {quality.k} truly match; "
                  f"{truly:,} of {quality.n_labelled:,} faces do", highlight=False)
    if report.similar is not None:
        _print_result(out, f"similar {escape(_shown(report.similar_to))}", report.similar)
    out.print(f"\ngalleries: {escape(', '.join(_shown(g) for g in report.galleries))}", highlight=False)
    out.print(f"total {report.seconds:.1f} s. Go further with the demo's index and model:", highlight=False)
    for line in go_further(report):
        typer.echo(f"  {line}")


def go_further(report: DemoReport) -> list[str]:
    """Commands to try next on what the demo made, each one line to paste as it is."""
    index, model, photo = _shown(report.index), _shown(report.model), _shown(report.similar_to)
    env = f"FACEFIND_INDEX={shlex.quote(index)}"
    return [
        f'{env} facefind query "Eyeglasses and Smiling > 0.8" --gallery eyeglasses.html',
        f'{env} facefind similar {shlex.quote(photo)} --where "not Male"',
        f"facefind predict {shlex.quote(photo)} --model {shlex.quote(model)}",
        f"facefind evaluate {shlex.quote(model)} {shlex.quote(_shown(report.faces))} --split test",
        f"{env} facefind info",
        f"facefind serve --index {shlex.quote(index)}   # then open the URL it prints",
    ]


def _shown(path: Path | None) -> str:
    """``path`` relative to the current folder when it lies inside it (short, and it pastes there)."""
    if path is None:
        return ""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _shorten(text: str, folder: Path) -> str:
    """``text`` with the demo folder's absolute path written as ``_shown`` writes it."""
    return text.replace(str(folder), _shown(folder))


def _progress_of(step: str, event: Any, n: int) -> tuple[int, int, str]:
    if step == "faces":
        return int(event), n, ""
    if step == "index":
        return int(event[0]), int(event[1]), ""
    # training: a facefind.trainer.fit.FitEvent
    if event.kind == "cache":
        return event.done, event.total, "decoding"
    note = f"epoch {event.epoch}/{event.epochs}"
    if event.loss is not None:
        note += f" loss {event.loss:.3f}"
    if event.images_per_s:
        note += f" {event.images_per_s:,.0f} img/s"
    return event.step, max(event.steps, 1), note


def _print_result(out: Console, title: str, result: Any) -> None:
    top = f", the top {len(result.hits)}" if len(result.hits) < result.total else ""
    out.print(f"\n[bold]{title}[/bold]: {result.total:,} of {result.n_indexed:,} images match{top}", highlight=False)
    table = Table("rank", "score", "path", "matched")
    for rank, hit in enumerate(result.hits, start=result.offset + 1):
        table.add_row(str(rank), f"{hit.score:.3f}", Path(hit.path).name, ", ".join(hit.matched))
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("demo")(guard(demo))
