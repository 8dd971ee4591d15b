"""`facefind` commands for models: `train`, `tune` and `evaluate`.

Each command parses options, calls one function of ``trainer`` and renders what it returns.
torch is imported inside the commands only (``facefind query`` loads this module too).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.box import SIMPLE
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from facefind.db.errors import FacefindError
from facefind.db.paths import default_models_dir
from facefind.retrieval.cli.common import (
    DeviceOpt, JsonOpt, ThreadsOpt, guard, print_json, show_device_line, use_threads,
)

if TYPE_CHECKING:
    from facefind.trainer.evaluate import EvalReport
    from facefind.trainer.data import FitEvent
    from facefind.trainer.fit import FitResult
    from facefind.trainer.metrics import Metrics

# The original study (ResNet50 and DenseNet121 on 29,500 CelebA images, 8 epochs, class-weighted
# BCE, its own test images). It does not say how it averaged precision, recall and F1.
STUDY = {
    "ResNet50": {"accuracy": 0.8968, "precision": 0.7764, "recall": 0.8118, "f1": 0.7863},
    "DenseNet121": {"accuracy": 0.8920, "precision": 0.7577, "recall": 0.8270, "f1": 0.7769},
}

# Borderless tables that fit 80 columns: attribute names must never be cut.
_PLAIN: dict[str, Any] = {"box": SIMPLE, "pad_edge": False, "show_edge": False, "padding": (0, 1, 0, 0)}

# ------------------------------------------------------------------------------------ options

DataArg = Annotated[Path, typer.Argument(help="CelebA-format folder (root or img_align_celeba; original or Kaggle layout).")]
ArchOpt = Annotated[str, typer.Option("--arch", help="Backbone: resnet50, densenet121, inception_v3, resnet18, "
                                      "efficientnet_b0, mobilenet_v3_small, convnext_tiny, small_cnn (ours: fast on a CPU at 64-96 px), ...")]
EpochsOpt = Annotated[int, typer.Option("--epochs", min=1, help="Training epochs.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=2, help="Training batch size.")]
LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate.")]
DropoutOpt = Annotated[float, typer.Option("--dropout", help="Dropout before the classifier.")]
EmbedOpt = Annotated[int, typer.Option("--embedding-dim", min=1, help="Embedding size (the similarity vector).")]
SizeOpt = Annotated[str, typer.Option("--img-size", help="Model input: N (NxN), HxW (e.g. 218x178) or native.")]
PretrainedOpt = Annotated[bool, typer.Option("--pretrained/--no-pretrained",
                                             help="Start from torchvision's ImageNet weights (downloaded once).")]
ClassWeightsOpt = Annotated[str, typer.Option("--class-weights",
                                              help="none | pos_weight (the study's negatives/positives loss weights).")]
ThresholdOpt = Annotated[str, typer.Option("--threshold-metric",
                                           help="accuracy | f1: what the per-attribute thresholds maximise on val.")]
SubsetOpt = Annotated[Optional[int], typer.Option("--subset", min=2, help="Use a random N images of DATA (all splits).")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", min=1, help="Image decoding threads (default: all cores).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the split hold-out, shuffling, augmentation and init.")]
CacheOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="Decoded-image cache folder "
                                                  "(default: $FACEFIND_CACHE, else ~/.facefind/cache).", show_default=False)]
WdOpt = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")]
OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="adamw | adam.")]
ScheduleOpt = Annotated[str, typer.Option("--schedule", help="cosine | onecycle | constant (per step, with warm-up).")]
AugmentOpt = Annotated[bool, typer.Option("--augment/--no-augment", help="Random flip, shift/scale and colour jitter.")]


# ------------------------------------------------------------------------------------ train


def train(
    data: DataArg,
    arch: ArchOpt = "resnet50",
    epochs: EpochsOpt = 10,
    batch_size: BatchOpt = 64,
    lr: LrOpt = 2e-3,
    dropout: DropoutOpt = 0.3,
    embedding_dim: EmbedOpt = 512,
    img_size: SizeOpt = "224",
    pretrained: PretrainedOpt = False,
    class_weights: ClassWeightsOpt = "none",
    threshold_metric: ThresholdOpt = "accuracy",
    subset: SubsetOpt = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    seed: SeedOpt = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Checkpoint to write (default: "
                   "~/.facefind/models/<arch>-<size>.pt). History and resume state go beside it.",
                   show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run writing --out, "
                      "with its saved settings (only --device, --workers and --cache-dir may change).")] = False,
    cache_dir: CacheOpt = None,
    weight_decay: WdOpt = 1e-4,
    optimizer: OptimizerOpt = "adamw",
    schedule: ScheduleOpt = "cosine",
    augment: AugmentOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Train the attribute CNN: train split to learn, val to pick the epoch and thresholds, test to report."""
    from facefind.trainer import distributed  # torch: see the module docstring
    from facefind.trainer.fit import FitConfig, fit, state_path

    use_threads(threads)
    show_device_line()
    config = FitConfig(
        data=data, out=out, arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        optimizer=optimizer, schedule=schedule, dropout=dropout, embedding_dim=embedding_dim, img_size=img_size,
        pretrained=pretrained, augment=augment, class_weights=class_weights, threshold_metric=threshold_metric,
        subset=subset, device=device, workers=workers, seed=seed, cache_dir=cache_dir, resume=resume,
    )
    console = Console(stderr=True)
    try:
        with _FitBar(console, enabled=not as_json) as bar:
            result = fit(config, progress=bar.update)
    except KeyboardInterrupt:
        if distributed.env_info().rank != 0:  # under torchrun: rank 0 says it once
            raise typer.Exit(130) from None
        if not state_path(config.out).exists():
            raise
        hint = ("the same torchrun command with --resume" if distributed.env_info().distributed
                else f"`facefind train {data} --out {config.out} --resume`")
        typer.echo(f"interrupted: continue with {hint}", err=True)
        raise typer.Exit(130) from None
    if not distributed.is_main():  # under torchrun every rank holds rank 0's result; one prints it
        return
    if as_json:
        print_json(result.to_json())
        return
    _render_fit(Console(), result)


