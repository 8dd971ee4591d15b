"""People benchmark: grouping N identity descriptors into persons, its time, memory and BCubed.

The descriptors are synthetic but shaped like dlib's on CelebA (measured on the shared sample):
identities of about 20 faces (a geometric spread of sizes), each face its identity's centre plus
noise, the noise scaled per identity so that same-person distances have a median near 0.48 with a
tail past 0.6, and identity centres drawn so that different people are 0.55-1.0 apart (a few look-
alikes close). Beside the method, the naive baseline (single link at dlib's 0.6) on the same graph.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from facefind.db.errors import DatasetError
from facefind.db.files import atomic_replace
from facefind.indexer.faces import grouping
from facefind.indexer.faces.detect import identity_of
from facefind.indexer.faces.identity import DIM
from facefind.trainer.celeba import load_celeba

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


def sample_descriptors(folder: str | os.PathLike[str], cache: str | os.PathLike[str] | None = None,
                       progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dlib descriptors of a CelebA-format folder's faces (those where dlib finds one), with their
    identity and split: (float32 (M, 128), int (M,), int (M,)). ~0.1-0.2 s a face on one core, so
    ``cache`` (an .npz) keeps them between runs, keyed by file name."""
    celeba = load_celeba(folder)
    if celeba.identities is None:
        raise DatasetError(f"{folder} has no identity_CelebA.txt: grouping is measured against it")
    names = [p.name for p in celeba.paths]
    known: dict[str, np.ndarray] = {}
    if cache is not None and Path(cache).is_file():
        with np.load(cache, allow_pickle=False) as npz:
            known = dict(zip(npz["names"].tolist(), npz["vectors"]))
    def save() -> None:
        if cache is not None and known:
            atomic_replace(cache, lambda tmp: np.savez(open(tmp, "wb"), names=np.array(list(known)),
                                                      vectors=np.stack(list(known.values()))))

    fresh = 0
    for i, (name, path) in enumerate(zip(names, celeba.paths)):
        if name not in known:
            with Image.open(path) as img:
                v = identity_of(np.asarray(img.convert("RGB")))
            known[name] = np.full(DIM, np.nan, np.float32) if v is None else v  # NaN: dlib found no face
            fresh += 1
            if fresh % 500 == 0:  # an interrupted run keeps what it computed
                save()
        if progress is not None:
            progress(i + 1, len(names))
    if fresh:
        save()
    vectors = np.stack([known[n] for n in names]).astype(np.float32)
    found = ~np.isnan(vectors).any(1)
    return vectors[found], celeba.identities[found], celeba.splits[found]


def exact_single_link(x: np.ndarray, threshold: float) -> np.ndarray:
    """The naive rule over every pair (not a k-NN graph): faces closer than ``threshold`` are one person."""
    rows, cols = [], []
    for start in range(0, len(x), 2048):
        d2 = ((x[start:start + 2048, None, :] - x[None, :, :]) ** 2).sum(-1)
        r, c = np.nonzero(d2 < threshold * threshold)
        rows.append(r + start)
        cols.append(c)
    return grouping.components(len(x), np.concatenate(rows), np.concatenate(cols))


def run_people_sample(folder: str | os.PathLike[str], cache: str | os.PathLike[str] | None = None,
                      progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """BCubed of the grouping and of single link (0.6 and 0.5, exact) per split of a real CelebA
    folder, against its identity_CelebA.txt."""
    vectors, identities, splits = sample_descriptors(folder, cache, progress)
    out: dict[str, Any] = {"folder": str(folder), "faces": int(len(vectors)), "splits": {}}
    for name, keep in [("train", splits == 0), ("val", splits == 1), ("test", splits == 2),
                       ("all", np.ones(len(splits), bool))]:
        if not keep.any():
            continue
        x, truth = vectors[keep], identities[keep]
        start = time.perf_counter()
        labels = grouping.group(x)
        seconds = time.perf_counter() - start
        row: dict[str, Any] = {"faces": int(keep.sum()), "identities": int(len(np.unique(truth)))}
        for method, found in [("facefind", labels), ("single_link_0.6", exact_single_link(x, 0.6)),
                              ("single_link_0.5", exact_single_link(x, 0.5))]:
            p, r = bcubed(found, truth)
            row[method] = {"persons": int(len(np.unique(found))), "precision": round(p, 4), "recall": round(r, 4)}
        row["facefind"]["seconds"] = round(seconds, 3)
        out["splits"][name] = row
    return out
