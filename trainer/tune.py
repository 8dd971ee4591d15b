"""Grid search over training settings, as the study tuned learning rate and dropout by hand.

``tune`` trains every combination of the grid (one ``fit`` each, all sharing the decoded image
cache), ranks them by one validation metric, and keeps only the best checkpoint as ``best.pt``
(``keep_all`` keeps every run's). ``tune.json`` records the grid and each finished run, and is
rewritten after every run, so an interrupted grid started again skips finished runs and resumes
the interrupted one from its last epoch. ``tune.csv`` holds the same comparison as a table.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from facefind.db.errors import ModelError
from facefind.db.files import atomic_replace, atomic_write_json
from facefind.trainer.fit import FitConfig, FitEvent, FitResult, fit, state_path
from facefind.trainer.metrics import SUMMARY_KEYS

log = logging.getLogger(__name__)

GRID_KEYS = ("arch", "lr", "dropout", "embedding_dim", "batch_size", "weight_decay")
TUNE_FILE = "tune.json"
CSV_FILE = "tune.csv"
BEST_FILE = "best.pt"


@dataclass
class TuneRun:
    """One grid point: its settings and, once finished, its validation numbers."""

    name: str
    params: dict[str, Any]
    status: str = "pending"  # pending | done
    best_epoch: int | None = None
    seconds: float | None = None
    val: dict[str, float | None] | None = None
    test: dict[str, float | None] | None = None


@dataclass
class TuneResult:
    out_dir: Path
    metric: str
    runs: list[TuneRun]
    best: TuneRun
    checkpoint: Path
    table_csv: Path
    table_json: Path
    resumed: int = 0  # runs found already finished


@dataclass(frozen=True)
class TuneEvent:
    """A run starts (``fit`` is None) or a fit event of the current run."""

    run: int  # 1-based
    runs: int
    name: str
    params: dict[str, Any]
    fit: FitEvent | None = None
    finished: TuneRun | None = None


def grid_points(grid: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the grid's key order."""
    unknown = [k for k in grid if k not in GRID_KEYS]
    if unknown:
        raise ModelError(f"cannot tune {unknown[0]!r}: tunable settings are {', '.join(GRID_KEYS)}")
    keys = [k for k in grid if grid[k]]
    if not keys:
        raise ModelError("the grid is empty: give at least one value list, e.g. --lr 0.01,0.001")
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(list(grid[k]) for k in keys))]


def run_name(params: dict[str, Any]) -> str:
    """A file-name-safe label such as ``lr0.01_dropout0.3``."""
    return "_".join(f"{k}{v}" for k, v in params.items()).replace("/", "-").replace(" ", "")


def tune(
    base: FitConfig,
    grid: dict[str, Sequence[Any]],
    out_dir: Path,
    metric: str = "mean_accuracy",
    keep_all: bool = False,
    progress: Callable[[TuneEvent], None] | None = None,
) -> TuneResult:
    """Train each grid point, rank by ``metric`` on val, keep the best as ``out_dir/best.pt``."""
    if metric not in SUMMARY_KEYS:
        raise ModelError(f"unknown metric {metric!r}: use one of {', '.join(SUMMARY_KEYS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    points = grid_points(grid)
    fixed = {k: v for k, v in base.to_args().items() if k not in FitConfig.RUNTIME and k not in points[0]}
    fixed["select_metric"] = metric
    record = {"metric": metric, "base": fixed, "grid": {k: list(v) for k, v in grid.items() if v}}
    runs = [TuneRun(run_name(p), p) for p in points]
    state_file = out_dir / TUNE_FILE
    resumed = 0
    if state_file.exists():
        saved = _read_state(state_file)
        if {k: saved.get(k) for k in record} != json.loads(json.dumps(record)):
            raise ModelError(
                f"{out_dir} holds a different tuning grid or settings: use another --out, or delete {state_file}"
            )
        done = {r["name"]: r for r in saved.get("runs", []) if r.get("status") == "done"}
        for run in runs:
            if run.name in done:
                run.status, run.best_epoch, run.seconds = "done", done[run.name]["best_epoch"], done[run.name]["seconds"]
                run.val, run.test = done[run.name]["val"], done[run.name].get("test")
                resumed += 1
        if resumed:
            log.info("tune: %d of %d runs already finished in %s", resumed, len(runs), out_dir)
    best_file = out_dir / BEST_FILE

    for number, run in enumerate(runs, start=1):
        if run.status == "done":
            continue
        out = out_dir / f"{run.name}.pt"
        cfg = dataclasses.replace(base, **run.params, out=out, select_metric=metric,
                                  resume=state_path(out).exists())
        if progress:
            progress(TuneEvent(number, len(runs), run.name, run.params))

        def on_fit(event: FitEvent, _n: int = number, _run: TuneRun = run) -> None:
            if progress:
                progress(TuneEvent(_n, len(runs), _run.name, _run.params, fit=event))

        result = fit(cfg, on_fit)
        run.status, run.best_epoch, run.seconds = "done", result.best_epoch, round(result.seconds, 2)
        run.val = result.val.summary()
        run.test = result.test.summary() if result.test else None
        _keep(result, run, runs, metric, best_file, keep_all)
        _write_outputs(out_dir, record, runs, metric)
        if progress:
            progress(TuneEvent(number, len(runs), run.name, run.params, finished=run))

    _write_outputs(out_dir, record, runs, metric)
    best = _best(runs, metric)
    if not best_file.exists():
        raise ModelError(f"{best_file} is missing although the grid finished: delete {state_file} and tune again")
    return TuneResult(out_dir, metric, runs, best, best_file, out_dir / CSV_FILE, state_file, resumed)


def _best(runs: list[TuneRun], metric: str) -> TuneRun:
    done = [r for r in runs if r.status == "done" and r.val and r.val.get(metric) is not None]
    if not done:
        raise ModelError("no tuning run finished with a valid score")
    return max(done, key=lambda r: r.val[metric])  # type: ignore[index]


def _keep(result: FitResult, run: TuneRun, runs: list[TuneRun], metric: str, best_file: Path, keep_all: bool) -> None:
    """Make ``best.pt`` the best finished run's checkpoint; drop the others unless ``keep_all``."""
    if _best(runs, metric) is run:
        atomic_replace(best_file, lambda tmp: shutil.copyfile(result.checkpoint, tmp))
        log.info("tune: %s is the best so far (%s %.4f)", run.name, metric, run.val[metric])  # type: ignore[index]
    if not keep_all:
        result.checkpoint.unlink(missing_ok=True)


def _write_outputs(out_dir: Path, record: dict[str, Any], runs: list[TuneRun], metric: str) -> None:
    done = [r for r in runs if r.status == "done"]
    best = _best(runs, metric).name if done else None
    state = dict(record, best=best, runs=[dataclasses.asdict(r) for r in runs])
    atomic_write_json(out_dir / TUNE_FILE, state)

    params = list(runs[0].params)
    columns = ["run", *params, "status", "best_epoch", "seconds", *[f"val_{k}" for k in SUMMARY_KEYS], "best"]

    def fill(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            for r in runs:
                val = r.val or {}
                writer.writerow([r.name, *[r.params[p] for p in params], r.status, r.best_epoch, r.seconds,
                                 *[val.get(k) for k in SUMMARY_KEYS], r.name == best])

    atomic_replace(out_dir / CSV_FILE, fill)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read {path} ({err}): delete it to start the grid again") from None
