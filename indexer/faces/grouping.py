"""Who is who: dlib identity descriptors grouped into persons (numpy + FAISS).

Two failures matter, and the first matters more: merging two people into one person (siblings,
look-alikes; every later correction starts from a wrong group) and splitting one person into
several. Single link at dlib's same-person distance (0.6) chains whole crowds together through a
few close pairs; a stricter distance splits everyone. The method here keeps the two apart:

1. **Strict links.** A k-nearest-neighbour graph (FAISS: exact below ``FLAT_MAX`` rows; above,
   IVF over the top principal components with an exact re-rank, so 200k faces take seconds)
   keeps only the edges shorter than ``STRICT`` (0.4). Their connected components are small
   groups that are almost never wrong (at 0.5 they already chain on a few hundred identities).
2. **Average-linkage joins.** Groups are joined, round after round, when they are each other's
   nearest group (mutual) and the root-mean-square distance between their faces is below
   ``JOIN`` (0.62). An average over every pair is what one lucky pair cannot fake, which is what
   chains single link; the RMS comes from per-group sums alone, so a round costs O(candidates).
   Candidates are the groups that some k-NN edge under ``REACH`` connects.
3. **Odd photos attach.** A face still alone (profile, blur) joins the large group clearly
   nearest to it (RMS under ``ATTACH``, the next group ``ATTACH_MARGIN`` farther).

Chosen on the shared CelebA sample's train split (181 identities), checked on its val split (26):
see the commit that set these numbers for the table. Corrections are constraints: ``must`` lists of faces (a merge) are joined before anything else;
``apart`` pairs of face lists (a split) are never in one person: a group that holds both sides is
cut, each of its faces going with the side it is nearest to on average.

Everything works on row numbers of the ``vectors`` array; callers map rows to catalog face ids.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from facefind.db.vectors import configure_faiss

log = logging.getLogger(__name__)

STRICT = 0.4      # k-NN edges shorter than this link faces outright (0.5 chains: BCubed precision 0.61
                  # on the sample's 181 train identities)
JOIN = 0.62       # groups whose root-mean-square pairwise distance is below this are one person
ATTACH = 0.65     # a face left alone joins the large group within this RMS distance of it ...
ATTACH_MARGIN = 0.03  # ... when the next group is this much farther
SMALL, LARGE = 2, 4   # "left alone": in a group of at most SMALL faces; "large": at least LARGE
REACH = 0.7       # only groups some k-NN edge under this connects are compared at all
NEIGHBOURS = 20   # k of the k-NN graph
FLAT_MAX = 5_000  # exact k-NN up to this many faces; an IVF index above
PCA_DIM = 64      # the approximate k-NN searches this many principal components, then re-ranks
NPROBE = 8        # IVF lists searched per face
RERANK = 30       # extra candidates re-ranked by exact distance (10 found 94% of the links, 30 99.6%)
JOIN_ROUNDS = 50  # mutual-nearest join rounds at most (it converges in far fewer)


@dataclass(frozen=True)
class Knn:
    """The k-NN graph: ``index[i]`` the rows nearest to row i (itself excluded; -1: none), and
    their Euclidean ``distance``."""

    index: np.ndarray     # int64 (N, k)
    distance: np.ndarray  # float32 (N, k)


def knn(vectors: np.ndarray, k: int = NEIGHBOURS, queries: np.ndarray | None = None) -> Knn:
    """The ``k`` nearest rows of ``vectors`` to each row of ``queries`` (default: to each row of
    ``vectors``, itself left out). Exact up to ``FLAT_MAX`` rows; above, an IVF index (nlist ~
    4 sqrt(N), 16 probes) that finds the near neighbours grouping needs at a fraction of the cost."""
    faiss = configure_faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    self_query = queries is None
    q = x if self_query else np.ascontiguousarray(queries, dtype=np.float32)
    n, dim = x.shape
    want = min(k + (1 if self_query else 0), n)
    if want <= 0 or q.shape[0] == 0:
        return Knn(np.full((q.shape[0], k), -1, np.int64), np.full((q.shape[0], k), np.inf, np.float32))
    if n <= FLAT_MAX:
        index = faiss.IndexFlatL2(dim)
        index.add(x)
        d2, idx = index.search(q, want)
    else:
        d2, idx = _approximate(faiss, x, q, want)
    if self_query:  # drop each row itself (not always in column 0 when duplicates tie)
        own = idx == np.arange(q.shape[0])[:, None]
        keep = ~own
        keep[own.sum(1) == 0, -1] = False  # no self found: drop the farthest to keep k columns
        idx = idx[keep].reshape(q.shape[0], want - 1)
        d2 = d2[keep].reshape(q.shape[0], want - 1)
    dist = np.sqrt(np.maximum(d2, 0)).astype(np.float32)
    dist[idx < 0] = np.inf
    if idx.shape[1] < k:
        pad = k - idx.shape[1]
        idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
        dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.inf)
    return Knn(idx.astype(np.int64), dist)


def _approximate(faiss: Any, x: np.ndarray, q: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k-NN for many faces: an IVF index over the descriptors' first ``PCA_DIM``
    principal components (97.8% of dlib's variance on CelebA) finds ``want + RERANK`` candidates,
    which are then ranked by their exact 128-D distance."""
    n, dim = x.shape
    rng = np.random.default_rng(0)
    nlist = int(2 * np.sqrt(n))
    sample = x[rng.choice(n, min(n, 40 * nlist), replace=False)]
    pca = faiss.PCAMatrix(dim, min(PCA_DIM, dim))
    pca.train(sample)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(pca.d_out), pca.d_out, nlist)
    ivf.cp.niter = 10
    ivf.cp.max_points_per_centroid = 40
    ivf.cp.min_points_per_centroid = 1  # FAISS warns below 39 a list; the sample is what we want to pay
    ivf.train(pca.apply(sample))
    ivf.add(pca.apply(x))
    ivf.nprobe = NPROBE
    _, cand = ivf.search(pca.apply(q), want + RERANK)
    d2 = np.full(cand.shape, np.inf, np.float32)
    for start in range(0, q.shape[0], 8192):  # exact distances of the candidates, in blocks
        c = cand[start:start + 8192]
        diff = x[np.maximum(c, 0)] - q[start:start + 8192, None, :]
        d2[start:start + 8192] = np.where(c >= 0, np.einsum("ijk,ijk->ij", diff, diff), np.inf)
    order = np.argsort(d2, axis=1, kind="stable")[:, :want]
    return np.take_along_axis(d2, order, 1), np.take_along_axis(cand, order, 1)


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of the graph on ``n`` nodes with edges ``a[i] - b[i]``: int64 (N,)
    labels numbered 0.. in order of each component's first node."""
    parent = np.arange(n, dtype=np.int64)
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    while True:  # hook every edge's larger root under the smaller, then jump pointers to the roots
        ra, rb = parent[a], parent[b]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        changed = lo != hi
        if not changed.any():
            break
        np.minimum.at(parent, hi[changed], lo[changed])
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    _, labels = np.unique(parent, return_inverse=True)
    return labels.astype(np.int64)


