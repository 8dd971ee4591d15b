"""People benchmark: grouping N identity descriptors into persons, its time, memory and BCubed.

The descriptors are synthetic but shaped like dlib's on CelebA (measured on the shared sample):
identities of about 20 faces (a geometric spread of sizes), each face its identity's centre plus
noise, the noise scaled per identity so that same-person distances have a median near 0.48 with a
tail past 0.6, and identity centres drawn so that different people are 0.55-1.0 apart (a few look-
alikes close). Beside the method, the naive baseline (single link at dlib's 0.6) on the same graph.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import numpy as np

from facefind.indexer.faces import grouping

DIM = 128
FACES_PER_PERSON = 20


def synthetic_descriptors(n: int, seed: int = 0, per_person: int = FACES_PER_PERSON) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (n, 128) descriptors, int64 (n,) true identity) with realistic spread."""
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(max(1, int(rng.geometric(1.0 / per_person))))
    sizes[-1] -= sum(sizes) - n
    labels = np.repeat(np.arange(len(sizes)), sizes)
    # Centres on a 32-D manifold (dlib's descriptors use few directions): distances between people
    # spread out instead of all being equal, as they would be in 128 isotropic dimensions.
    basis = rng.standard_normal((32, DIM)).astype(np.float32) / np.sqrt(DIM)
    centres = (rng.standard_normal((len(sizes), 32)).astype(np.float32) @ basis) * 0.11
    spread = rng.uniform(0.022, 0.034, len(sizes)).astype(np.float32)
    noise = rng.standard_normal((n, DIM)).astype(np.float32) * spread[labels, None]
    return centres[labels] + noise, labels


def bcubed(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """BCubed precision and recall of a grouping against true labels, in O(N log N)."""
    pred = np.asarray(pred)
    true = np.asarray(true)
    _, pair = np.unique(np.stack([pred, true], 1), axis=0, return_inverse=True)
    pair = pair.ravel()
    both = np.bincount(pair)[pair]
    _, p_inv = np.unique(pred, return_inverse=True)
    _, t_inv = np.unique(true, return_inverse=True)
    return float((both / np.bincount(p_inv)[p_inv]).mean()), float((both / np.bincount(t_inv)[t_inv]).mean())


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run_people_bench(n: int = 202_599, seed: int = 0) -> dict[str, Any]:
    """Group ``n`` synthetic descriptors; time each stage; BCubed of the method and the baseline."""
    vectors, truth = synthetic_descriptors(n, seed)
    rss_before = _peak_rss_mb()
    cpu_start = time.process_time()
    start = time.perf_counter()
    graph = grouping.knn(vectors)
    t_graph = time.perf_counter() - start
    labels = grouping.group(vectors, graph=graph)
    t_total = time.perf_counter() - start
    cpu = time.process_time() - cpu_start  # all threads: on a busy machine wall time waits for cores
    naive = grouping.single_link(vectors, 0.6, graph)
    precision, recall = bcubed(labels, truth)
    naive_p, naive_r = bcubed(naive, truth)
    return {
        "n": n, "identities": int(truth.max()) + 1, "seed": seed,
        "knn_s": round(t_graph, 2), "group_s": round(t_total, 2), "group_cpu_s": round(cpu, 2),
        "knn_kind": "flat" if n <= grouping.FLAT_MAX else "ivf",
        "persons": int(labels.max()) + 1 if n else 0,
        "precision": round(precision, 4), "recall": round(recall, 4),
        "single_link_0.6": {"persons": int(naive.max()) + 1 if n else 0,
                            "precision": round(naive_p, 4), "recall": round(naive_r, 4)},
        "peak_rss_mb": round(_peak_rss_mb(), 1), "rss_before_mb": round(rss_before, 1),
    }
