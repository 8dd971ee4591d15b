"""Catalog benchmark: write throughput and query cold start, SQLite against other databases.

``run_catalog_bench(urls, n)`` writes ``n`` predictions (40 float32 probabilities and a float32
embedding each, what the indexer stores per image) through ``Catalog.write_batch`` in batches of
the indexer's size, into each catalog in turn: the index folder's SQLite file and every URL given
(e.g. a PostgreSQL database). For each it then times the export that rebuilds a snapshot, the
publish of that snapshot, and whole-process ``facefind query`` runs against it (cold start: a new
interpreter each time) and the engine's in-process latency. Everything runs in one process, one
catalog after the other, so the figures are comparable; the machine's noise still applies.

Queries read the snapshot in the index folder, not the database, so their figures should not
depend on the catalog's backend: the benchmark shows whether they do.
"""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import sqlalchemy as sa

from facefind.db.catalog import Catalog, IndexedImage
from facefind.db.errors import CatalogError
from facefind.db.snapshot import current_snapshot_fast, load_snapshot, sync_snapshot
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
    names = list(CELEBA_BASE_RATES)[:k]
    model_id = catalog.register_model(f"{seed:064x}", "bench", names, [0.5] * k, d, None)
    rng = np.random.default_rng(seed)
    seconds = 0.0
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        probs = rng.random((m, k), dtype=np.float32)
        emb = rng.standard_normal((m, d), dtype=np.float32)
        rows = [IndexedImage(f"/bench/img_align_celeba/{start + i:06d}.jpg", 12_000, 1.0, 178, 218,
                             probs[i], emb[i]) for i in range(m)]
        t0 = time.perf_counter()  # only the catalog's work is timed, not making up the rows
        catalog.write_batch(model_id, rows)
        seconds += time.perf_counter() - t0
    return model_id, seconds


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
                      seed: int = 0) -> dict[str, Any]:
    """Time each catalog (the SQLite default first, then ``urls``, each an empty database).

    Returns ``{"n", "k", "d", "batch_size", "catalogs": [{label, write_s, rows_per_second,
    mb_per_second, export_s, publish_s, query_cold_p50_s, query_cold_min_s, engine_p50_ms,
    query_shortcut}]}`` (``query_shortcut``: queries were served without importing SQLAlchemy).
    """
    work = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="facefind-bench-catalog-"))
    results = []
    for i, url in enumerate([None, *urls]):
        index_dir = work / f"index-{i}"
        catalog = Catalog(url or f"sqlite:///{index_dir.resolve() / 'catalog.db'}")
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
            "export_s": round(export_s, 2),
            "publish_s": round(publish_s, 2),
            "disk_mb": round(disk / 1e6, 1) if disk else None,
            "query_cold_p50_s": round(statistics.median(cold), 3),
            "query_cold_min_s": round(min(cold), 3),
            "engine_p50_ms": round(statistics.median(latencies), 3),
            "query_shortcut": shortcut,
        })
    return {"n": n, "k": k, "d": d, "batch_size": batch_size, "query_runs": query_runs,
            "expression": EXPRESSION, "catalogs": results}