def _sums(vectors: np.ndarray, labels: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: the sum of its vectors, the sum of their squared norms, its size (every group
    0..m-1 must have a face)."""
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(m))
    x = vectors[order].astype(np.float64)
    return (np.add.reduceat(x, starts, axis=0), np.add.reduceat((x * x).sum(1), starts),
            np.diff(np.append(starts, len(labels))).astype(np.float64))


def _rms(sums: np.ndarray, sq: np.ndarray, size: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root-mean-square distance over every pair of faces of groups ``a[i]`` and ``b[i]``, from
    the groups' sums alone: mean |x - y|^2 = |mean_a - mean_b|^2 + spread_a + spread_b."""
    out = np.empty(len(a), np.float32)
    for start in range(0, len(a), 65536):  # in blocks: two (block, 128) gathers at a time
        pa, pb = a[start:start + 65536], b[start:start + 65536]
        mean_a, mean_b = sums[pa] / size[pa, None], sums[pb] / size[pb, None]
        spread = sq[pa] / size[pa] - np.einsum("ij,ij->i", mean_a, mean_a) + sq[pb] / size[pb] \
            - np.einsum("ij,ij->i", mean_b, mean_b)
        gap = mean_a - mean_b
        out[start:start + 65536] = np.sqrt(np.maximum(np.einsum("ij,ij->i", gap, gap) + spread, 0))
    return out


def average_distance(vectors: np.ndarray, rows_a: np.ndarray, rows_b: np.ndarray) -> float:
    """The mean Euclidean distance between every face of ``rows_a`` and every face of ``rows_b``."""
    a = vectors[rows_a].astype(np.float32)
    b = vectors[rows_b].astype(np.float32)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return float(np.sqrt(np.maximum(d2, 0)).mean())


Apart = Sequence[tuple[Sequence[int], Sequence[int]]]


def _forbidden(labels: np.ndarray, apart: Apart) -> set[tuple[int, int]]:
    """Pairs of groups (low, high) that must not be joined: one holds a side of an 'apart'
    correction, the other its other side."""
    out: set[tuple[int, int]] = set()
    for side0, side1 in apart:
        g0 = np.unique(labels[np.asarray(side0, np.int64)]).tolist()
        g1 = np.unique(labels[np.asarray(side1, np.int64)]).tolist()
        out.update((min(a, b), max(a, b)) for a in g0 for b in g1 if a != b)
    return out


def _join(vectors: np.ndarray, labels: np.ndarray, graph: Knn, apart: Apart) -> np.ndarray:
    """Average-linkage joins of mutual-nearest groups (step 2 of the module's method).

    Works on groups, not faces: the per-group sums and the candidate pairs are built once from
    the faces, then each round only maps them through the round's joins (200k faces: ~0.1 s a
    round instead of seconds)."""
    n = labels.shape[0]
    m = int(labels.max()) + 1
    sums, sq, size = _sums(vectors, labels, m)
    src = np.repeat(np.arange(n), graph.index.shape[1])
    dst = graph.index.ravel()
    ok = (dst >= 0) & (graph.distance.ravel() < REACH)
    ga, gb = labels[src[ok]], labels[dst[ok]]
    pairs, _ = _pairs(ga, gb, m)
    links = _rms(sums, sq, size, pairs[:, 0], pairs[:, 1])
    for _ in range(JOIN_ROUNDS):
        if not len(pairs):
            break
        keep = links < JOIN
        forbidden = _forbidden(labels, apart) if apart else set()
        if forbidden:
            keep &= np.array([(int(p), int(q)) not in forbidden for p, q in pairs], bool)
        close, near = pairs[keep], links[keep]
        if not len(close):
            break
        # mutual nearest: each group's best partner, both ways
        best = np.full(m, np.inf, np.float32)
        np.minimum.at(best, close[:, 0], near)
        np.minimum.at(best, close[:, 1], near)
        mutual = (near <= best[close[:, 0]]) & (near <= best[close[:, 1]])
        if not mutual.any():
            break
        mapping = components(m, close[mutual, 0], close[mutual, 1])
        m = int(mapping.max()) + 1
        sums, sq, size = (_regroup(a, mapping, m) for a in (sums, sq, size))
        labels = mapping[labels]
        changed = np.bincount(mapping, minlength=m) > 1  # groups this round made
        pairs, first = _pairs(mapping[pairs[:, 0]], mapping[pairs[:, 1]], m)
        links = links[first]  # a pair between two unchanged groups keeps its distance
        redo = changed[pairs[:, 0]] | changed[pairs[:, 1]]
        links[redo] = _rms(sums, sq, size, pairs[redo, 0], pairs[redo, 1])
    return labels


def _pairs(a: np.ndarray, b: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct pairs (low, high) of different groups among ``a[i] - b[i]``, int64 (P, 2),
    and for each the index ``i`` of its first occurrence."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    differ = np.flatnonzero(lo != hi)
    key, first = np.unique(lo[differ] * m + hi[differ], return_index=True)
    return np.stack([key // m, key % m], 1), differ[first]


def _regroup(values: np.ndarray, mapping: np.ndarray, m: int) -> np.ndarray:
    """Per-group sums added up over the groups each new group is made of."""
    order = np.argsort(mapping, kind="stable")
    starts = np.searchsorted(mapping[order], np.arange(m))
    return np.add.reduceat(values[order], starts, axis=0)


def group(vectors: np.ndarray, *, must: Sequence[Sequence[int]] = (), apart: Apart = (),
          graph: Knn | None = None) -> np.ndarray:
    """Person labels (int64 (N,), numbered 0.. in order of each person's first row) for the
    descriptor rows ``vectors`` (float (N, 128)), keeping the corrections: the rows of each
    ``must`` list in one person, the two sides of each ``apart`` pair in different persons."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n = x.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    graph = graph if graph is not None else knn(x)
    near = (graph.index >= 0) & (graph.distance < STRICT)
    a = np.repeat(np.arange(n), near.sum(1))
    b = graph.index[near]
    for side0, side1 in apart:  # strict links across a split are cut before they can chain
        s0, s1 = np.asarray(side0, np.int64), np.asarray(side1, np.int64)
        bad = (np.isin(a, s0) & np.isin(b, s1)) | (np.isin(a, s1) & np.isin(b, s0))
        a, b = a[~bad], b[~bad]
    links_a, links_b = [a], [b]
    for rows in must:
        rows = np.asarray(rows, np.int64)
        if rows.size > 1:
            links_a.append(rows[:-1])
            links_b.append(rows[1:])
    labels = components(n, np.concatenate(links_a), np.concatenate(links_b))
    labels = _separate(x, labels, apart)
    labels = _join(x, labels, graph, apart)
    pinned = np.unique(np.concatenate([np.asarray(r, np.int64) for r in must] + [np.zeros(0, np.int64)]))
    labels = _attach(x, labels, graph, pinned)
    return _first_order(_separate(x, labels, apart))


def group_stats(x: np.ndarray, labels: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group of ``labels`` (0..m-1): mean descriptor, spread (mean squared distance to the
    mean) and size; what RMS distances to a group are computed from."""
    sums, sq, size = _sums(x, labels, m)
    mean = sums / np.maximum(size, 1)[:, None]
    return mean, sq / np.maximum(size, 1) - (mean ** 2).sum(1), size


def clear_choice(face: np.ndarray, candidates: np.ndarray, stats: tuple[np.ndarray, np.ndarray, np.ndarray],
                 limit: float) -> int | None:
    """The group among ``candidates`` that ``face`` clearly belongs to: RMS distance to its faces
    under ``limit`` and the next candidate ``ATTACH_MARGIN`` farther; None when there is none."""
    if not len(candidates):
        return None
    mean, spread, _ = stats
    rms = np.sqrt(np.maximum(((face - mean[candidates]) ** 2).sum(1) + spread[candidates], 0))
    order = np.argsort(rms)
    if rms[order[0]] < limit and (len(order) == 1 or rms[order[1]] - rms[order[0]] > ATTACH_MARGIN):
        return int(candidates[order[0]])
    return None


def _attach(x: np.ndarray, labels: np.ndarray, graph: Knn, pinned: np.ndarray) -> np.ndarray:
    """Step 3: a face the joins left alone (an odd photo: profile, blur) joins the large group
    it is clearly nearest to, by RMS distance to the group's faces. Faces of a merge stay put."""
    m = int(labels.max()) + 1
    stats = group_stats(x, labels, m)
    size = stats[2]
    out = labels.copy()
    alone = np.flatnonzero(size[labels] <= SMALL)
    for i in np.setdiff1d(alone, pinned).tolist():
        ok = (graph.index[i] >= 0) & (graph.distance[i] < REACH)
        near = np.unique(labels[graph.index[i][ok]])
        best = clear_choice(x[i], near[(size[near] >= LARGE) & (near != labels[i])], stats, ATTACH)
        if best is not None:
            out[i] = best
    return out


def _separate(x: np.ndarray, labels: np.ndarray, apart: Apart) -> np.ndarray:
    """Cut every group that holds both sides of an ``apart`` pair: each of its faces goes with the
    side it is nearer to on average (the sides themselves stay on their side)."""
    labels = labels.copy()
    for side0, side1 in apart:
        s0, s1 = np.asarray(side0, np.int64), np.asarray(side1, np.int64)
        if not len(s0) or not len(s1):
            continue
        for g in np.intersect1d(labels[s0], labels[s1]).tolist():
            rows = np.flatnonzero(labels == g)
            in0, in1 = s0[labels[s0] == g], s1[labels[s1] == g]
            d0 = np.array([average_distance(x, [r], in0) for r in rows])
            d1 = np.array([average_distance(x, [r], in1) for r in rows])
            go = ((d0 < d1) & ~np.isin(rows, in1)) | np.isin(rows, in0)
            labels[rows[go]] = labels.max() + 1
    return labels


def _first_order(labels: np.ndarray) -> np.ndarray:
    """Renumber groups 0.. in order of each group's first row."""
    uniq, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    return rank[inverse.ravel()]


def single_link(vectors: np.ndarray, threshold: float, graph: Knn | None = None) -> np.ndarray:
    """The naive baseline: faces closer than ``threshold`` (over the k-NN graph) are one person."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    graph = graph if graph is not None else knn(x)
    near = (graph.index >= 0) & (graph.distance < threshold)
    return components(x.shape[0], np.repeat(np.arange(x.shape[0]), near.sum(1)), graph.index[near])
