"""Verify an index and repair what is derived: what ``facefind check [--repair] [--prune]`` runs.

The catalog is the source of truth; snapshots (sidecar arrays + FAISS) are derived from it, and
runs are bookkeeping. ``check_index`` looks at all three:

  catalog    SQLite ``PRAGMA integrity_check`` / ``foreign_key_check``; rows that point at a missing
             image, model or label set (any backend); duplicate or unnormalised paths (impossible
             by constraint, checked anyway); images with no prediction at all; images the newest
             model has not predicted (a warning: several models may cover different folders)
  runs       runs marked 'running' whose process is gone (a kill -9, a power cut)
  models     each checkpoint file present and still matching its recorded sha256
  snapshots  per model with predictions: present, readable, built from this catalog and model,
             at the catalog's stamp, with the catalog's ids; its vector store (and approximate
             index, when it has one) present, of the right shape, and byte for byte what was
             published (CRC-32s in the manifest); staging leftovers of a writer killed mid-save
  files      indexed files that no longer exist on disk

``repair=True`` rebuilds snapshots (vector files included), marks dead runs interrupted, removes staging
leftovers and rows that point at nothing. It never deletes an image's row: files gone from disk
are forgotten only with ``prune=True`` (or ``facefind index DIR --prune``). A problem makes the
index unhealthy (exit 1); a warning does not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import sqlalchemy as sa

from facefind.db import snapshot as snapshots
from facefind.db.catalog import Catalog, ModelRecord
from facefind.db.paths import normalize_path
from facefind.db.schema import (
    faces,
    failures_table,
    identities,
    images,
    label_sets,
    labels,
    models,
    predictions,
    runs,
)
from facefind.db.errors import CatalogError
from facefind.db.files import file_sha256
from facefind.db.vectors import file_crc32, open_approx

log = logging.getLogger(__name__)

EXAMPLES = 5  # paths or ids shown per finding


@dataclass(frozen=True)
class Finding:
    """One thing wrong with the index. ``message`` is one line saying what and what to do."""

    kind: str
    message: str
    repairable: bool = False
    count: int = 1
    examples: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "examples": list(self.examples)}


@dataclass
class CheckReport:
    """The outcome of ``check_index``: healthy when there are no problems (warnings are allowed)."""

    index_dir: str
    catalog: str
    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """The JSON form ``facefind check --json`` prints."""
        return {
            "index": self.index_dir,
            "catalog": self.catalog,
            "healthy": self.healthy,
            "problems": [f.to_dict() for f in self.problems],
            "warnings": [f.to_dict() for f in self.warnings],
            "repaired": list(self.repaired),
            "stats": self.stats,
        }


def check_index(
    index_dir: str | os.PathLike[str],
    *,
    repair: bool = False,
    prune: bool = False,
    check_files: bool = True,
) -> CheckReport:
    """Check the index at ``index_dir``; with ``repair`` fix what is derived, then check again.

    ``prune`` (implies ``repair``) also forgets indexed files that are gone from disk. Raises
    CatalogError when there is no index there or its catalog cannot be opened at all.
    """
    folder = Path(index_dir).expanduser().absolute()
    repair = repair or prune
    with Catalog.open(folder, create=False) as catalog:
        report = _inspect(catalog, folder, check_files or prune)
        if not repair:
            return report
        actions, failed = _repair(catalog, folder, report, prune)
        if not actions and not failed:
            return report
        report = _inspect(catalog, folder, check_files or prune)
        report.repaired = actions
        report.problems.extend(failed)
        return report


# ---------------------------------------------------------------------------------------- checking


class _Collector:
    """Sorts findings into problems and warnings as the checks produce them."""

    def __init__(self, report: CheckReport) -> None:
        self.report = report

    def problem(self, kind: str, message: str, *, repairable: bool = False, count: int = 1,
                examples: Iterable[Any] = ()) -> None:
        self.report.problems.append(Finding(kind, message, repairable, count, _shown(examples)))

    def warning(self, kind: str, message: str, *, repairable: bool = False, count: int = 1,
                examples: Iterable[Any] = ()) -> None:
        self.report.warnings.append(Finding(kind, message, repairable, count, _shown(examples)))

    def either(self, serious: bool, kind: str, message: str, **kw: Any) -> None:
        (self.problem if serious else self.warning)(kind, message, **kw)


def _shown(examples: Iterable[Any]) -> tuple[str, ...]:
    out = []
    for e in examples:
        if len(out) == EXAMPLES:
            break
        out.append(str(e))
    return tuple(out)


def _inspect(catalog: Catalog, folder: Path, check_files: bool) -> CheckReport:
    report = CheckReport(index_dir=str(folder), catalog=catalog._where())
    found = _Collector(report)
    if not _catalog_integrity(catalog, found):
        return report  # a damaged file: the other checks would only repeat its errors
    with catalog._read() as conn:
        paths = dict(conn.execute(sa.select(images.c.id, images.c.path)).all())
        per_model = dict(conn.execute(
            sa.select(predictions.c.model_id, sa.func.count()).group_by(predictions.c.model_id)).all())
        failed = set(conn.execute(sa.select(failures_table.c.path)).scalars())
        n_labels = int(conn.execute(sa.select(sa.func.count()).select_from(labels)).scalar() or 0)
    all_models = catalog.models()
    current = catalog.latest_model(require_predictions=True)
    active = catalog.active_runs()
    report.stats = {
        "images": len(paths),
        "labels": n_labels,
        "failures": len(failed),
        "model_id": current.id if current else None,
        "predictions": {str(m.id): int(per_model.get(m.id, 0)) for m in all_models},
        "snapshots": {},
        "active_runs": [r.id for r in active],
    }
    _rows(catalog, found)
    _blobs(catalog, all_models, found)
    _paths(paths, found)
    _coverage(catalog, paths, failed, current, found)
    _runs(catalog, active, found)
    indexing = {r.model_id for r in active}
    for m in all_models:
        is_current = current is not None and m.id == current.id
        _checkpoint(m, is_current, found)
        if per_model.get(m.id, 0):
            report.stats["snapshots"][str(m.id)] = _snapshot(catalog, folder, m, is_current,
                                                             m.id in indexing, found)
        _leftovers(snapshots.model_dir(folder, m.id), found)
    if check_files:
        _missing_files(catalog, paths, found)
    return report


def _catalog_integrity(catalog: Catalog, found: _Collector) -> bool:
    """SQLite's own checks of the file; False when the catalog is damaged."""
    if catalog.sqlite_file is None:
        return True
    try:
        with catalog._read() as conn:
            result = [str(r[0]) for r in conn.exec_driver_sql("PRAGMA integrity_check(20)")]
            violations = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
    except sa.exc.DBAPIError as err:
        result, violations = [str(getattr(err, "orig", err)).splitlines()[0]], []
    if result != ["ok"]:
        # Rows may span lines ("*** in database main ***\nOn tree page 3 ..."): one finding per line.
        result = [line.strip() for row in result for line in row.splitlines()
                  if line.strip() and not line.startswith("***")] or ["integrity_check failed"]
        found.problem(
            "catalog_damaged",
            f"the catalog file {catalog.sqlite_file} is damaged ({result[0]}): copy it somewhere safe, then try "
            "`sqlite3 catalog.db .recover`, or move it away and run `facefind index DIR` to rebuild the index",
            count=len(result), examples=result)
        return False
    if violations:
        tables = Counter(f"{v[0]} -> {v[2]}" for v in violations)
        found.problem(
            "foreign_keys",
            f"PRAGMA foreign_key_check: {len(violations):,} rows point at missing rows "
            f"({', '.join(f'{n:,} {t}' for t, n in tables.items())}): `facefind check --repair` removes them",
            repairable=True, count=len(violations), examples=tables)
    return True


