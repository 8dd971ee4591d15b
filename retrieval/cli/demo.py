"""`facefind demo`: the whole system on synthetic faces, with progress for every step."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from facefind.retrieval.cli.common import DeviceOpt, ThreadsOpt, guard, use_threads


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
    from facefind.retrieval.demo import DEMO_QUERIES, run_demo  # torch: query loads this module

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

    out = Console()
    for step in report.steps:
        out.print(f"[bold]{step.name:<7}[/bold] {step.seconds:6.1f} s  {'(reused) ' if step.reused else ''}{step.detail}")
    for expr, result, quality in zip(DEMO_QUERIES, report.queries, report.quality):
        _print_result(out, f'query "{expr}"', result)
        truly = round((quality.base_rate or 0.0) * quality.n_labelled)
        out.print(f"  against the labels: {quality.relevant} of these {quality.k} truly match; "
                  f"{truly:,} of {quality.n_labelled:,} faces do", highlight=False)
    if report.similar is not None:
        _print_result(out, f"similar {report.similar_to}", report.similar)
    out.print(f"\ngalleries: {', '.join(str(g) for g in report.galleries)}")
    out.print(f"total {report.seconds:.1f} s. Go further with the demo's index and model:")
    env = f"FACEFIND_INDEX={report.index}"
    for line in (
        f'{env} facefind query "Eyeglasses and Smiling > 0.8" --gallery eyeglasses.html',
        f"{env} facefind similar {report.similar_to} --where \"not Male\"",
        f"facefind predict {report.similar_to} --model {report.model}",
        f"facefind evaluate {report.model} {report.faces} --split test",
        f"{env} facefind info",
        f"facefind serve --index {report.index}   # then open the URL it prints",
    ):
        out.print(f"  {line}", markup=False, highlight=False)


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
    out.print(f"\n[bold]{title}[/bold]: {result.total:,} of {result.n_indexed:,} images match")
    table = Table("rank", "score", "path", "matched")
    for rank, hit in enumerate(result.hits, start=result.offset + 1):
        table.add_row(str(rank), f"{hit.score:.3f}", Path(hit.path).name, ", ".join(hit.matched))
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("demo")(guard(demo))