class _FitBar:
    """Rich progress bars for ``fit``'s events: image decoding, then one bar per epoch with loss,
    images/s and ETA, and a one-line summary printed above the bars after each epoch."""

    def __init__(self, console: Console, enabled: bool = True, prefix: str = "") -> None:
        self.console = console
        self.prefix = prefix
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, disable=not enabled, transient=False,
        )
        self.cache_task: Any = None
        self.epoch_task: Any = None

    def __enter__(self) -> "_FitBar":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def reset(self) -> None:
        """Drop the bars of a finished run (tune starts a new one)."""
        for task in (self.cache_task, self.epoch_task):
            if task is not None and task in self.progress.task_ids:
                self.progress.remove_task(task)
        self.cache_task = self.epoch_task = None

    def update(self, event: "FitEvent") -> None:
        p = self.progress
        if event.kind == "cache":
            if self.cache_task is None:
                self.cache_task = p.add_task(f"{self.prefix}decoding images", total=event.total, info="")
            p.update(self.cache_task, completed=event.done)
            if event.done >= event.total:  # decoded (or reused): the bar has nothing more to say
                p.remove_task(self.cache_task)
        elif event.kind == "epoch":
            if self.epoch_task is not None:
                p.remove_task(self.epoch_task)
            self.epoch_task = p.add_task(f"{self.prefix}epoch {event.epoch}/{event.epochs}", total=event.steps,
                                         info="")
        elif event.kind == "step" and self.epoch_task is not None:
            p.update(self.epoch_task, completed=event.step,
                     info=f"loss {event.loss:.4f}  {event.images_per_s:,.0f} img/s")
        elif event.kind == "eval" and self.epoch_task is not None:
            p.update(self.epoch_task, info="validating...")
        elif event.kind == "epoch_end" and event.record is not None:
            r = event.record
            val = r["val"]
            p.console.print(
                f"{self.prefix}epoch {r['epoch']}/{event.epochs}  loss {r['train_loss']:.4f}/"
                f"{r['val_loss']:.4f}  val acc {val['mean_accuracy']:.4f}  F1 {val['macro_f1']:.4f}  "
                f"{r['images_per_s']:,.0f} img/s  {r['seconds']:.0f} s", soft_wrap=True,
            )
            if self.epoch_task is not None:
                p.remove_task(self.epoch_task)
                self.epoch_task = None
        elif event.kind == "test":
            p.console.print(f"{self.prefix}evaluating epoch {event.epoch} on test...")