def _orphan_queries() -> dict[str, tuple[sa.Table, Any]]:
    """Rows that point at nothing, for every reference in the schema (any backend)."""
    p, lb, f, i = predictions, labels, faces, identities
    return {  # in this order, so that removing faces first leaves no new orphans behind
        "faces without their image": (f, ~sa.exists().where(images.c.id == f.c.image_id)),
        "predictions without their face": (p, ~sa.exists().where(faces.c.id == p.c.face_id)),
        "predictions without their model": (p, ~sa.exists().where(models.c.id == p.c.model_id)),
        "identities without their face": (i, ~sa.exists().where(faces.c.id == i.c.face_id)),
        "labels without their image": (lb, ~sa.exists().where(images.c.id == lb.c.image_id)),
        "labels without their label set": (lb, ~sa.exists().where(label_sets.c.id == lb.c.label_set_id)),
    }


def _rows(catalog: Catalog, found: _Collector) -> None:
    """Orphans (for backends without foreign_key_check) and duplicate predictions."""
    with catalog._read() as conn:
        if catalog.sqlite_file is None:
            for what, (table, where) in _orphan_queries().items():
                n = int(conn.execute(sa.select(sa.func.count()).select_from(table).where(where)).scalar() or 0)
                if n:
                    found.problem("orphans", f"{n:,} {what}: `facefind check --repair` removes them",
                                  repairable=True, count=n)
        dupes = conn.execute(
            sa.select(predictions.c.model_id, predictions.c.face_id)
            .group_by(predictions.c.model_id, predictions.c.face_id).having(sa.func.count() > 1)
        ).all()
    if dupes:
        found.problem("duplicate_predictions",
                      f"{len(dupes):,} (model, face) pairs have more than one prediction: the catalog's "
                      "primary key is broken; rebuild the index into a new --index folder",
                      count=len(dupes), examples=(f"model {m} face {i}" for m, i in dupes))


