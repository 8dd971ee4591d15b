"""Audit benchmark: the whole 40-attribute report over a synthetic in-memory snapshot.

``run_audit_bench()`` takes the query benchmark's realistic snapshot (``synthetic_snapshot``: a
factor model of CelebA-like attributes, with ground-truth labels and imperfect probabilities),
adds labels and val/test splits, and times ``run_audit`` in process, grouped by Male and Young:
the number the target (<= 2 s at 202,599 entries) is about.
"""

from __future__ import annotations

import dataclasses
import time
from statistics import median
from typing import Any

import numpy as np

from facefind.retrieval.audit import run_audit
from facefind.retrieval.bench.query import synthetic_snapshot
from facefind.retrieval.engine import Engine


def run_audit_bench(n: int = 202_599, k: int = 40, repeats: int = 3, seed: int = 0,
                    by: tuple[str, ...] = ("Male", "Young")) -> dict[str, Any]:
    """Seconds for ``run_audit`` over ``n`` entries: the first run of a fresh engine (log-odds rows
    computed then), and the median of ``repeats`` later runs."""
    snap, labels = synthetic_snapshot(n=n, k=k, d=8, seed=seed)
    splits = np.random.default_rng(seed).choice(np.array([1, 2], np.int8), n)
    snap = dataclasses.replace(snap, label_attributes=list(snap.attributes), labels=labels.astype(np.int8),
                               splits=splits)
    engine = Engine(snap)
    t0 = time.perf_counter()
    report = run_audit(engine, by=by, thresholds=snap.threshold_set)  # the synthetic model has one set
    first = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        run_audit(engine, by=by, thresholds=snap.threshold_set)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    # CPU seconds beside wall seconds: on a busy machine the wall time measures the queue for a core.
    return {"n": n, "attributes": k, "by": list(by), "first_s": round(first, 3),
            "median_s": round(median(times), 3), "median_cpu_s": round(median(cpu), 3), "repeats": repeats,
            "largest_gap": report.largest_gaps[0] if report.largest_gaps else None}
