"""The indexing loop: reader -> runner -> writer, timed per stage, resumable, crash-safe.

``index_folder`` is what ``facefind index`` calls. Exactly-once comes from the catalog: every
batch is one transaction keyed by path (``Catalog.write_batch``), so a run killed at any moment
(kill -9 included) loses at most the batches in flight, and the next run skips what was committed
(same path, size and mtime) and redoes the rest. The snapshot (sidecar arrays + FAISS) is derived
from the catalog and rebuilt when out of step, so it can never hold rows the catalog lacks.
Ctrl-C stops at a batch boundary: queued batches are committed, the snapshot is synced, the run is
marked 'interrupted', and the report says so.

Sharded runs (``shard=(K, N)``, or RANK/WORLD_SIZE under torchrun) index only the files whose
relative path hashes to shard K (``facefind.trainer.distributed.shard_of``). They hold back the snapshot
(``Catalog.hold_publish``) so queries keep the last complete one; it is published once every file
is in the catalog: by rank 0 after a barrier under torchrun, else by ``finalize_index``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, TypeVar

import numpy as np
import torch

from facefind.db.catalog import Catalog, latest_checkpoint
from facefind.db.errors import CatalogError, DatasetError, ModelError
from facefind.db.files import file_sha256
from facefind.db.paths import default_index_dir
from facefind.db.snapshot import sync_snapshot
from facefind.indexer import people
from facefind.indexer.discovery import IMAGE_EXTENSIONS, Failure, FileEntry, discover, split_unchanged
from facefind.indexer.faces.detect import looks_aligned
from facefind.indexer.reader import ImageReader
from facefind.indexer.routing import DecodedBatch, FaceFinder, Rows, on_device
from facefind.indexer.runner import Runner, load_runner
from facefind.indexer.writer import CatalogWriter, WriteJob
from facefind.trainer import distributed
from facefind.trainer.celeba import locate, read_attributes, read_partition
from facefind.trainer.checkpoint import CheckpointMeta, read_checkpoint
from facefind.trainer.device import describe_device, resolve_device
from facefind.trainer.distributed import shard_of

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (files done, files to do)
INDEX_BARRIER_TIMEOUT_S = 86400.0  # ranks wait at the end for the slowest shard (hours on big collections)
T = TypeVar("T")


@dataclass
class IndexReport:
    """What one ``index_folder`` call did. ``timings`` are seconds per stage.

    read_decode and infer are time on the critical path (waiting for decoded batches, running the
    model); write is the writer thread's commit time, which overlaps them; decode_cpu is the CPU
    time the decoding workers spent (summed over them: with --detect-faces / --identity mostly dlib).
    """

    folder: str
    index_dir: str
    model_id: int
    run_id: int
    status: str  # finished | interrupted
    indexed: int
    unchanged: int
    failed: int
    failures: list[Failure]
    pruned: int
    labelled: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    shard: str = ""  # "K/N" for a sharded run
    published: bool = True  # whether this run published the snapshot (sharded: only the last step does)
    identity: dict[str, int] | None = None  # --identity: {"described": entries looked at, "no_face": without one}
    faces: int | None = None  # index entries written (--detect-faces: one per face; else one per file)

    @property
    def images_per_second(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON form ``facefind index --json`` prints."""
        return {
            "indexed": self.indexed,
            "faces": self.faces if self.faces is not None else self.indexed,
            "unchanged": self.unchanged,
            "failed": self.failed,
            "failures": [{"path": f.path, "reason": f.reason} for f in self.failures],
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 1),
            "pruned": self.pruned,
            "labelled": self.labelled,
            "status": self.status,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "model_id": self.model_id,
            "run_id": self.run_id,
            "index": self.index_dir,
            "folder": self.folder,
            "device": self.device,
            "shard": self.shard or None,
            "published": self.published,
            "identity": self.identity,
        }


