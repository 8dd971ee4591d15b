"""Query benchmark: the engine against SQL and numpy baselines, and its vector search at scale.

``run_query_bench()`` builds a snapshot in memory (no images): 40 attributes whose probabilities
come from a correlated latent factor model (a "male", a "smile" and an "age" factor plus random
ones, identity-level and image-level parts, CelebA-like base rates) and embeddings clustered by
identity (20 images per identity) and tilted by the same latents, so nearest neighbours are
structured as in a real face collection. It times a fixed set of expressions through
``Engine.query`` and through three baselines over the same rows, all in one process:

  study_style      SQLite ``SELECT ... WHERE`` (SQLAlchemy, bound parameters), then the confidence
                   score and sort in Python, as the seed report's code did
  same_settings    the same SQLite table, with the score computed and sorted by SQLite itself
                   (``ORDER BY <score> DESC, id LIMIT k``): what a fair SQL implementation does
  numpy_brute_force  the catalog's row-major (N, K) matrix, mask and score recomputed in numpy
                   on every query (no column-major layout, no cached log-odds)

``run_vector_bench()`` publishes the snapshot to a temporary index folder exactly as the indexer
does (flat fp16 store, plus the IVF-PQ index from ``approx_min`` rows on) and measures the vector
search: first query of a freshly opened snapshot, exact vs approximate latency unfiltered and
under filters of 50%, 5% and 0.1% selectivity, recall@10 against exact, build time, bytes/vector.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np
import sqlalchemy as sa

from facefind.db import vectors
from facefind.db.snapshot import APPROX, VECTORS, Snapshot, load_snapshot, write_snapshot
from facefind.retrieval.engine import EPS, Engine
from facefind.retrieval.query import Attr, Literal, Node, fold, literals, parse

log = logging.getLogger(__name__)

# Approximate CelebA base rates (share of images with the attribute); synthetic data only.
CELEBA_BASE_RATES: dict[str, float] = {
    "5_o_Clock_Shadow": 0.111, "Arched_Eyebrows": 0.267, "Attractive": 0.513,
    "Bags_Under_Eyes": 0.205, "Bald": 0.022, "Bangs": 0.152, "Big_Lips": 0.241, "Big_Nose": 0.235,
    "Black_Hair": 0.239, "Blond_Hair": 0.148, "Blurry": 0.051, "Brown_Hair": 0.205,
    "Bushy_Eyebrows": 0.142, "Chubby": 0.058, "Double_Chin": 0.047, "Eyeglasses": 0.065,
    "Goatee": 0.063, "Gray_Hair": 0.042, "Heavy_Makeup": 0.387, "High_Cheekbones": 0.455,
    "Male": 0.417, "Mouth_Slightly_Open": 0.483, "Mustache": 0.042, "Narrow_Eyes": 0.115,
    "No_Beard": 0.835, "Oval_Face": 0.284, "Pale_Skin": 0.043, "Pointy_Nose": 0.277,
    "Receding_Hairline": 0.080, "Rosy_Cheeks": 0.066, "Sideburns": 0.057, "Smiling": 0.482,
    "Straight_Hair": 0.208, "Wavy_Hair": 0.320, "Wearing_Earrings": 0.189, "Wearing_Hat": 0.048,
    "Wearing_Lipstick": 0.472, "Wearing_Necklace": 0.123, "Wearing_Necktie": 0.073, "Young": 0.774,
}
# Loadings on the named factors (male, smile, young); the rest get small random loadings.
_FACTOR_LOADINGS: dict[str, tuple[float, float, float]] = {
    "Male": (0.9, 0, 0), "5_o_Clock_Shadow": (0.6, 0, 0), "Goatee": (0.6, 0, 0),
    "Mustache": (0.6, 0, -0.2), "Sideburns": (0.6, 0, 0), "Bald": (0.5, 0, -0.5),
    "Big_Nose": (0.4, 0, -0.2), "Bushy_Eyebrows": (0.4, 0, 0), "Wearing_Necktie": (0.5, 0, -0.2),
    "Receding_Hairline": (0.4, 0, -0.5), "Double_Chin": (0.3, 0, -0.5), "Chubby": (0.3, 0, -0.4),
    "Heavy_Makeup": (-0.8, 0, 0.3), "Wearing_Lipstick": (-0.85, 0, 0.2),
    "Arched_Eyebrows": (-0.5, 0, 0), "Wearing_Earrings": (-0.6, 0, 0), "No_Beard": (-0.6, 0, 0),
    "Wearing_Necklace": (-0.4, 0, 0), "Attractive": (-0.4, 0, 0.5), "Rosy_Cheeks": (-0.4, 0, 0.2),
    "Blond_Hair": (-0.4, 0, 0.2), "Bangs": (-0.3, 0, 0.2), "Smiling": (0, 0.9, 0),
    "High_Cheekbones": (-0.2, 0.7, 0), "Mouth_Slightly_Open": (0, 0.6, 0),
    "Young": (0, 0, 0.9), "Gray_Hair": (0.2, 0, -0.7), "Bags_Under_Eyes": (0.3, 0, -0.5),
}
_IMAGE_LEVEL = {"Smiling", "High_Cheekbones", "Mouth_Slightly_Open", "Blurry", "Wearing_Hat",
                "Eyeglasses", "Narrow_Eyes"}

EXPRESSIONS: tuple[str, ...] = (
    "Big_Nose and Eyeglasses and not Male",
    "Smiling > 0.9 or (Blond_Hair and Young)",
    "Eyeglasses and not Male",
    "Male and (Goatee or Mustache or 5_o_Clock_Shadow) and not Young",
    "not Bald and Young <= 0.2",
)


def synthetic_snapshot(n: int = 202_599, k: int = 40, d: int = 512,
                       seed: int = 0) -> tuple[Snapshot, np.ndarray]:
    """A realistic in-memory snapshot and its ground-truth labels (uint8, (K, N)).

    Latents ``z = sqrt(r) * z_identity + sqrt(1 - r) * z_image`` (r = 0.8, 0.2 for image-level
    attributes such as Smiling) follow a factor model; labels are ``z > cut`` at the base rate;
    probabilities are a noisy sigmoid of the latent, as an imperfect classifier would give.
    """
    rng = np.random.default_rng(seed)
    names = list(CELEBA_BASE_RATES)[:k] + [f"Attr_{i}" for i in range(len(CELEBA_BASE_RATES), k)]
    rates = np.array([CELEBA_BASE_RATES.get(a, 0.2) for a in names])
    n_factors = 8
    load = rng.normal(0, 0.2, (k, n_factors))
    for i, a in enumerate(names):
        if a in _FACTOR_LOADINGS:
            load[i, :3] = _FACTOR_LOADINGS[a]
    load *= np.minimum(1.0, 0.95 / np.linalg.norm(load, axis=1, keepdims=True))
    unique = np.sqrt(1 - (load ** 2).sum(axis=1))

    def latent(m: int) -> np.ndarray:  # (m, K), unit variance, correlated through the factors
        return rng.standard_normal((m, n_factors)) @ load.T + rng.standard_normal((m, k)) * unique

    n_id = max(1, n // 20)
    identity = rng.integers(0, n_id, n)
    r = np.array([0.2 if a in _IMAGE_LEVEL else 0.8 for a in names])
    z = np.sqrt(r) * latent(n_id)[identity] + np.sqrt(1 - r) * latent(n)
    cut = np.array([NormalDist().inv_cdf(1 - p) for p in rates])
    labels = (z > cut).T.astype(np.uint8)
    logits = 3.0 * (z - cut) + rng.normal(0, 1.0, z.shape)
    probs = np.ascontiguousarray((1 / (1 + np.exp(-logits))).T, dtype=np.float32)
    thresholds = rng.uniform(0.35, 0.6, k).astype(np.float32)

    centers = rng.standard_normal((n_id, d), dtype=np.float32)
    tilt = rng.standard_normal((k, d)).astype(np.float32) * 0.3
    emb = np.empty((n, d), dtype=np.float16)
    for s in range(0, n, 32_768):
        sl = slice(s, s + 32_768)
        e = centers[identity[sl]] + z[sl].astype(np.float32) @ tilt
        e += rng.standard_normal(e.shape, dtype=np.float32) * 0.8
        emb[sl] = e / np.linalg.norm(e, axis=1, keepdims=True)
    snap = Snapshot(model_id=0, stamp=0, attributes=names, thresholds=thresholds,
                    ids=np.arange(1, n + 1, dtype=np.int64), probs=probs, emb=emb,
                    paths=[f"/synthetic/{i:06d}.jpg" for i in range(1, n + 1)])
    return snap, labels


# -- the baseline ---------------------------------------------------------------------------


def to_sqlalchemy(node: Node, table: Any, thresholds: np.ndarray) -> Any:
    """The tree as a SQLAlchemy boolean clause (values become bound parameters, never text).

    Numbers are rounded to float32 first, matching the engine's comparison semantics.
    """
    def leaf(lit: Literal) -> Any:
        col = table.c[lit.name]
        if isinstance(lit, Attr):
            return col >= float(np.float32(thresholds[lit.index]))
        value = float(np.float32(lit.value))
        return {">": col > value, ">=": col >= value, "<": col < value, "<=": col <= value}[lit.op]

    return fold(node, leaf, sa.not_, lambda p: sa.and_(*p), lambda p: sa.or_(*p))


def _py_logit(p: float) -> float:
    p = min(max(p, EPS), 1 - EPS)
    return math.log(p / (1 - p))


class SqlBaseline:
    """SQLite (in memory, via SQLAlchemy) with one REAL column per attribute."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self.db = sa.create_engine("sqlite://")
        meta = sa.MetaData()
        self.table = sa.Table("images", meta, sa.Column("id", sa.Integer, primary_key=True),
                              sa.Column("path", sa.String),
                              *(sa.Column(a, sa.Float) for a in snap.attributes))
        meta.create_all(self.db)
        self.conn = self.db.connect()
        insert = str(self.table.insert().compile(dialect=self.db.dialect))
        ids, paths = snap.ids.tolist(), snap.paths
        for s in range(0, len(ids), 20_000):
            cols = snap.probs[:, s:s + 20_000].T.tolist()
            rows = [(i, p, *c) for i, p, c in zip(ids[s:s + 20_000], paths[s:s + 20_000], cols)]
            self.conn.exec_driver_sql(insert, rows)
        self.conn.commit()

    def query(self, node: Node, limit: int = 20) -> tuple[int, list[int], float]:
        """(total, top ids, seconds spent in SQL alone): WHERE in SQL, score + sort in Python."""
        snap, t = self.snap, self.table
        used = sorted({lit.index for lit, _ in literals(node)})
        cut = {k: _py_logit(float(snap.thresholds[k])) for k in used}
        start = time.perf_counter()
        rows = self.conn.execute(sa.select(t.c.id, *(t.c[snap.attributes[k]] for k in used))
                                 .where(to_sqlalchemy(node, t, snap.thresholds))).all()
        sql_s = time.perf_counter() - start
        col = {k: j + 1 for j, k in enumerate(used)}

        def score(row: Any) -> float:
            def margin(lit: Literal) -> float:
                z = _py_logit(row[col[lit.index]])
                if isinstance(lit, Attr):
                    return z - cut[lit.index]
                c = _py_logit(lit.value)
                return z - c if lit.op in (">", ">=") else c - z
            return fold(node, margin, lambda v: -v, min, max)

        top = sorted(rows, key=lambda r: (-score(r), r[0]))[:limit]
        ids = [r[0] for r in top]
        self.conn.execute(sa.select(t).where(t.c.id.in_(ids))).all()  # the hits' attributes
        return len(rows), ids, sql_s