def _render_fit(console: Console, result: "FitResult") -> None:
    columns: list[tuple[str, "Metrics | None"]] = [
        ("val (tuned thr.)", result.val), ("val @0.5", result.val_at_half),
        ("val majority", result.baseline_val), ("test (tuned thr.)", result.test), ("test @0.5", result.test_at_half),
    ]
    columns = [(name, m) for name, m in columns if m is not None]
    keys = ("mean_accuracy", "macro_f1", "macro_precision", "macro_recall", "micro_f1", "mean_balanced_accuracy",
            "mean_average_precision")
    table = Table(title=f"best epoch {result.best_epoch} of {result.epochs}", **_PLAIN)
    _name_column(table, list(keys), header="metric")
    for name, _ in columns:
        table.add_column(name.replace(" (", "\n("), justify="right")
    for key in keys:
        table.add_row(key, *[_fmt(m.value(key)) for _, m in columns])
    console.print(table)
    console.print("val chose the epoch and the thresholds, so its figures are optimistic; "
                  + ("test is held out: quote test." if result.test is not None else
                     "DATA has no test images, so no held-out figures are reported."))
    if result.val_note:
        console.print(f"note: {result.val_note}")
    console.print(f"checkpoint: {result.checkpoint}\nhistory:    {result.history_file}\n"
                  f"device: {result.device}; {result.seconds:.1f} s")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------ tune


def _floats(text: str | None, option: str) -> list[float]:
    return [_number(v, option, float) for v in _split(text)]


def _ints(text: str | None, option: str) -> list[int]:
    return [_number(v, option, int) for v in _split(text)]


def _split(text: str | None) -> list[str]:
    return [v.strip() for v in (text or "").split(",") if v.strip()]