def index_folder(
    folder: str | os.PathLike[str],
    model_path: str | os.PathLike[str] | None = None,
    index_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 256,
    device: str = "auto",
    workers: int | None = None,
    recursive: bool = False,
    rebuild: bool = False,
    prune: bool = False,
    faces: FaceFinder | None = None,
    progress: Progress | None = None,
    shard: tuple[int, int] | None = None,
) -> IndexReport:
    """Index the images of ``folder`` into the index at ``index_dir`` with one model.

    ``model_path`` defaults to the model the index was last built with. Files already indexed by
    this model with the same size and mtime are skipped unless ``rebuild``; ``prune`` forgets
    catalogued files under ``folder`` that no longer exist. Ground-truth labels are stored when
    CelebA annotation files sit in or above ``folder``. Raises DatasetError (missing, unreadable
    or empty folder), ModelError (no or bad model), CatalogError (index not writable).
    ``shard=(K, N)`` indexes only shard K of N (see the module docstring); under torchrun the
    shard comes from RANK and WORLD_SIZE and each rank uses GPU LOCAL_RANK. ``faces`` (see
    ``facefind.indexer.routing.FaceFinder``): with ``detect`` (``--detect-faces``) each face of a photo is
    its own entry, all of a file's faces committed in one transaction; with ``identity``
    (``--identity``) each entry's identity descriptor is stored beside its prediction, and files
    indexed without one are read again.
    """
    k, n, launched = _which_shard(shard)
    if prune and n > 1:
        raise DatasetError("--prune cannot run in shards: finalize, then run `facefind index FOLDER --prune` once")

    start = time.perf_counter()
    timings: dict[str, float] = {}
    if batch_size < 1:
        raise DatasetError(f"--batch-size must be at least 1, got {batch_size}")
    found = discover(folder, recursive)
    root = Path(folder).expanduser().resolve()
    if not found.files and not found.failures:
        raise DatasetError(_empty_message(root, recursive))
    everything = found
    if n > 1:
        found = _shard_files(found, root, k, n)
    timings["discover"] = time.perf_counter() - start

    dev = resolve_device(distributed.local_device(device) if launched else device)
    if launched:
        distributed.setup(None, timeout=distributed.timeout_s(INDEX_BARRIER_TIMEOUT_S))
        if workers is None:  # the node's cores, shared between its ranks' decoders
            workers = distributed.cpus_per_process()
    index_dir = (Path(index_dir).expanduser() if index_dir is not None else default_index_dir()).absolute()
    model_path = choose_model(index_dir, model_path)
    # One read of the checkpoint, hashed and parsed from the same bytes; before the catalog opens,
    # so a damaged checkpoint creates no index. The weights go to the device later.
    checkpoint, sha256 = read_checkpoint(model_path)
    meta = CheckpointMeta.from_dict(checkpoint["meta"])
    catalog = Catalog.open(index_dir)
    try:
        t = time.perf_counter()
        plan = _plan(catalog, found, root, sha256, faces, rebuild=rebuild, prune=prune)
        todo, unchanged = plan.todo, plan.unchanged
        identity = faces is not None and faces.identity
        timings["plan"] = time.perf_counter() - t

        with ImageReader(meta.img_size, batch_size, workers, faces=faces, gpu_jpeg=dev.type == "cuda") as reader:
            if todo:
                reader.start()  # the decoders start up while the model loads
            t = time.perf_counter()
            runner = load_runner(model_path, dev, checkpoint)
            del checkpoint  # the weights now live in the model
            timings["load_model"] = time.perf_counter() - t
            # Registered once its weights load: a checkpoint that fails never becomes the default.
            model_id = _register(catalog, model_path, meta, sha256, root, k, n, launched)
            run_id = catalog.start_run(model_id, root)
            writer = CatalogWriter(catalog, model_id, plan.labels, plan.label_names, splits=plan.splits)
            failures: list[Failure] = list(found.failures)
            completed, ended = False, "failed"
            try:
                if found.failures:
                    writer.put(WriteJob(Rows(), np.zeros((0, 0)), np.zeros((0, 0)), found.failures))
                status = _run(todo, reader, runner, writer, dev, failures, timings, progress)
                writer.close()  # commits what is queued, also after Ctrl-C
                timings["write"] = writer.seconds
                t = time.perf_counter()
                if n == 1:
                    _publish(catalog, index_dir, model_id)
                timings["snapshot"] = time.perf_counter() - t
                if n == 1 and identity:
                    timings["people"] = _place_new_faces(catalog, index_dir)
                completed = True
            except KeyboardInterrupt:  # a second Ctrl-C, while committing or saving the snapshot
                ended = "interrupted"
                raise
            finally:
                if not completed:
                    writer.abandon()
                    _finish_quietly(catalog, run_id, ended)
        seconds = time.perf_counter() - start
        timings["total"] = seconds
        report = IndexReport(
            folder=str(root), index_dir=str(index_dir), model_id=model_id, run_id=run_id, status=status,
            indexed=writer.written, unchanged=unchanged, failed=len(failures), failures=failures,
            pruned=plan.pruned, labelled=writer.labelled, seconds=seconds, timings=timings,
            device=describe_device(dev), shard=f"{k}/{n}" if n > 1 else "", published=n == 1,
            identity={"described": writer.described, "no_face": writer.no_face} if identity else None,
            faces=writer.faces,
        )
        catalog.finish_run(run_id, status, _counts(report), timings)
        if launched and status == "finished":
            distributed.barrier()  # every rank's files are committed
            if k == 0:
                t = time.perf_counter()
                _finalize(catalog, index_dir, model_id, root, everything, n)
                report.timings["snapshot"] = time.perf_counter() - t
                if identity:
                    report.timings["people"] = _place_new_faces(catalog, index_dir)
                report.published = True
        return report
    finally:
        catalog.close()