def _damaged_where(model: ModelRecord) -> Any:
    """Predictions of ``model`` whose blobs have a length no writer produces: probabilities are
    4*K bytes (float32); embeddings 2*D (float16, schema v4 on) or 4*D (float32, older rows)."""
    d = model.embedding_dim
    return ((predictions.c.model_id == model.id)
            & (sa.func.length(predictions.c.embedding).not_in([2 * d, 4 * d])
               | (sa.func.length(predictions.c.probs) != 4 * model.num_attributes)))


def _blobs(catalog: Catalog, every: list[ModelRecord], found: _Collector) -> None:
    """Predictions whose probabilities or embedding have the wrong number of bytes (export and
    publish refuse them)."""
    with catalog._read() as conn:
        for m in every:
            bad = list(conn.execute(sa.select(predictions.c.face_id).where(_damaged_where(m))
                                    .order_by(predictions.c.face_id)).scalars())
            if bad:
                found.problem("damaged_predictions",
                              f"{len(bad):,} predictions of model {m.id} are damaged (embeddings of neither "
                              f"{2 * m.embedding_dim} nor {4 * m.embedding_dim} bytes, or probabilities of "
                              f"other than {4 * m.num_attributes}): `facefind check --repair` removes them, then "
                              "`facefind index DIR` predicts those files again",
                              repairable=True, count=len(bad), examples=(f"face {i}" for i in bad))


def _paths(paths: dict[int, str], found: _Collector) -> None:
    """Duplicate paths, raw or after normalisation (each would make one file count twice)."""
    raw = Counter(paths.values())
    normal = Counter(normalize_path(p) for p in paths.values())
    dupes = sorted(p for p, n in normal.items() if n > 1)
    if dupes:
        found.problem("duplicate_paths",
                      f"{len(dupes):,} files are catalogued more than once "
                      f"({sum(n > 1 for n in raw.values()):,} with the very same path): rebuild the index "
                      "into a new --index folder", count=len(dupes), examples=dupes)
    odd = sorted(p for p in paths.values() if normalize_path(p) != p)
    if odd:
        found.warning("unnormalised_paths", f"{len(odd):,} catalogued paths are not absolute and "
                      "normalised (written by something other than facefind?)", count=len(odd), examples=odd)


