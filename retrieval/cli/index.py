"""`facefind` commands about the index: `index` (build or update it) and `info` (what it holds).

Only option parsing and rendering live here; the work is ``facefind.indexer.pipeline.index_folder`` and
``facefind.db.catalog.Catalog.info``. torch is imported inside the commands, never at module level.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.box import SIMPLE
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from facefind.db.errors import FacefindError
from facefind.db.paths import default_index_dir
from facefind.db.snapshot import model_threshold_sets, snapshot_info
from facefind.indexer.faces.align import MIN_FACE_PIXELS, check_models  # numpy only: dlib loads on first use
from facefind.indexer.faces.identity import check_model
from facefind.retrieval.cli.common import (
    DeviceOpt, IndexOpt, JsonOpt, ThreadsOpt, guard, index_or_demo_hint, print_json, show_device_line, use_threads,
)


def index(
    folder: Annotated[Path, typer.Argument(help="Folder of face images (jpg/jpeg/png/webp/bmp).", show_default=False)],
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Checkpoint from `facefind train`. Default: the model the index was built with.",
                     show_default=False),
    ] = None,
    index_dir: IndexOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass and per transaction.")] = 256,
    device: DeviceOpt = "auto",
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=0, help="Decoding processes (0: decode in this process). Default: one per CPU core.",
                     show_default=False),
    ] = None,
    threads: ThreadsOpt = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Also index images in subfolders.")] = False,
    detect_faces: Annotated[
        bool, typer.Option("--detect-faces", help="Index every face of a photo (at least --min-face pixels wide) as its "
                           "own entry, aligned onto CelebA's template; aligned CelebA crops stay one entry each, as "
                           "they are. A photo with no face is listed as failed.")
    ] = False,
    min_face: Annotated[
        int, typer.Option("--min-face", min=1, help="With --detect-faces: ignore faces narrower than this, in pixels. "
                           "Detection looks at each photo at up to 2 megapixels, so it finds faces down to ~40 px "
                           "in small photos, ~50 px at 1024x768, ~200 px in a 12 MP photo.")
    ] = MIN_FACE_PIXELS,
    identity: Annotated[
        bool, typer.Option("--identity", help="Also store each image's face identity descriptor (dlib, ~0.1 s per "
                           "face per core) for `facefind similar --by person`. Files without a face are still "
                           "indexed by attributes.")
    ] = False,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Re-predict every image, not only new and changed ones.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Forget indexed images under FOLDER whose files are gone.")] = False,
    shard: Annotated[
        str | None,
        typer.Option("--shard", help="K/N: index only shard K of N (by a hash of each file's relative path), e.g. "
                     "on N machines sharing one FACEFIND_DB; then run --finalize once. Under torchrun the shard "
                     "comes from RANK/WORLD_SIZE.", show_default=False),
    ] = None,
    finalize: Annotated[
        bool, typer.Option("--finalize", help="After every --shard run: check that all of FOLDER is indexed and "
                           "publish the snapshot that queries read.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the model over every new or changed image in FOLDER and store probabilities + embeddings."""
    from facefind.indexer.pipeline import finalize_index, index_folder  # torch: query loads this module
    from facefind.trainer.distributed import parse_shard

    if finalize:
        if shard is not None:
            raise FacefindError("--finalize publishes what every shard wrote: run it without --shard")
        done = finalize_index(folder, model_path=model, index_dir=index_dir, recursive=recursive)
        if as_json:
            print_json(done.to_dict())
        else:
            typer.echo(f"published {done.images:,} images (model {done.model_id}, snapshot stamp {done.stamp}) "
                       f"in {done.seconds:.1f} s; index: {done.index_dir}")
        return
    shard_k_n = parse_shard(shard) if shard is not None else None
    use_threads(threads)
    show_device_line()
    faces = _face_finder(detect_faces, identity, min_face)
    console = Console(stderr=True)
    with Progress(
        TextColumn("index"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=as_json, transient=True,
    ) as bar:
        task = bar.add_task("index", total=None, rate="")

        def progress(done: int, total: int) -> None:
            speed = bar.tasks[task].speed
            bar.update(task, completed=done, total=total, rate=f"{speed:,.0f} img/s" if speed else "")

        report = index_folder(
            folder, model_path=model, index_dir=index_dir, batch_size=batch_size, device=device,
            workers=workers, recursive=recursive, rebuild=rebuild, prune=prune, faces=faces, progress=progress,
            shard=shard_k_n,
        )
    if as_json:
        print_json(report.to_dict())
    else:
        _print_report(report)
    if report.status == "interrupted":
        typer.echo(f"interrupted: {report.indexed:,} images committed; resume with: {_resume_command()}", err=True)
        raise typer.Exit(130)


def _print_report(report: Any) -> None:
    console = Console()
    t = report.timings
    console.print(
        f"[bold]{report.indexed:,}[/bold] indexed"
        + (f" ({report.faces:,} faces)" if report.faces is not None and report.faces != report.indexed else "")
        + f", {report.unchanged:,} unchanged, {report.failed:,} failed"
        + (f", {report.pruned:,} pruned" if report.pruned else "")
        + (f", {report.labelled:,} with ground-truth labels" if report.labelled else "")
        + f" in {report.seconds:.1f} s ({report.images_per_second:,.0f} images/s on {report.device})"
        + (f"; shard {report.shard}" if report.shard else "")
    )
    if report.identity is not None:
        ident = report.identity
        console.print(f"identity: {ident['described'] - ident['no_face']:,} faces described"
                      + (f", {ident['no_face']:,} files with no detectable face (indexed by attributes only, "
                         "not found by --by person)" if ident["no_face"] else ""))
    if not report.published:
        console.print("snapshot not published yet: once every shard is done, run `facefind index FOLDER --finalize`")
    console.print(
        f"stages: read+decode {t.get('read_decode', 0):.2f} s (workers' CPU {t.get('decode_cpu', 0):.2f} s), infer {t.get('infer', 0):.2f} s, "
        f"write {t.get('write', 0):.2f} s (background), snapshot {t.get('snapshot', 0):.2f} s; "
        f"index: {report.index_dir}"
    )
    shown = report.failures[:20]
    for f in shown:
        console.print(f"  [red]failed[/red] {f.path!r}: {f.reason}", highlight=False)
    if len(report.failures) > len(shown):
        console.print(f"  ... and {len(report.failures) - len(shown):,} more (`--json` lists all)")


def _resume_command() -> str:
    """The command line that was run (minus --rebuild, which would redo committed work)."""
    args = [a for a in sys.argv[1:] if a != "--rebuild"]
    return " ".join(["facefind", *(shlex.quote(a) for a in args)])


def _face_finder(detect: bool, identity: bool, min_size: int) -> Any:
    """The reader's ``FaceFinder`` for ``--detect-faces`` / ``--identity`` (None: neither), with
    dlib's model files checked up front so that a missing one fails before any work."""
    if not (detect or identity):
        return None
    from facefind.indexer.routing import FaceFinder  # torch: see index

    check_models()
    if identity:
        check_model()
    return FaceFinder(detect=detect, identity=identity, min_size=min_size)


def info(index_dir: IndexOpt = None, as_json: JsonOpt = False) -> None:
    """Show what the index holds: images, models and thresholds, predictions, vectors, labels, failures."""
    from facefind.db.catalog import Catalog  # SQLAlchemy: query (from a current snapshot) never needs it

    index_dir = index_or_demo_hint(index_dir)
    folder = Path(index_dir).expanduser() if index_dir is not None else default_index_dir()
    with Catalog.open(folder, create=False) as catalog:
        summary = catalog.info()
        recent_failures = [{"path": f.path, "reason": f.reason} for f in catalog.failures()[:50]]
        model_id = summary.get("model_id")
        if model_id is not None:
            summary["thresholds"] = _threshold_table(catalog.get_model(model_id))
    snap = snapshot_info(folder, model_id) if model_id is not None else {"count": 0, "vectors": 0}
    summary["vectors"] = int(snap.get("vectors") or 0)
    summary["snapshot"] = snap
    summary["index"] = str(folder)
    summary["failure_list"] = recent_failures
    if as_json:
        print_json(summary)
        return
    _print_info(summary)


def _print_info(s: dict[str, Any]) -> None:
    console = Console()
    run = s.get("last_run")
    size = (s.get("disk_bytes") or 0) + int(s["snapshot"].get("disk_bytes") or 0)
    console.print(f"[bold]{s['index']}[/bold]  ({size / 1e6:,.1f} MB on disk)")
    console.print(
        f"{s['images']:,} images"
        + (f" ({s['faces']:,} faces)" if s.get("faces", s["images"]) != s["images"] else "")
        + f", {s['predictions']:,} predictions and {s['vectors']:,} vectors "
        f"(model {s['model_id']}), {s['labels']:,} ground-truth labels, {s['failures']:,} failures"
    )
    if s["snapshot"].get("problem"):
        console.print(f"[yellow]snapshot: {s['snapshot']['problem']}[/yellow]")
    table = Table("id", "arch", "predictions", "attributes", "checkpoint", title="models")
    for m in s["models"]:
        table.add_row(str(m["id"]), m["arch"], f"{m['predictions']:,}", str(len(m["attributes"])),
                      str(m["checkpoint"]))
    console.print(table)
    if s.get("thresholds"):
        _print_thresholds(console, s["model_id"], s["thresholds"])
    if run:
        counts = run.get("counts") or {}
        console.print(
            f"last run #{run['id']}: {run['status']}, {run['root']}; "
            + ", ".join(f"{k} {v:,}" for k, v in counts.items()),
            highlight=False,
        )
    for f in s["failure_list"][:10]:
        console.print(f"  [red]failed[/red] {f['path']!r}: {f['reason']}", highlight=False)


def _threshold_table(model: Any) -> dict[str, Any]:
    """The model's threshold sets, which one bare names use, and each set's val precision/recall."""
    default, sets, stats = model_threshold_sets(model)
    rows = {}
    for i, attr in enumerate(model.attributes):
        rows[attr] = {name: {"threshold": values[i],
                             **{k: (stats.get(name) or {}).get(k, [None] * len(values))[i]
                                for k in ("precision", "recall", "f1")}}
                      for name, values in sets.items()}
    return {"default": default, "sets": list(sets), "per_attribute": rows}


def _print_thresholds(console: Any, model_id: int, t: dict[str, Any]) -> None:
    table = Table(title=f"thresholds of model {model_id} (bare names use {t['default']}; "
                        "precision/recall measured on val, where they were chosen)",
                  box=SIMPLE, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0))
    table.add_column("attribute", no_wrap=True)
    for name in t["sets"]:
        mark = "*" if name == t["default"] else ""
        for header in ("thr", "val P", "val R"):
            table.add_column(f"{name}{mark}\n{header}" if header == "thr" else f"\n{header}", justify="right",
                             no_wrap=True)
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for attr, row in t["per_attribute"].items():
        table.add_row(attr, *[fmt(row[name][k]) for name in t["sets"] for k in ("threshold", "precision", "recall")])
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("index")(guard(index))
    app.command("info")(guard(info))