def _place_new_faces(catalog: Catalog, index_dir: Path) -> float:
    """After a run with identities: new faces join the persons they clearly belong to, or start
    new ones (only once `facefind people` has grouped the index). Returns the seconds taken."""
    t = time.perf_counter()
    placed = people.assign_new(catalog, index_dir)
    if placed.placed:
        log.info("placed %d new faces among %d persons", placed.placed, placed.persons)
    return time.perf_counter() - t


@dataclass(frozen=True)
class _Plan:
    """What a run will do: the files to read, how many are unchanged, the labels to store."""

    todo: list[FileEntry]
    unchanged: int
    pruned: int
    label_names: list[str] | None
    labels: dict[str, np.ndarray]
    splits: dict[str, int]  # of labelled files, when the annotated folder has a partition file


def _plan(catalog: Catalog, found: Any, root: Path, sha256: str, faces: FaceFinder | None, *,
          rebuild: bool, prune: bool) -> _Plan:
    """Split the found files into unchanged ones and ones to read (forgetting whole-photo entries
    that ``--detect-faces`` replaces), prune what is gone, and read the ground truth beside them."""
    known_id = next((m.id for m in catalog.models() if m.sha256 == sha256), None)
    identity = faces is not None and faces.identity
    known = {} if rebuild or known_id is None else catalog.known_files(known_id, identity=identity)
    if known and faces is not None and faces.detect:
        _forget_whole_photos(catalog, known_id, known)
    todo, unchanged = split_unchanged(found.files, known)
    pruned = _prune(catalog, root) if prune else 0
    label_names, labels, splits = _ground_truth(root, todo) if todo else (None, {}, {})
    log.info("%d image files in %s: %d to index, %d unchanged, %d unreadable",
             len(found.files) + len(found.failures), root, len(todo), unchanged, len(found.failures))
    return _Plan(todo, unchanged, pruned, label_names, labels, splits)


def _register(catalog: Catalog, model_path: Path, meta: CheckpointMeta, sha256: str, root: Path,
              k: int, n: int, launched: bool) -> int:
    """Record the model in the catalog; in a sharded build, hold publishing before any rank writes."""
    model_id = catalog.register_model(
        sha256, meta.arch, meta.attributes, meta.all_threshold_sets()[meta.query_set()],
        meta.embedding_dim, str(model_path), _model_meta(meta),
    )
    log.info("model %d: %s (%s, %d attributes, input %dx%d)", model_id, model_path, meta.arch,
             len(meta.attributes), *meta.img_size)
    if n > 1 and (k == 0 or not launched):  # before any write: no query may publish a partial build
        catalog.hold_publish(model_id, {"shards": n, "root": str(root)})
    if launched:
        distributed.barrier()  # rank 0 holds before any rank writes
    return model_id


@dataclass
class FinalizeReport:
    """What ``finalize_index`` published: the snapshot of every shard's predictions."""

    folder: str
    index_dir: str
    model_id: int
    images: int
    stamp: int
    shards: int | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, "index": self.index_dir, "model_id": self.model_id, "images": self.images,
                "stamp": self.stamp, "shards": self.shards, "seconds": round(self.seconds, 3), "published": True}


