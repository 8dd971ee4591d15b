"""Catalog benchmark: write throughput and query cold start, SQLite against other databases.

``run_catalog_bench(urls, n)`` writes ``n`` predictions (40 float32 probabilities and a float32
embedding each, what the indexer stores per image) through ``Catalog.write_batch`` in batches of
the indexer's size, into each catalog in turn: the index folder's SQLite file and every URL given
(e.g. a PostgreSQL database). For each it then times the export that rebuilds a snapshot, the
publish of that snapshot, and whole-process ``facefind query`` runs against it (cold start: a new
interpreter each time) and the engine's in-process latency. Everything runs in one process, one
catalog after the other, so the figures are comparable; the machine's noise still applies.

Two more write figures per catalog, after the publish: the same ``n`` rows through the indexer's
writer stage (``CatalogWriter``: rows already in memory, no model, the commits on its background
thread), which should agree with the direct figure; and ``writers`` processes writing ``n`` rows
between them at once, as the shards of a sharded run do (PostgreSQL: they should add up; SQLite has
one writer at a time). These go into the same catalog under another model and other paths, so the
tables already hold the first ``n`` rows.

Queries read the snapshot in the index folder, not the database, so their figures should not
depend on the catalog's backend: the benchmark shows whether they do.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import sqlalchemy as sa

from facefind.db.catalog import Catalog, IndexedImage
from facefind.db.errors import CatalogError
from facefind.db.snapshot import current_snapshot_fast, load_snapshot, sync_snapshot
from facefind.indexer.discovery import FileEntry
from facefind.indexer.routing import Rows
from facefind.indexer.writer import CatalogWriter, WriteJob
from facefind.retrieval.bench.query import CELEBA_BASE_RATES
from facefind.retrieval.engine import Engine

log = logging.getLogger(__name__)

EXPRESSION = "Big_Nose and Eyeglasses and not Male"


def _label(url: str | None) -> str:
    if url is None:
        return "sqlite (index folder)"
    return sa.engine.make_url(url).render_as_string(hide_password=True)


def _write_all(catalog: Any, n: int, k: int, d: int, batch_size: int, seed: int) -> tuple[int, float]:
    """Register a model and write ``n`` rows in batches; return (model id, seconds writing)."""
    model_id = _register(catalog, k, d, seed)
    seconds = 0.0
    for paths, probs, emb in _batches(n, k, d, batch_size, seed, "/bench/img_align_celeba"):
        rows = [IndexedImage(p, 12_000, 1.0, 178, 218, probs[i], emb[i]) for i, p in enumerate(paths)]
        t0 = time.perf_counter()  # only the catalog's work is timed, not making up the rows
        catalog.write_batch(model_id, rows)
        seconds += time.perf_counter() - t0
    return model_id, seconds


def _batches(n: int, k: int, d: int, batch_size: int, seed: int,
             prefix: str) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """``(paths, probs, emb)`` per batch of ``batch_size`` rows; the values come from a small pool
    made up front, so that making them costs nothing beside the writes being timed."""
    rng = np.random.default_rng(seed)
    pool = [(rng.random((batch_size, k), dtype=np.float32), rng.standard_normal((batch_size, d), dtype=np.float32))
            for _ in range(4)]
    for i, at in enumerate(range(0, n, batch_size)):
        m = min(batch_size, n - at)
        probs, emb = pool[i % len(pool)]
        yield [f"{prefix}/{at + j:06d}.jpg" for j in range(m)], probs[:m], emb[:m]


def _register(catalog: Any, k: int, d: int, tag: int) -> int:
    return catalog.register_model(f"{tag:064x}", "bench", list(CELEBA_BASE_RATES)[:k], [0.5] * k, d, None)


def _write_through_writer(catalog: Any, n: int, k: int, d: int, batch_size: int, seed: int) -> float:
    """Seconds for ``n`` rows through the indexer's writer stage, from the first batch handed over
    to the last one committed (as in an index run, the caller only waits when the queue is full)."""
    model_id = _register(catalog, k, d, seed + 1)
    writer = CatalogWriter(catalog, model_id)
    t0 = time.perf_counter()
    try:
        for paths, probs, emb in _batches(n, k, d, batch_size, seed, "/bench-writer"):
            rows = Rows()
            for p in paths:
                rows.add(FileEntry(p, 12_000, 1.0), (178, 218))
            writer.put(WriteJob(rows, probs, emb, []))
        writer.close()
    except BaseException:
        writer.abandon()
        raise
    return time.perf_counter() - t0


def _shard_writer(url: str, model_id: int, rank: int, n: int, k: int, d: int, batch_size: int, seed: int,
                  go: Any, results: Any) -> None:
    """One process of the sharded figure: its own catalog connection, its own part of the rows."""
    try:
        catalog = Catalog(url)
        batches = list(_batches(n, k, d, batch_size, seed + rank, f"/bench-shard/{rank}"))
        go.wait()
        start = time.time()
        for paths, probs, emb in batches:
            catalog.write_batch(model_id, [IndexedImage(p, 12_000, 1.0, 178, 218, probs[i], emb[i])
                                           for i, p in enumerate(paths)])
        results.put((rank, start, time.time(), None))
        catalog.close()
    except Exception as err:  # noqa: BLE001 - reported by the parent
        results.put((rank, 0.0, 0.0, f"{type(err).__name__}: {err}"))


def _write_sharded(url: str, catalog: Any, n: int, k: int, d: int, batch_size: int, seed: int,
                   writers: int) -> float:
    """Seconds for ``writers`` processes to write ``n`` rows between them at once (first start to
    last finish), into one model as the shards of a sharded run do."""
    model_id = _register(catalog, k, d, seed + 2)
    ctx = multiprocessing.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    share = -(-n // writers)
    procs = [ctx.Process(target=_shard_writer, args=(url, model_id, r, min(share, n - r * share), k, d, batch_size,
                                                      seed, go, results)) for r in range(writers)]
    for proc in procs:
        proc.start()
    time.sleep(0.5)  # let each build its rows; they start together on ``go``
    go.set()
    done = [results.get(timeout=3600) for _ in procs]
    for proc in procs:
        proc.join()
    errors = [e for *_, e in done if e]
    if errors:
        raise CatalogError(f"a sharded writer failed against {_label(url)}: {errors[0]}")
    return max(end for _, _, end, _ in done) - min(start for _, start, _, _ in done)


def _query_runs(index_dir: Path, url: str | None, runs: int) -> list[float]:
    """Wall-clock seconds of ``runs`` fresh `facefind query` processes against the index."""
    env = {**os.environ, "FACEFIND_INDEX": str(index_dir)}
    env.pop("FACEFIND_DB", None)
    if url is not None:
        env["FACEFIND_DB"] = url
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "facefind.retrieval.cli", "query", EXPRESSION, "--json", "--limit", "10"],
                              env=env, capture_output=True, text=True, timeout=300)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise CatalogError(f"`facefind query` failed against {_label(url)}: "
                               f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return times


def _takes_shortcut(index_dir: Path, url: str | None) -> bool:
    """Whether `facefind query` serves this index without SQLAlchemy (``current_snapshot_fast``)."""
    saved = os.environ.pop("FACEFIND_DB", None)
    try:
        if url is not None:
            os.environ["FACEFIND_DB"] = url
        return current_snapshot_fast(index_dir) is not None
    finally:
        os.environ.pop("FACEFIND_DB", None)
        if saved is not None:
            os.environ["FACEFIND_DB"] = saved


def run_catalog_bench(urls: Sequence[str] = (), n: int = 202_599, k: int = 40, d: int = 512,
                      batch_size: int = 256, query_runs: int = 10, out: Path | None = None,
                      seed: int = 0, writers: int = 2) -> dict[str, Any]:
    """Time each catalog (the SQLite default first, then ``urls``, each an empty database).

    Returns ``{"n", "k", "d", "batch_size", "writers", "catalogs": [{label, write_s,
    rows_per_second, mb_per_second, writer_stage_rows_per_second, sharded_rows_per_second,
    sharded_speedup, export_s, publish_s, query_cold_p50_s, query_cold_min_s, engine_p50_ms,
    query_shortcut}]}`` (``query_shortcut``: queries were served without importing SQLAlchemy;
    the sharded figures are None when ``writers`` is 1).
    """
    work = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="facefind-bench-catalog-"))
    results = []
    for i, url in enumerate([None, *urls]):
        index_dir = work / f"index-{i}"
        catalog_url = url or f"sqlite:///{index_dir.resolve() / 'catalog.db'}"
        catalog = Catalog(catalog_url)
        try:
            if catalog.info()["images"]:
                raise CatalogError(f"{_label(url)} already holds a catalog: give the benchmark an empty database")
            log.info("writing %d rows into %s", n, _label(url))
            model_id, write_s = _write_all(catalog, n, k, d, batch_size, seed)
            t0 = time.perf_counter()
            stamp, preds = catalog.export(model_id)
            export_s = time.perf_counter() - t0
            assert len(preds.ids) == n
            del preds
            t0 = time.perf_counter()
            sync_snapshot(catalog, index_dir, model_id)
            publish_s = time.perf_counter() - t0
            disk = catalog.disk_bytes()
            log.info("writing %d rows into %s through the writer stage", n, _label(url))
            stage_s = _write_through_writer(catalog, n, k, d, batch_size, seed)
            sharded_s = None
            if writers > 1:
                log.info("writing %d rows into %s from %d processes at once", n, _label(url), writers)
                sharded_s = _write_sharded(catalog_url, catalog, n, k, d, batch_size, seed, writers)
        finally:
            catalog.close()
        cold = _query_runs(index_dir, url, query_runs)
        shortcut = _takes_shortcut(index_dir, url)
        engine = Engine(load_snapshot(index_dir, model_id))
        engine.query(EXPRESSION, limit=10)  # warm
        latencies = []
        for _ in range(50):
            t0 = time.perf_counter()
            engine.query(EXPRESSION, limit=10)
            latencies.append((time.perf_counter() - t0) * 1000)
        row_bytes = 4 * (k + d)
        results.append({
            "catalog": _label(url),
            "write_s": round(write_s, 2),
            "rows_per_second": round(n / write_s),
            "mb_per_second": round(n * row_bytes / write_s / 1e6, 1),
            "writer_stage_rows_per_second": round(n / stage_s),
            "sharded_rows_per_second": round(n / sharded_s) if sharded_s else None,
            "sharded_speedup": round(write_s / sharded_s, 2) if sharded_s else None,
            "export_s": round(export_s, 2),
            "publish_s": round(publish_s, 2),
            "disk_mb": round(disk / 1e6, 1) if disk else None,
            "query_cold_p50_s": round(statistics.median(cold), 3),
            "query_cold_min_s": round(min(cold), 3),
            "engine_p50_ms": round(statistics.median(latencies), 3),
            "query_shortcut": shortcut,
        })
    return {"n": n, "k": k, "d": d, "batch_size": batch_size, "writers": writers, "query_runs": query_runs,
            "expression": EXPRESSION, "catalogs": results}
