"""`facefind` commands about datasets: `dataset` (inspect a CelebA folder) and `synth` (make one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from facefind.db.errors import DatasetError
from facefind.retrieval.cli.common import JsonOpt, guard, print_json


def dataset(
    folder: Annotated[Path, typer.Argument(help="CelebA root, or its img_align_celeba folder (original or Kaggle layout).")],
    as_json: JsonOpt = False,
) -> None:
    """Show what the loader finds in a CelebA-format folder: layout, counts, splits, attribute rates."""
    from facefind.trainer.celeba import load_celeba  # trainer code loads in the command: query loads this module

    data = load_celeba(folder)
    summary = {
        "layout": data.layout,
        "root": str(data.root),
        "image_dir": str(data.image_dir),
        "images": len(data),
        "missing_images": data.missing_images,
        "attributes": data.attributes,
        "positive_rate": {k: round(v, 4) for k, v in data.positive_rate().items()},
        "splits": data.split_counts(),
        "identities": None if data.identities is None else int(len(set(data.identities.tolist()) - {-1})),
    }
    if as_json:
        print_json(summary)
        return
    console = Console()
    splits = summary["splits"]
    console.print(f"[bold]{data.root}[/bold]  layout: {data.layout}  images: {data.image_dir}")
    console.print(
        f"{len(data):,} images present, {data.missing_images:,} annotated but missing; "
        f"splits: train {splits['train']:,} / val {splits['val']:,} / test {splits['test']:,}"
        + (f"; {summary['identities']:,} identities" if summary["identities"] is not None else "")
    )
    table = Table("attribute", "positive rate", title=f"{len(data.attributes)} attributes")
    for name, rate in summary["positive_rate"].items():
        table.add_row(name, f"{rate:.3f}")
    console.print(table)


def synth(
    out: Annotated[Path, typer.Argument(help="Folder to create (must be new or empty).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of faces.")] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, byte-identical output.")] = 0,
    layout: Annotated[str, typer.Option("--layout", help="original | kaggle (CelebA's two published layouts).")] = "original",
    as_json: JsonOpt = False,
) -> None:
    """Write a CelebA-format folder of synthetic 178x218 faces whose attributes are visible."""
    from facefind.trainer.synth import synthesize  # PIL: see dataset

    if layout not in ("original", "kaggle"):
        raise DatasetError(f"unknown layout {layout!r}: use original or kaggle")
    with Progress(
        TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        disable=as_json, transient=True,
    ) as bar:
        task = bar.add_task("synth", total=n)
        summary = synthesize(out, n=n, seed=seed, layout=layout,
                             progress=lambda k: bar.advance(task, k))
    result = {
        "out": str(summary.out),
        "layout": summary.layout,
        "images": summary.n,
        "seconds": round(summary.seconds, 2),
        "images_per_second": round(summary.images_per_second, 1),
    }
    if as_json:
        print_json(result)
    else:
        typer.echo(
            f"wrote {summary.n:,} synthetic faces ({summary.layout} layout) to {summary.out} "
            f"in {summary.seconds:.1f} s ({summary.images_per_second:,.0f} images/s)"
        )


def register(app: typer.Typer) -> None:
    app.command("dataset")(guard(dataset))
    app.command("synth")(guard(synth))