def _number(value: str, option: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise FacefindError(f"{option}: {value!r} is not a {'number' if kind is float else 'whole number'}; "
                            "give a comma-separated list such as 0.01,0.001") from None


def tune(
    data: DataArg,
    lr: Annotated[Optional[str], typer.Option("--lr", help="Learning rates to try, comma-separated.")] = "0.002",
    dropout: Annotated[Optional[str], typer.Option("--dropout", help="Dropouts to try, comma-separated.")] = "0.3",
    arch: Annotated[str, typer.Option("--arch", help="Backbone(s), comma-separated.")] = "resnet50",
    embedding_dim: Annotated[str, typer.Option("--embedding-dim", help="Embedding size(s), comma-separated.")] = "512",
    batch_size: Annotated[str, typer.Option("--batch-size", help="Batch size(s), comma-separated.")] = "64",
    metric: Annotated[str, typer.Option("--metric", help="Val metric that ranks the runs (and picks each run's "
                                        "epoch): mean_accuracy, macro_f1, micro_f1, mean_balanced_accuracy, ...")
                      ] = "mean_accuracy",
    epochs: EpochsOpt = 10,
    img_size: SizeOpt = "224",
    pretrained: PretrainedOpt = False,
    class_weights: ClassWeightsOpt = "none",
    threshold_metric: ThresholdOpt = "accuracy",
    subset: SubsetOpt = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    seed: SeedOpt = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for the runs, best.pt, tune.csv and "
                   "tune.json (default: ~/.facefind/models/tune-<DATA name>). Run again to resume.",
                   show_default=False)] = None,
    keep_all: Annotated[bool, typer.Option("--keep-all", help="Keep every run's checkpoint, not only the best.")] = False,
    cache_dir: CacheOpt = None,
    weight_decay: WdOpt = 1e-4,
    schedule: ScheduleOpt = "cosine",
    as_json: JsonOpt = False,
) -> None:
    """Grid-search training settings (e.g. --lr 0.01,0.005 --dropout 0.3,0.5); keep the best on val."""
    from facefind.trainer.fit import FitConfig  # torch: see the module docstring
    from facefind.trainer.tune import TuneEvent
    from facefind.trainer.tune import tune as run_tune

    grid = {
        "arch": _split(arch), "lr": _floats(lr, "--lr"), "dropout": _floats(dropout, "--dropout"),
        "embedding_dim": _ints(embedding_dim, "--embedding-dim"), "batch_size": _ints(batch_size, "--batch-size"),
    }
    fixed = {k: v[0] for k, v in grid.items() if len(v) == 1}
    grid = {k: v for k, v in grid.items() if len(v) > 1} or {"lr": grid["lr"]}
    fixed = {k: v for k, v in fixed.items() if k not in grid}
    base = FitConfig(
        data=data, out=Path("unused.pt"), epochs=epochs, img_size=img_size, pretrained=pretrained,
        class_weights=class_weights, threshold_metric=threshold_metric, subset=subset, device=device,
        workers=workers, seed=seed, cache_dir=cache_dir, weight_decay=weight_decay, schedule=schedule, **fixed,
    )
    out_dir = out if out is not None else default_models_dir() / f"tune-{Path(data).resolve().name}"
    show_device_line()
    console = Console(stderr=True)
    with _FitBar(console, enabled=not as_json) as shared:

        def on_event(event: TuneEvent) -> None:
            if event.finished is not None:
                val = event.finished.val or {}
                shared.progress.console.print(
                    f"[bold]run {event.run}/{event.runs} {event.name}[/bold]: val {metric} {_fmt(val.get(metric))} "
                    f"(best epoch {event.finished.best_epoch}, {event.finished.seconds:.0f} s)")
            elif event.fit is None:
                shared.progress.console.print(f"[bold]run {event.run}/{event.runs}[/bold]: {event.name}")
                shared.reset()
            else:
                shared.prefix = f"[{event.run}/{event.runs}] "
                shared.update(event.fit)

        result = run_tune(base, grid, out_dir, metric=metric, keep_all=keep_all, progress=on_event)
    if as_json:
        print_json({"out": str(result.out_dir), "metric": result.metric, "best": result.best.name,
                    "checkpoint": str(result.checkpoint), "csv": str(result.table_csv),
                    "json": str(result.table_json), "runs": [vars(r) for r in result.runs]})
        return
    params = list(result.runs[0].params)
    table = Table("run", *params, "best epoch", "val mean acc", "val macro F1", "val micro F1", "s",
                  title=f"tuning on val, ranked by {metric}")
    for run in sorted(result.runs, key=lambda r: -((r.val or {}).get(metric) or -1)):
        val = run.val or {}
        mark = " *" if run is result.best else ""
        table.add_row(run.name + mark, *[str(run.params[p]) for p in params], str(run.best_epoch),
                      _fmt(val.get("mean_accuracy")), _fmt(val.get("macro_f1")), _fmt(val.get("micro_f1")),
                      f"{run.seconds:.0f}" if run.seconds else "-")
    out_console = Console()
    out_console.print(table)
    if result.resumed:
        out_console.print(f"{result.resumed} run(s) were already finished and reused")
    out_console.print(f"best: {result.best.name} -> {result.checkpoint}\ntable: {result.table_csv}, {result.table_json}")


# ------------------------------------------------------------------------------------ evaluate