def _coverage(catalog: Catalog, paths: dict[int, str], failed: set[str], current: ModelRecord | None,
              found: _Collector) -> None:
    """Images no model has predicted (a problem) and images the newest model has not (a warning)."""
    with catalog._read() as conn:
        predicted = sa.select(faces.c.image_id).join(predictions, predictions.c.face_id == faces.c.id).distinct()
        some = set(conn.execute(predicted).scalars())
        mine = set() if current is None else set(conn.execute(
            predicted.where(predictions.c.model_id == current.id)).scalars())
    bare = sorted(paths[i] for i in paths.keys() - some if paths[i] not in failed)
    if bare:
        found.problem("unpredicted_images",
                      f"{len(bare):,} catalogued images have no prediction from any model: run "
                      "`facefind index DIR` on their folder to predict them", count=len(bare), examples=bare)
    if current is None:
        return
    behind = sorted(paths[i] for i in (paths.keys() & some) - mine if paths[i] not in failed)
    if behind:
        found.warning("partial_model",
                      f"{len(behind):,} images have predictions from older models but not from model "
                      f"{current.id} (the one queries use): run `facefind index DIR --model "
                      f"{current.checkpoint or 'PATH'}` on their folder to include them in queries",
                      count=len(behind), examples=behind)


def _runs(catalog: Catalog, active: list[Any], found: _Collector) -> None:
    live = {r.id for r in active}
    dead = [r for r in catalog.runs() if r.status == "running" and r.id not in live]
    if dead:
        roots = sorted({r.root for r in dead})
        found.problem(
            "dead_runs",
            f"{len(dead):,} index runs are marked running but their process is gone (killed?): "
            f"`facefind check --repair` marks them interrupted; `facefind index {shlex.quote(roots[0])}` resumes",
            repairable=True, count=len(dead),
            examples=(f"run {r.id} on {r.root}, started {_when(r.started)}" for r in dead))
    for r in active:
        found.warning("active_run", f"index run {r.id} on {r.root} is in progress (started {_when(r.started)}): "
                      "queries see the last snapshot until it finishes")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _checkpoint(model: ModelRecord, is_current: bool, found: _Collector) -> None:
    """The checkpoint is needed to embed images (`query --like`, `similar`) and to re-index."""
    what = f"model {model.id} ({model.arch})"
    if not model.checkpoint:
        found.warning("checkpoint_unknown", f"{what} records no checkpoint file: `query --like` and "
                      "`similar` cannot embed images with it; re-index with --model PATH to record one")
        return
    path = Path(model.checkpoint)
    if not path.is_file():
        found.either(is_current, "checkpoint_missing",
                     f"{what}: its checkpoint {path} no longer exists: restore it (needed by `similar`, "
                     "`query --like` and `facefind index` without --model), or re-index with --model PATH")
        return
    try:
        digest = file_sha256(path)
    except OSError as err:
        found.either(is_current, "checkpoint_unreadable", f"{what}: cannot read {path} ({err.strerror}): "
                     "check its permissions")
        return
    if digest != model.sha256:
        found.either(is_current, "checkpoint_changed",
                     f"{what}: {path} has changed since the index was built with it (sha256 "
                     f"{digest[:12]}... instead of {model.sha256[:12]}...): restore the original, or re-index "
                     f"with `facefind index DIR --model {path} --rebuild`")