def finalize_index(
    folder: str | os.PathLike[str],
    model_path: str | os.PathLike[str] | None = None,
    index_dir: str | os.PathLike[str] | None = None,
    recursive: bool = False,
) -> FinalizeReport:
    """Publish the snapshot after separate ``--shard K/N`` runs, once every file of ``folder`` is in.

    Raises CatalogError naming the shards to run (again) while any readable file lacks a current
    prediction; the previous snapshot stays published until then.
    """
    start = time.perf_counter()
    found = discover(folder, recursive)
    root = Path(folder).expanduser().resolve()
    index_dir = (Path(index_dir).expanduser() if index_dir is not None else default_index_dir()).absolute()
    model_path = choose_model(index_dir, model_path)
    sha256 = _sha256(model_path)
    with Catalog.open(index_dir, create=False) as catalog:
        model_id = next((m.id for m in catalog.models() if m.sha256 == sha256), None)
        if model_id is None:
            raise CatalogError(f"no shard has indexed {root} with {model_path} yet: run "
                               "`facefind index FOLDER --shard K/N` for every K first")
        hold = catalog.publish_hold(model_id)
        shards = int(hold["shards"]) if hold and "shards" in hold else None
        snap = _finalize(catalog, index_dir, model_id, root, found, shards)
    return FinalizeReport(folder=str(root), index_dir=str(index_dir), model_id=model_id, images=len(snap),
                          stamp=snap.stamp, shards=shards, seconds=time.perf_counter() - start)


def _which_shard(shard: tuple[int, int] | None) -> tuple[int, int, bool]:
    """(K, N, launched by torchrun): the explicit shard, else RANK/WORLD_SIZE, else (0, 1)."""
    if shard is not None:
        k, n = shard
        if not (n >= 1 and 0 <= k < n):
            raise DatasetError(f"bad shard {k}/{n}: K must be 0..N-1")
        return int(k), int(n), False
    here = distributed.env_info()
    return here.rank, here.world_size, here.distributed


def _shard_files(found: Any, root: Path, k: int, n: int) -> Any:
    """The part of a discovery (files and unreadable entries) that shard ``k`` of ``n`` owns."""
    def mine(path: str) -> bool:
        return shard_of(os.path.relpath(path, root), n) == k

    return type(found)([f for f in found.files if mine(f.path)], [f for f in found.failures if mine(f.path)])


def _finalize(catalog: Catalog, index_dir: Path, model_id: int, root: Path, found: Any, shards: int | None) -> Any:
    """Check that every readable file of ``found`` has a current prediction, then publish."""
    todo, _ = split_unchanged(found.files, catalog.known_files(model_id))
    failed = {f.path for f in catalog.failures()}
    missing = [f for f in todo if f.path not in failed]
    if missing:
        where = ""
        if shards:
            owners = sorted({shard_of(os.path.relpath(f.path, root), shards) for f in missing})
            where = " (shard " + ", ".join(f"{s}/{shards}" for s in owners) + ")"
        raise CatalogError(
            f"{len(missing):,} files of {root} are not indexed yet{where}, e.g. {missing[0].path}: run "
            "`facefind index FOLDER --shard K/N` for them, then `--finalize` again (queries keep the "
            "previous snapshot until then)"
        )
    return _publish(catalog, index_dir, model_id)


def _publish(catalog: Catalog, index_dir: Path, model_id: int) -> Any:
    """Write the snapshot from the complete catalog, then lift any sharded-build hold."""
    snap = _sync(catalog, index_dir, model_id)
    if catalog.publish_hold(model_id) is not None:
        catalog.release_publish(model_id)
        log.info("published the snapshot of model %d: %d images (stamp %d)", model_id, len(snap), snap.stamp)
    return snap


def _run(
    todo: list[FileEntry],
    reader: ImageReader,
    runner: Runner,
    writer: CatalogWriter,
    device: torch.device,
    failures: list[Failure],
    timings: dict[str, float],
    progress: Progress | None,
) -> str:
    """Drive reader -> runner -> writer over ``todo``; 'finished', or 'interrupted' on Ctrl-C."""
    timings.setdefault("read_decode", 0.0)
    timings.setdefault("infer", 0.0)
    timings.setdefault("decode_cpu", 0.0)
    done = 0
    if progress is not None:
        progress(0, len(todo))
    batches: Generator[tuple[Rows, Any, list[Failure]], None, None]
    decoded = _decode_cpu(reader.batches(todo), timings)
    if device.type == "cuda":
        batches = _device_batches(decoded, runner.img_size, device)
    else:
        batches = (on_device(b, runner.img_size, device) for b in decoded)
    try:
        while True:
            t = time.perf_counter()
            item = next(batches, None)
            timings["read_decode"] += time.perf_counter() - t
            if item is None:
                return "finished"
            rows, pixels, bad = item
            t = time.perf_counter()
            probs, emb = runner(pixels)
            timings["infer"] += time.perf_counter() - t
            writer.put(WriteJob(rows, probs, emb, bad))
            failures.extend(bad)
            done += len({e.path for e in rows.entries}) + len(bad)
            if progress is not None:
                progress(done, len(todo))
    except KeyboardInterrupt:
        log.warning("interrupted: committing the batches already processed (%d files)", done)
        return "interrupted"
    finally:
        batches.close()  # stops a decode thread (GPU path) before the reader shuts down