class SqlOrderByBaseline:
    """The study-style baseline's SQLite table, with the confidence score computed and sorted in SQL."""

    def __init__(self, study: SqlBaseline) -> None:
        self.snap, self.table, self.conn = study.snap, study.table, study.conn

    def score_clause(self, node: Node) -> Any:
        """The engine's robustness score as an SQL expression (SQLite's scalar min/max, ln)."""
        t, snap = self.table, self.snap
        eps = sa.literal(EPS)

        def logit(col: Any) -> Any:
            p = sa.func.max(sa.func.min(col, 1 - EPS), eps)
            return sa.func.ln(p) - sa.func.ln(1 - p)

        def margin(lit: Literal) -> Any:
            z = logit(t.c[lit.name])
            if isinstance(lit, Attr):
                return z - _py_logit(float(snap.thresholds[lit.index]))
            c = _py_logit(lit.value)
            return z - c if lit.op in (">", ">=") else c - z

        def combine(func: Any) -> Any:
            return lambda parts: parts[0] if len(parts) == 1 else func(*parts)

        return fold(node, margin, lambda v: -v, combine(sa.func.min), combine(sa.func.max))

    def query(self, node: Node, limit: int = 20) -> tuple[int, list[int], float]:
        """(total, top ids, seconds): COUNT, then WHERE + ORDER BY score LIMIT, all in SQLite."""
        t = self.table
        where = to_sqlalchemy(node, t, self.snap.thresholds)
        start = time.perf_counter()
        total = int(self.conn.execute(sa.select(sa.func.count()).select_from(t).where(where)).scalar() or 0)
        score = self.score_clause(node).label("score")
        rows = self.conn.execute(sa.select(t, score).where(where)
                                 .order_by(sa.desc("score"), t.c.id).limit(limit)).all()
        return total, [r[0] for r in rows], time.perf_counter() - start