def _snapshot(catalog: Catalog, folder: Path, model: ModelRecord, is_current: bool, indexing: bool,
              found: _Collector) -> dict[str, Any]:
    """Compare a model's live snapshot and vector files with the catalog; return what was seen."""
    mdir = snapshots.model_dir(folder, model.id)
    what = f"the snapshot of model {model.id}"
    fix = "`facefind check --repair` rebuilds it"
    stamp = catalog.stamp(model.id)
    with catalog._read() as conn:
        ids = np.fromiter(conn.execute(  # the rows Catalog.export gives a snapshot
            sa.select(predictions.c.face_id).join(faces, faces.c.id == predictions.c.face_id)
            .join(images, images.c.id == faces.c.image_id)
            .where(predictions.c.model_id == model.id).order_by(predictions.c.face_id)).scalars(), dtype=np.int64)
    seen: dict[str, Any] = {"stamp": None, "count": 0, "vectors": 0, "catalog_stamp": stamp,
                            "catalog_count": int(ids.shape[0])}
    if snapshots.current_name(mdir) is None:
        found.either(is_current, "snapshot_missing", f"{what} is missing (no {mdir / snapshots.CURRENT}): {fix} "
                     "(queries also build it on first use)", repairable=True)
        return seen
    try:
        snap, manifest = snapshots.load_current(mdir)
    except CatalogError as err:
        gen = mdir / (snapshots.current_name(mdir) or "")
        if (gen / snapshots.MANIFEST).is_file() and not (gen / snapshots.VECTORS).is_file():
            found.problem("vectors", f"{what} ({gen.name}): its vector file {snapshots.VECTORS} is missing: "
                          f"{fix}", repairable=True)
        elif snapshots.VECTORS in str(err):
            found.problem("vectors", f"{what} ({gen.name}): {_first_line(err)}: {fix}", repairable=True)
        else:
            found.problem("snapshot_damaged", f"{what} cannot be read ({_first_line(err)}): {fix}",
                          repairable=True)
        return seen
    seen.update(stamp=snap.stamp, count=len(snap), folder=str(snap.folder))
    foreign = [name for name, ok in (("catalog", manifest.get("catalog_id") == catalog.catalog_id),
                                     ("checkpoint", manifest.get("sha256") == model.sha256),
                                     ("format", manifest.get("format") == snapshots.FORMAT)) if not ok]
    same_ids = ids.shape == snap.ids.shape and bool(np.array_equal(np.asarray(snap.ids), ids))
    if foreign:
        found.problem("snapshot_foreign", f"{what} ({snap.folder.name}) was built from another "
                      f"{' and '.join(foreign)}: {fix}", repairable=True)
    elif snap.stamp == stamp and not same_ids:
        found.problem("snapshot_inconsistent",
                      f"{what} is at the catalog's stamp {stamp} but holds {len(snap):,} images where the "
                      f"catalog has {ids.shape[0]:,} predictions (or other ids): {fix}", repairable=True)
    elif snap.stamp != stamp or not same_ids:
        if indexing:
            found.warning("snapshot_lagging", f"{what} is at stamp {snap.stamp} ({len(snap):,} images) while "
                          f"an index run writes stamp {stamp}: it is rebuilt when the run ends")
        else:
            found.either(is_current, "snapshot_stale",
                         f"{what} is out of step with the catalog (stamp {snap.stamp}, {len(snap):,} images; "
                         f"catalog: stamp {stamp}, {ids.shape[0]:,} predictions): {fix}"
                         + ("" if is_current else " (queries of this model also do)"), repairable=True)
    problem = _vector_problem(snap, manifest, model)
    if problem is not None:
        found.problem("vectors", f"{what} ({snap.folder.name}): {problem}: {fix}", repairable=True)
    else:
        seen["vectors"] = len(snap)
    return seen


def _vector_problem(snap: snapshots.Snapshot, manifest: dict[str, Any], model: ModelRecord) -> str | None:
    """What is wrong with a loaded generation's vector files, or None. The flat store's shape was
    checked by loading it; here its bytes are checked against the manifest's CRC-32, and the
    approximate index (when the manifest names one) is read and sized."""
    assert snap.folder is not None
    info = manifest.get("vectors") or {}
    if snap.emb.shape[1] != model.embedding_dim:
        return f"its vector file has dimension {snap.emb.shape[1]}, the model {model.embedding_dim}"
    if file_crc32(snap.folder / snapshots.VECTORS) != info.get("crc32"):
        return f"its vector file {snapshots.VECTORS} is damaged (its CRC-32 differs from the manifest's)"
    if not info.get("approximate"):
        return None
    path = snap.folder / snapshots.APPROX
    if not path.is_file():
        return f"its approximate index {path.name} is missing"
    if file_crc32(path) != info.get("approx_crc32"):
        return f"its approximate index {path.name} is damaged (its CRC-32 differs from the manifest's)"
    try:
        index = open_approx(path)
    except RuntimeError as err:
        return f"its approximate index {path.name} cannot be read ({_first_line(err)})"
    if index.ntotal != len(snap) or index.d != snap.emb.shape[1]:
        return f"its approximate index holds {index.ntotal:,} vectors of dimension {index.d} for {len(snap):,}"
    return None