def evaluate(
    model: Annotated[Path, typer.Argument(help="Checkpoint written by `facefind train`.")],
    data: DataArg,
    split: Annotated[Optional[str], typer.Option("--split", help="test | val (default: test, or val when DATA "
                                                 "has no test images).", show_default=False)] = None,
    compare: Annotated[Optional[list[Path]], typer.Option("--compare", help="Other checkpoint(s) to show side "
                                                          "by side per attribute (repeat the option).")] = None,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Inference batch size.")] = 256,
    workers: WorkersOpt = None,
    cache_dir: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per-attribute accuracy, precision, recall, F1, balanced accuracy, AP and support of a checkpoint."""
    from facefind.trainer.evaluate import evaluate_checkpoint  # torch: see the module docstring

    if split is not None and split not in ("test", "val", "train"):
        raise FacefindError(f"unknown split {split!r}: use test or val")
    paths = [model, *(compare or [])]
    console = Console(stderr=True)
    reports = []
    for path in paths:
        with _FitBar(console, enabled=not as_json, prefix=f"{path.name}: ") as bar:
            reports.append(evaluate_checkpoint(path, data, split, device=device, batch_size=batch_size,
                                               workers=workers, cache_dir=cache_dir, progress=bar.update))
    if as_json:
        print_json(reports[0].to_json() if len(reports) == 1 else [r.to_json() for r in reports])
        return
    out = Console()
    for report in reports:
        if report.note:
            out.print(f"note: {report.note}")
    if len(reports) == 1:
        _render_report(out, reports[0])
    else:
        _render_comparison(out, reports)


def _render_report(console: Console, report: "EvalReport") -> None:
    m = report.metrics
    table = Table(title=f"{report.model.name} ({report.meta.arch}) on {m.split}: {m.n_images:,} images", **_PLAIN)
    _name_column(table, m.attributes)
    for header in ("acc", "prec", "rec", "F1", "bal", "AP", "pos", "thr"):
        table.add_column(header, justify="right", no_wrap=True, min_width=5)
    for name, row in m.per_attribute().items():
        table.add_row(name, *[_fmt(row[k], 3) for k in ("accuracy", "precision", "recall", "f1",
                                                        "balanced_accuracy", "average_precision")],
                      f"{row['support']:,}", f"{row['threshold']:.3f}")
    console.print(table)
    _render_sets(console, report)
    summary = Table(title=f"summary (ours at the {report.primary} thresholds)", **_PLAIN)
    _name_column(table=summary, names=["mean_average_precision"], header="metric")
    for header in (f"ours\n({report.primary})", "ours\n@0.5", "majority\nclass",
                   *[f"{arch}\n(theirs)" for arch in STUDY]):
        summary.add_column(header, justify="right")
    theirs = {"mean_accuracy": "accuracy", "macro_precision": "precision", "macro_recall": "recall",
              "macro_f1": "f1"}
    for key in ("mean_accuracy", "macro_precision", "macro_recall", "macro_f1", "micro_precision",
                "micro_recall", "micro_f1", "mean_balanced_accuracy", "mean_average_precision"):
        study = [_fmt(STUDY[arch][theirs[key]]) if key in theirs else "" for arch in STUDY]
        summary.add_row(key, _fmt(m.value(key)), _fmt(report.at_half.value(key)), _fmt(report.baseline.value(key)),
                        *study)
    console.print(summary)
    for name, other in report.by_thresholds.items():
        if name != report.primary:
            console.print(f"at the {name} thresholds (what queries use for bare names): mean accuracy "
                          f"{_fmt(other.mean_accuracy)}, macro precision / recall / F1 {_fmt(other.macro_precision)} / "
                          f"{_fmt(other.macro_recall)} / {_fmt(other.macro_f1)}, micro F1 {_fmt(other.micro_f1)}",
                          highlight=False)
    console.print("theirs: the original study's published test numbers (its own 29,500-image CelebA subset, "
                  "8 epochs; it does not say how precision/recall/F1 were averaged), not measured here.")


def _render_sets(console: Console, report: "EvalReport") -> None:
    """Per attribute, precision / recall / F1 at every threshold set and at 0.5 (thresholds shown)."""
    sets = [*report.by_thresholds.items(), ("0.5", report.at_half)]
    table = Table(title=f"precision / recall / F1 per threshold set on {report.metrics.split}", **_PLAIN)
    _name_column(table, report.metrics.attributes)
    for name, _ in sets:
        if name != "0.5":
            table.add_column(f"{name}\nthr", justify="right", no_wrap=True)
        table.add_column(f"{'at ' + name if name == '0.5' else ''}\n  P   R  F1", justify="right", no_wrap=True)
    rows = [m.per_attribute() for _, m in sets]
    for attr in report.metrics.attributes:
        cells = []
        for (name, _), row in zip(sets, rows):
            r = row[attr]
            if name != "0.5":
                cells.append(f"{r['threshold']:.2f}")
            cells.append(" ".join(_short(r[k]) for k in ("precision", "recall", "f1")))
        table.add_row(attr, *cells)
    console.print(table)


def _short(value: float | None) -> str:
    """A rate in three characters (.56, 1.0), so that three fit where one number would."""
    if value is None or math.isnan(value):
        return "  -"
    return "1.0" if value >= 0.995 else f"{value:.2f}"[1:]


def _name_column(table: Table, names: list[str], header: str = "attribute") -> None:
    """A first column wide enough that no attribute name is cut (they are what users search by)."""
    table.add_column(header, no_wrap=True, min_width=max(len(n) for n in names))


def _render_comparison(console: Console, reports: list["EvalReport"]) -> None:
    """Models side by side: accuracy and F1 per attribute, the best of each marked with *."""
    names = [f"{r.model.name}\n({r.meta.arch})" for r in reports]
    table = Table(title=f"{reports[0].metrics.split}: {reports[0].metrics.n_images:,} images (* best)", **_PLAIN)
    _name_column(table, reports[0].metrics.attributes)
    for name in names:
        table.add_column(f"{name}\nacc / F1", justify="right", no_wrap=True)
    rows = [r.metrics.per_attribute() for r in reports]
    for attr in reports[0].metrics.attributes:
        acc = [row[attr]["accuracy"] if attr in row else None for row in rows]
        f1 = [row[attr]["f1"] if attr in row else None for row in rows]
        table.add_row(attr, *[_pair(acc, f1, i) for i in range(len(reports))])
    for key, label in (("mean_accuracy", "mean accuracy"), ("macro_f1", "macro F1"), ("micro_f1", "micro F1"),
                       ("mean_balanced_accuracy", "mean bal. acc"), ("mean_average_precision", "mean AP")):
        values = [r.metrics.value(key) for r in reports]
        best = _best(values)
        table.add_row(f"[bold]{label}[/bold]", *[_marked(v, v == best, 3) for v in values])
    console.print(table)


def _best(values: list[float | None]) -> float | None:
    """The highest value, or None when all are equal (a tie everywhere marks nothing)."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present or min(present) == max(present):
        return None
    return max(present)


def _pair(acc: list[float | None], f1: list[float | None], i: int) -> str:
    best_acc, best_f1 = _best(acc), _best(f1)
    return f"{_marked(acc[i], acc[i] == best_acc, 3)} / {_marked(f1[i], f1[i] == best_f1, 3)}"


def _marked(value: float | None, best: bool, digits: int = 4) -> str:
    text = _fmt(value, digits)
    return f"[bold green]{text}*[/bold green]" if best and value is not None else text


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("train", help="Train the attribute CNN (train split; epoch and thresholds chosen on val; "
                "test reported).")(guard(train))
    app.command("tune", help="Grid-search learning rate, dropout, ... and keep the best checkpoint.")(guard(tune))
    app.command("evaluate", help="Per-attribute metrics of a checkpoint on a split, beside the study's "
                "numbers; --compare models side by side.")(guard(evaluate))