class NumpyBaseline:
    """Brute force in numpy over the catalog's row-major (N, K) probability matrix."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self.rows = np.ascontiguousarray(np.asarray(snap.probs).T)  # (N, K), as Catalog.export gives it

    def query(self, node: Node, limit: int = 20) -> tuple[int, list[int], float]:
        """(total, top ids, seconds): mask, score and full sort recomputed from the matrix."""
        p, th, ids = self.rows, self.snap.thresholds, self.snap.ids
        start = time.perf_counter()

        def leaf(lit: Literal) -> np.ndarray:
            col = p[:, lit.index]
            if isinstance(lit, Attr):
                return col >= th[lit.index]
            v = np.float32(lit.value)
            return {">": col > v, ">=": col >= v, "<": col < v, "<=": col <= v}[lit.op]

        mask = fold(node, leaf, np.logical_not, lambda ps: np.logical_and.reduce(ps),
                    lambda ps: np.logical_or.reduce(ps))
        idx = np.flatnonzero(mask)
        sub = p[idx]

        def logit(x: np.ndarray) -> np.ndarray:
            x = np.clip(x, np.float32(EPS), np.float32(1 - EPS))
            return np.log(x) - np.log1p(-x)

        def margin(lit: Literal) -> np.ndarray:
            z = logit(sub[:, lit.index])
            if isinstance(lit, Attr):
                return z - logit(th[lit.index])
            c = logit(np.float32(lit.value))
            return z - c if lit.op in (">", ">=") else c - z

        score = fold(node, margin, np.negative, lambda ps: np.minimum.reduce(ps),
                     lambda ps: np.maximum.reduce(ps))
        order = np.lexsort((ids[idx], -score))[:limit]
        return int(idx.shape[0]), ids[idx[order]].tolist(), time.perf_counter() - start


# -- the benchmark ----------------------------------------------------------------------------


def _ms(samples: Sequence[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(samples) * 1e3, q)), 3)


def _timed(func: Any, repeats: int) -> tuple[list[float], Any]:
    out, samples = None, []
    for _ in range(repeats):
        start = time.perf_counter()
        out = func()
        samples.append(time.perf_counter() - start)
    return samples, out


def run_query_bench(n: int = 202_599, k: int = 40, d: int = 512, seed: int = 0,
                    repeats: int = 50, baseline_repeats: int = 3, limit: int = 20,
                    expressions: Sequence[str] = EXPRESSIONS, approx_min: int | None = None,
                    vector_queries: int = 100, nprobe: int | None = None) -> dict[str, Any]:
    """Time the engine, the baselines and the vector search on one synthetic index; a JSON-able dict.

    Keys: n, engine_p50_ms / engine_p99_ms (filter + confidence rank, pooled over expressions),
    like_p50_ms / like_p99_ms (filter + cosine rank), like_unfiltered_p50_ms, baseline_p50_ms
    (the study-style baseline), speedup (over it), ``baselines`` (study_style, same_settings,
    numpy_brute_force: p50, p99 and speedup each), the vector-search keys of
    ``run_vector_bench`` (recall_at_10, approx_p50_ms, exact_p50_ms, bytes_per_vector, build_s,
    first_like_ms, ...), setup timings, and per-expression details including whether each
    baseline agrees on the count and the top.
    """
    t0 = time.perf_counter()
    snap, _ = synthetic_snapshot(n, k, d, seed)
    t1 = time.perf_counter()
    engine = Engine(snap)
    first = time.perf_counter()
    engine.query(expressions[0], limit=limit)
    first_ms = (time.perf_counter() - first) * 1e3
    ref = np.asarray(snap.emb[n // 2], dtype=np.float32)
    start = time.perf_counter()
    engine.query(None, limit=limit, like=ref)  # wraps the in-memory rows once (a loaded snapshot maps its file)
    like_build_ms = (time.perf_counter() - start) * 1e3
    t2 = time.perf_counter()
    study = SqlBaseline(snap)
    t3 = time.perf_counter()
    ordered = SqlOrderByBaseline(study)  # the same table and connection
    brute = NumpyBaseline(snap)
    baselines = {"study_style": study, "same_settings": ordered, "numpy_brute_force": brute}

    pooled: dict[str, list[float]] = {"engine": [], "like": [], "sql": [], **{b: [] for b in baselines}}
    details = []
    for expr in expressions:
        node = parse(expr, snap.attributes)
        engine.query(expr, limit=limit)  # warm the per-attribute log-odds rows
        eng_s, res = _timed(lambda: engine.query(expr, limit=limit), repeats)
        like_s, _ = _timed(lambda: engine.query(expr, limit=limit, like=ref), repeats)
        pooled["engine"] += eng_s
        pooled["like"] += like_s
        row: dict[str, Any] = {"expression": expr, "total": res.total,
                               "engine_p50_ms": _ms(eng_s, 50), "engine_p99_ms": _ms(eng_s, 99),
                               "like_p50_ms": _ms(like_s, 50)}
        top = [h.id for h in res.hits]
        for name, base in baselines.items():
            reps = baseline_repeats if name != "numpy_brute_force" else max(baseline_repeats, 5)
            base_s, out = _timed(lambda: base.query(node, limit), reps)
            pooled[name] += base_s
            row[f"{name}_p50_ms"] = _ms(base_s, 50)
            row[f"{name}_same_total"] = out[0] == res.total
            row[f"{name}_same_top"] = out[1] == top
        sql_s = [study.query(node, limit)[2] for _ in range(baseline_repeats)]
        pooled["sql"] += sql_s
        row.update(baseline_p50_ms=row["study_style_p50_ms"], baseline_sql_p50_ms=_ms(sql_s, 50),
                   speedup=round(row["study_style_p50_ms"] / row["engine_p50_ms"], 1) if row["engine_p50_ms"] else None,
                   baseline_same_total=row["study_style_same_total"], baseline_same_top=row["study_style_same_top"])
        details.append(row)
    unfiltered_s, _ = _timed(lambda: engine.query(None, limit=limit, like=ref), repeats)
    engine_p50 = _ms(pooled["engine"], 50)

    def summary(name: str) -> dict[str, Any]:
        p50 = _ms(pooled[name], 50)
        return {"p50_ms": p50, "p99_ms": _ms(pooled[name], 99),
                "speedup": round(p50 / engine_p50, 1) if engine_p50 else None,
                "same_top": all(r[f"{name}_same_top"] for r in details),
                "what": {"study_style": "SQLite WHERE, score and sort in Python",
                         "same_settings": "SQLite WHERE + ORDER BY score LIMIT k, all in SQL",
                         "numpy_brute_force": "numpy over the row-major (N, K) matrix, full sort"}[name]}

    baseline_p50 = _ms(pooled["study_style"], 50)
    out = {
        "n": n, "k": k, "d": d, "seed": seed, "limit": limit, "repeats": repeats,
        "engine_p50_ms": engine_p50, "engine_p99_ms": _ms(pooled["engine"], 99),
        "like_p50_ms": _ms(pooled["like"], 50), "like_p99_ms": _ms(pooled["like"], 99),
        "like_unfiltered_p50_ms": _ms(unfiltered_s, 50),
        "baseline_p50_ms": baseline_p50, "baseline_sql_p50_ms": _ms(pooled["sql"], 50),
        "speedup": round(baseline_p50 / engine_p50, 1) if engine_p50 else None,
        "baselines": {name: summary(name) for name in baselines},
        "first_query_ms": round(first_ms, 3), "like_in_memory_wrap_ms": round(like_build_ms, 3),
        "synthesis_s": round(t1 - t0, 3), "baseline_load_s": round(t3 - t2, 3),
        "expressions": details,
    }
    study.conn.close()
    out.update(run_vector_bench(snap, approx_min=approx_min, queries=vector_queries, repeats=repeats,
                                seed=seed, nprobe=nprobe))
    return out


SELECTIVITIES = (0.5, 0.05, 0.001)


def run_vector_bench(snap: Snapshot, *, approx_min: int | None = None, queries: int = 100,
                     repeats: int = 50, seed: int = 0, nprobe: int | None = None,
                     folder: Path | None = None) -> dict[str, Any]:
    """Publish ``snap`` as the indexer does and measure its vector search (see module docstring).

    ``approx_min`` (default ``facefind.db.vectors.APPROX_MIN``) decides whether the approximate index is
    built. Queries are stored embeddings plus a little noise, L2-normalised (new photos of indexed
    people); recall@10 compares the default search with ``exact=True`` on the same filter.
    """
    with tempfile.TemporaryDirectory(prefix="facefind-bench-", dir=folder) as tmp:
        n, d = snap.emb.shape
        model = SimpleNamespace(id=1, sha256="0" * 64, arch="synthetic", attributes=snap.attributes,
                                thresholds=snap.thresholds, embedding_dim=d, checkpoint=None)
        start = time.perf_counter()
        gen = write_snapshot(tmp, model, 0, snap.ids, snap.paths, np.asarray(snap.probs).T, snap.emb,
                             catalog_id="bench", approx_min=approx_min)
        publish_s = time.perf_counter() - start
        first_like_ms, process_ms = _first_like(Path(tmp), snap.emb[0])
        loaded = load_snapshot(tmp, 1)
        engine = Engine(loaded)
        info = json.loads((gen / "manifest.json").read_text())["vectors"]
        flat_bytes = os.path.getsize(gen / VECTORS)
        approx_bytes = os.path.getsize(gen / APPROX) if (gen / APPROX).exists() else 0

        rng = np.random.default_rng(seed + 1)
        rows = rng.choice(n, min(queries, n), replace=False)
        qs = np.asarray(loaded.emb[np.sort(rows)], dtype=np.float32)
        qs += rng.standard_normal(qs.shape).astype(np.float32) * 0.02
        qs /= np.linalg.norm(qs, axis=1, keepdims=True)
        col = np.asarray(loaded.probs[loaded.attributes.index("Attractive")
                                      if "Attractive" in loaded.attributes else 0])
        name = loaded.attributes[loaded.attributes.index("Attractive") if "Attractive" in loaded.attributes else 0]
        filters: dict[str, str | None] = {"unfiltered": None}
        for sel in SELECTIVITIES:
            filters[f"filter_{sel:g}"] = f"{name} > {float(np.quantile(col, 1 - sel)):.9g}"

        def run(expr: str | None, q: np.ndarray, exact: bool) -> Any:
            return engine.query(expr, limit=10, like=q, exact=exact, nprobe=nprobe)

        table: dict[str, Any] = {}
        for label, expr in filters.items():
            run(expr, qs[0], True)  # warm: the first pass maps pages in
            run(expr, qs[0], False)
            exact_s, approx_s, recall, kinds = [], [], [], set()
            total = 0
            for i in range(min(len(qs), max(repeats, 20))):
                t = time.perf_counter()
                want = run(expr, qs[i], True)
                exact_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                got = run(expr, qs[i], False)
                approx_s.append(time.perf_counter() - t)
                kinds.add(got.search)
                total = got.total
                truth = {h.id for h in want.hits}
                recall.append(len(truth & {h.id for h in got.hits}) / max(len(truth), 1))
            table[label] = {"expression": expr, "matches": total, "search": "/".join(sorted(kinds)),
                            "recall_at_10": round(float(np.mean(recall)), 4),
                            "p50_ms": _ms(approx_s, 50), "p99_ms": _ms(approx_s, 99),
                            "exact_p50_ms": _ms(exact_s, 50), "exact_p99_ms": _ms(exact_s, 99)}
        base = table["unfiltered"]
        return {
            "approximate": info.get("approximate"), "approx_min": vectors.APPROX_MIN if approx_min is None else approx_min,
            "nprobe": nprobe or vectors.DEFAULT_NPROBE, "rerank": vectors.RERANK,
            "recall_at_10": base["recall_at_10"], "approx_p50_ms": base["p50_ms"],
            "approx_p99_ms": base["p99_ms"], "exact_p50_ms": base["exact_p50_ms"],
            "exact_p99_ms": base["exact_p99_ms"],
            "bytes_per_vector": round((flat_bytes + approx_bytes) / n, 1),
            "flat_bytes_per_vector": round(flat_bytes / n, 1),
            "approx_bytes_per_vector": round(approx_bytes / n, 1),
            "build_s": info.get("approx_build_s", 0.0), "publish_s": round(publish_s, 3),
            "first_like_ms": first_like_ms, "first_like_process_ms": process_ms,
            "vector_search": table,
        }


_FIRST_LIKE = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from facefind.db.snapshot import load_snapshot
from facefind.retrieval.engine import Engine
t1 = time.perf_counter()
snap = load_snapshot(sys.argv[1], 1)
engine = Engine(snap)
engine.query(None, limit=20, like=np.asarray(json.loads(sys.argv[2]), dtype=np.float32))
t2 = time.perf_counter()
print(json.dumps({"imports_ms": (t1 - t0) * 1e3, "open_and_query_ms": (t2 - t1) * 1e3}))
"""


def _first_like(index_dir: Path, ref: np.ndarray) -> tuple[float, dict[str, float]]:
    """The first similarity query of a freshly opened snapshot: in this process (opening the
    snapshot, the engine, mapping the store, answering; FAISS already imported) and in a fresh
    Python process (split into imports and open + query)."""
    vectors.configure_faiss()
    start = time.perf_counter()
    engine = Engine(load_snapshot(index_dir, 1))
    engine.query(None, limit=20, like=np.asarray(ref, dtype=np.float32))
    in_process = round((time.perf_counter() - start) * 1e3, 3)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _FIRST_LIKE, str(index_dir),
                           json.dumps(np.asarray(ref, np.float32).tolist())],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        log.warning("fresh-process timing failed: %s", proc.stderr.strip().splitlines()[-1:])
        return in_process, {}
    return in_process, {k: round(v, 1) for k, v in json.loads(proc.stdout).items()}