def _had_approximate(folder: Path, model_id: int) -> bool:
    """Whether the live generation's manifest names an approximate index (readable or not)."""
    mdir = snapshots.model_dir(folder, model_id)
    try:
        manifest = json.loads((mdir / (snapshots.current_name(mdir) or "") / snapshots.MANIFEST).read_text("utf-8"))
        return bool((manifest.get("vectors") or {}).get("approximate"))
    except (OSError, ValueError, AttributeError):
        return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _stray(mdir: Path) -> list[Path]:
    """What killed snapshot writers leave in a model folder: staging folders (``.tmp-gen-*``),
    temp files of ``atomic_replace`` (``.CURRENT.*.tmp``; ``.tmp-CURRENT-*`` from older versions),
    and temp files inside generations."""
    return [*mdir.glob(".tmp-*"), *mdir.glob(".*.tmp"),
            *(p for gen in mdir.glob("gen-*") if gen.is_dir() for p in gen.glob(".*.tmp"))]


def _leftovers(mdir: Path, found: _Collector) -> None:
    """Staging folders and temp files left by a snapshot writer that was killed mid-save."""
    if not mdir.is_dir():
        return
    stray = sorted(str(p) for p in _stray(mdir))
    if stray:
        found.warning("leftovers", f"{len(stray):,} temporary files or folders in {mdir} were left by an "
                      "interrupted snapshot save: `facefind check --repair` removes them",
                      repairable=True, count=len(stray), examples=stray)


def _missing_files(catalog: Catalog, paths: dict[int, str], found: _Collector) -> None:
    gone = sorted(p for p in paths.values() if not os.path.exists(p))
    if not gone:
        return
    roots = sorted({r.root for r in catalog.runs()}, key=len, reverse=True)
    where: Counter[str] = Counter()
    for p in gone:
        where[next((r for r in roots if p.startswith(r.rstrip(os.sep) + os.sep)), os.path.dirname(p))] += 1
    existing = [r for r, _ in where.most_common() if os.path.isdir(r)]
    how = "; ".join(f"`facefind index {shlex.quote(r)} --prune`" for r in existing[:3])
    how = f"{how}, or `facefind check --prune`" if how else "`facefind check --prune`"
    found.problem("files_missing", f"{len(gone):,} indexed files no longer exist on disk (queries still "
                  f"return them): forget them with {how}", count=len(gone), examples=gone)


# ---------------------------------------------------------------------------------------- repairing


def _repair(catalog: Catalog, folder: Path, report: CheckReport, prune: bool) -> tuple[list[str], list[Finding]]:
    """Fix what ``report`` found that is derived or bookkeeping; return what was done and what failed."""
    kinds = {f.kind for f in report.problems + report.warnings if f.repairable}
    if "catalog_damaged" in {f.kind for f in report.problems}:
        return [], []  # nothing derived can be trusted from a damaged file
    done: list[str] = []
    failed: list[Finding] = []
    if prune:
        with catalog._read() as conn:
            every = list(conn.execute(sa.select(images.c.path)).scalars())
        gone = [p for p in every if not os.path.exists(p)]
        gone += [f.path for f in catalog.failures() if not os.path.lexists(f.path)]
        removed = catalog.prune(gone)
        if gone:
            done.append(f"forgot {removed:,} images whose files are gone (and their failures)")
            kinds.add("snapshot_stale")
    if kinds & {"orphans", "foreign_keys"}:
        done.append(_remove_orphans(catalog))
    if "damaged_predictions" in kinds:
        done.append(_remove_damaged(catalog))
    if "dead_runs" in kinds:
        done.append(_close_dead_runs(catalog))
    if "leftovers" in kinds:
        done.extend(_remove_leftovers(catalog, folder))
    if kinds & {"snapshot_missing", "snapshot_damaged", "snapshot_foreign", "snapshot_inconsistent",
                "snapshot_stale", "vectors", "foreign_keys", "orphans", "damaged_predictions"}:
        rebuilt, failed = _rebuild_snapshots(catalog, folder)
        done.extend(rebuilt)
    return [d for d in done if d], failed


def _remove_orphans(catalog: Catalog) -> str:
    removed = 0
    with catalog._write() as conn:
        hit = set()
        for table, where in _orphan_queries().values():
            if table is predictions:
                hit |= set(conn.execute(sa.select(predictions.c.model_id).where(where).distinct()).scalars())
            removed += conn.execute(sa.delete(table).where(where)).rowcount or 0
        if hit:  # the affected models' snapshots are now out of date
            conn.execute(sa.update(models).where(models.c.id.in_(hit)).values(generation=models.c.generation + 1))
    return f"removed {removed:,} rows that pointed at missing images, models or label sets" if removed else ""