def _decode_cpu(batches: Iterable[DecodedBatch], timings: dict[str, float]) -> Generator[DecodedBatch, None, None]:
    """Pass ``batches`` through, adding the CPU time their workers spent (reading, decoding, and
    with --detect-faces / --identity finding and describing faces) to ``timings["decode_cpu"]``."""
    for batch in batches:
        timings["decode_cpu"] += batch.seconds
        yield batch


def _device_batches(
    batches: Iterable[DecodedBatch], size: tuple[int, int], device: torch.device
) -> Generator[tuple[Rows, Any, list[Failure]], None, None]:
    """``on_device`` each batch (nvJPEG for Jpegs) in a producer thread on its own CUDA stream,
    one batch ahead.

    Decoding and the forward pass then overlap on the GPU (they compete for the same
    multiprocessors, but neither waits for the other to be issued).
    """
    stream = torch.cuda.Stream(device)

    def decode(batch: DecodedBatch) -> tuple[Any, ...]:
        with torch.cuda.stream(stream):
            rows, pixels, failures = on_device(batch, size, device)
            ready = torch.cuda.Event()
            ready.record(stream)
        return rows, pixels, failures, ready

    main = torch.cuda.current_stream(device)
    decoded = _threaded(map(decode, batches), depth=2)
    try:
        for rows, pixels, bad, ready in decoded:
            main.wait_event(ready)
            pixels.record_stream(main)  # its memory belongs to the side stream's allocator pool
            yield rows, pixels, bad
    finally:
        decoded.close()


def _threaded(items: Iterable[T], depth: int) -> Generator[T, None, None]:
    """Iterate ``items`` in a background thread, up to ``depth`` ahead; errors re-raised here."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer is gone

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put(("error", err))

    thread = threading.Thread(target=produce, name="facefind-decode", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


def choose_model(index_dir: str | os.PathLike[str] | None, model_path: str | os.PathLike[str] | None = None, *,
                 models_dir: Path | None = None) -> Path:
    """Which checkpoint to use with the index at ``index_dir`` (None: the default index):
    ``model_path`` when given, else the one the index was last built with. ``index`` and
    ``finalize_index`` stop there (a ModelError saying to pass --model); ``predict`` passes
    ``models_dir`` to fall back on the newest checkpoint in it when the index has no model, or its
    model's file is gone."""
    if model_path is not None:
        return Path(model_path).expanduser()
    index_dir = Path(index_dir).expanduser() if index_dir is not None else default_index_dir()
    recorded = latest_checkpoint(index_dir)
    if recorded is not None and recorded.is_file():
        return recorded
    if models_dir is None:
        if recorded is None:
            raise ModelError(f"no model given and none recorded in the index at {index_dir}: pass --model PATH "
                             "(a checkpoint from `facefind train`)")
        raise ModelError(f"the index was built with {recorded}, which no longer exists: pass --model PATH")
    if recorded is not None:
        log.warning("the index's model %s no longer exists; looking in %s", recorded, models_dir)
    found = [p for p in models_dir.glob("*.pt") if not p.name.startswith(".")
             and not p.name.endswith(".state.pt")] if models_dir.is_dir() else []
    if found:
        return max(found, key=lambda p: (p.stat().st_mtime, p.name))
    raise ModelError(f"no model to predict with (none in the index at {index_dir} nor in {models_dir}): "
                     "pass --model PATH, or train one with `facefind train DATA`")


def _sha256(model_path: Path) -> str:
    """The checkpoint's sha256 alone (``finalize_index`` needs no weights)."""
    try:
        return file_sha256(model_path)
    except OSError as err:
        raise ModelError(f"cannot read {model_path}: {err.strerror}") from None