def _remove_damaged(catalog: Catalog) -> str:
    """Delete damaged predictions (their files are predicted again by the next `facefind index`,
    which skips only files that have one) and bump the models they belonged to."""
    removed, every = 0, catalog.models()
    with catalog._write() as conn:
        for m in every:
            n = conn.execute(sa.delete(predictions).where(_damaged_where(m))).rowcount or 0
            if n:
                conn.execute(sa.update(models).where(models.c.id == m.id).values(generation=models.c.generation + 1))
                removed += n
    return f"removed {removed:,} damaged predictions: `facefind index DIR` predicts their files again" if removed else ""


def _close_dead_runs(catalog: Catalog) -> str:
    live = {r.id for r in catalog.active_runs()}
    dead = [r.id for r in catalog.runs() if r.status == "running" and r.id not in live]
    if not dead:
        return ""
    with catalog._write() as conn:
        conn.execute(sa.update(runs).where(runs.c.id.in_(dead) & (runs.c.status == "running"))
                     .values(status="interrupted", finished=time.time()))
    return f"marked {len(dead):,} dead runs interrupted ({', '.join(map(str, dead))})"


def _remove_leftovers(catalog: Catalog, folder: Path) -> list[str]:
    """Remove staging leftovers, holding each model folder's writer lock (a live writer's own
    staging folder exists only while it holds that lock, so what we find is abandoned)."""
    done = []
    for m in catalog.models():
        mdir = snapshots.model_dir(folder, m.id)
        if not mdir.is_dir():
            continue
        with snapshots.writer_lock(mdir) as locked:
            if not locked:
                continue
            stray = _stray(mdir)
            for p in stray:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()
            if stray:
                done.append(f"removed {len(stray):,} leftovers of interrupted saves in {mdir}")
    return done


def _rebuild_snapshots(catalog: Catalog, folder: Path) -> tuple[list[str], list[Finding]]:
    """Write a fresh snapshot (vector files included) of every model with predictions whose
    snapshot is not exactly in step; a rebuild is forced rather than trusting a manifest that may
    be wrong. The embeddings live only in the vector store, so a damaged one is rebuilt from the
    catalog, like any other part of the snapshot."""
    done, failed = [], []
    with catalog._read() as conn:
        counts = dict(conn.execute(
            sa.select(predictions.c.model_id, sa.func.count()).group_by(predictions.c.model_id)).all())
    for m in catalog.models():
        if not counts.get(m.id):
            continue
        if (hold := catalog.publish_hold(m.id)) is not None:
            # A sharded build is filling the catalog: publishing now would serve only some shards.
            failed.append(Finding("publish_held", f"model {m.id} is being indexed in {hold.get('shards', 'several')} "
                                  "shards, so its snapshot was not rebuilt: run `facefind index FOLDER --finalize` "
                                  "once every shard is done"))
            continue
        probe = CheckReport(index_dir=str(folder), catalog="")
        _snapshot(catalog, folder, m, True, False, _Collector(probe))
        if not probe.problems:
            continue
        try:
            stamp, preds = catalog.export(m.id)
            # A generation that carried an approximate index gets one again, whatever its size.
            snapshots.write_snapshot(folder, m, stamp, preds.ids, preds.paths, preds.probs, preds.emb,
                                     catalog_id=catalog.catalog_id,
                                     approx_min=0 if _had_approximate(folder, m.id) else None,
                                     **snapshots.entry_fields(preds))
            snap = snapshots.load_snapshot(folder, m.id)
            if not np.array_equal(np.asarray(snap.ids), preds.ids):
                raise CatalogError(f"the snapshot written in {snap.folder} does not hold the catalog's ids")
            snapshots.record_published(folder, catalog)
            done.append(f"rebuilt the snapshot of model {m.id} ({len(preds.ids):,} images, stamp {stamp})")
        except (CatalogError, OSError, RuntimeError, ValueError) as err:
            failed.append(Finding("repair_failed", f"could not rebuild the snapshot of model {m.id}: "
                                  f"{_first_line(err)}"))
    return done, failed