def _model_meta(meta: Any) -> dict[str, Any]:
    """The checkpoint meta worth keeping in the catalog (no per-epoch training history).

    It records every threshold set, their val precision/recall per attribute, and which set the
    index's queries use for bare names (``threshold_set``; the models.thresholds column holds it).
    """
    keep = ("arch", "img_size", "mean", "std", "embedding_dim", "pretrained", "epoch", "best_epoch",
            "val_metrics", "test_metrics", "versions", "created")
    data = meta.to_dict()
    out = {k: data[k] for k in keep if k in data}
    out["threshold_set"] = meta.query_set()
    out["threshold_sets"] = meta.all_threshold_sets()
    out["threshold_stats"] = meta.all_threshold_stats()
    if not meta.threshold_sets:
        log.warning("this checkpoint has only %s thresholds (it predates retrieval thresholds): queries use "
                    "them for bare names; retrain it to get F1 thresholds, which find rare attributes",
                    out["threshold_set"])
    return out


def _forget_whole_photos(catalog: Catalog, model_id: int, known: dict[str, Any]) -> None:
    """For ``--detect-faces``: drop from ``known`` the photos indexed whole (without it), so that
    they are read again and each of their faces becomes an entry; aligned CelebA-style crops,
    which detection keeps whole, stay known."""
    stale = [path for path, (width, height) in catalog.whole_files(model_id).items()
             if path in known and not (width and height and looks_aligned((height, width)))]
    for path in stale:
        del known[path]
    if stale:
        log.info("--detect-faces: %d photos indexed whole before are read again, face by face", len(stale))


def _prune(catalog: Catalog, root: Path) -> int:
    """Forget catalogued images (and recorded failures) under ``root`` whose files are gone."""
    prefix = str(root).rstrip(os.sep) + os.sep
    gone = [p for p in catalog.image_paths(under=root) if not os.path.exists(p)]
    gone += [f.path for f in catalog.failures() if f.path.startswith(prefix) and not os.path.lexists(f.path)]
    removed = catalog.prune(gone)
    if removed:
        log.info("pruned %d images whose files are gone", removed)
    return removed


def _ground_truth(root: Path, files: list[FileEntry]
                  ) -> tuple[list[str] | None, dict[str, np.ndarray], dict[str, int]]:
    """CelebA annotations kept in or above ``root``, as ``(attribute names, {path: 0/1 labels},
    {path: split})``, the split (0 train, 1 val, 2 test) from the partition file beside them.

    Only files directly in the annotated image folder get labels (CelebA names are not unique
    across folders). A malformed annotation file is logged and ignored: it must not stop indexing.
    """
    try:
        loc = locate(root)
        ann = read_attributes(loc.attr_file)
    except DatasetError as err:
        if "no annotation file" not in str(err):
            log.warning("ground-truth labels not stored: %s", err)
        return None, {}, {}
    try:
        partition = read_partition(loc.partition_file)
    except DatasetError as err:
        log.warning("splits not stored: %s", err)
        partition = {}
    row = {name: i for i, name in enumerate(ann.names)}
    image_dir = str(loc.image_dir)
    labels, splits = {}, {}
    for f in files:
        parent, name = os.path.split(f.path)
        i = row.get(name)
        if i is not None and parent == image_dir:
            labels[f.path] = ann.labels[i]
            if name in partition:
                splits[f.path] = partition[name]
    if labels:
        log.info("ground truth: %d images annotated in %s", len(labels), loc.attr_file)
    return ann.attributes, labels, splits


def _empty_message(root: Path, recursive: bool) -> str:
    exts = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
    message = f"no images ({exts}) in {root}"
    if not recursive and any(entry.is_dir() for entry in os.scandir(root)):
        message += ": add --recursive to look in its subfolders"
    else:
        message += ": give the folder that holds the images"
    return message


def _counts(report: IndexReport) -> dict[str, int]:
    return {"indexed": report.indexed, "unchanged": report.unchanged, "failed": report.failed,
            "pruned": report.pruned}


def _finish_quietly(catalog: Catalog, run_id: int, status: str) -> None:
    """Close a run as ``status`` while an error propagates; never mask that error."""
    try:
        catalog.finish_run(run_id, status)
    except Exception:  # noqa: BLE001
        log.debug("could not mark run %d failed", run_id, exc_info=True)


def _sync(catalog: Catalog, index_dir: Path, model_id: int) -> Any:
    """Bring the snapshot of ``model_id`` (sidecar arrays and vector store) in step with the catalog.

    It is rebuilt when missing, damaged or stale, so a run that indexes nothing still repairs it.
    """
    return sync_snapshot(catalog, index_dir, model_id, reuse_while_indexing=False)  # our run is 'running'
