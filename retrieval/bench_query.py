"""Query benchmark: the engine against a naive SQL baseline on a synthetic index of CelebA size.

``run_query_bench()`` builds a snapshot in memory (no images): 40 attributes whose probabilities
come from a correlated latent factor model (a "male", a "smile" and an "age" factor plus random
ones, identity-level and image-level parts, CelebA-like base rates) and embeddings clustered by
identity and tilted by the same latents. It then times a fixed set of expressions through
``Engine.query`` (filter + rank, with and without a ``like`` reference) and through the baseline
people write first: an SQLite table with one column per attribute, a ``SELECT ... WHERE`` built
from the same tree as SQLAlchemy expressions (bound parameters), and a Python sort by the same
confidence score. All in one process, so the figures are comparable.
"""

from __future__ import annotations

import logging
import math
import time
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

from db.snapshot import Snapshot
from retrieval.engine import EPS, Engine
from retrieval.query import Attr, Literal, Node, fold, literals, parse

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
    import sqlalchemy as sa

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
        import sqlalchemy as sa

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
        import sqlalchemy as sa

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
                    expressions: Sequence[str] = EXPRESSIONS) -> dict[str, Any]:
    """Time the engine and the SQL baseline on the same synthetic index; returns a JSON-able dict.

    Keys: n, engine_p50_ms / engine_p99_ms (filter + confidence rank, pooled over expressions),
    like_p50_ms / like_p99_ms (filter + cosine rank), like_unfiltered_p50_ms, baseline_p50_ms
    (SQL WHERE + Python sort), baseline_sql_p50_ms (the SELECT alone), speedup, setup timings,
    and per-expression details including whether the baseline agrees on the count and the top.
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
    engine.query(None, limit=limit, like=ref)  # builds the similarity index once
    like_build_ms = (time.perf_counter() - start) * 1e3
    t2 = time.perf_counter()
    baseline = SqlBaseline(snap)
    t3 = time.perf_counter()

    pooled: dict[str, list[float]] = {"engine": [], "like": [], "baseline": [], "sql": []}
    details = []
    for expr in expressions:
        node = parse(expr, snap.attributes)
        engine.query(expr, limit=limit)  # warm the per-attribute log-odds rows
        eng_s, res = _timed(lambda: engine.query(expr, limit=limit), repeats)
        like_s, _ = _timed(lambda: engine.query(expr, limit=limit, like=ref), repeats)
        base_s, base = _timed(lambda: baseline.query(node, limit), baseline_repeats)
        sql_s = [baseline.query(node, limit)[2] for _ in range(baseline_repeats)]
        for key, samples in (("engine", eng_s), ("like", like_s), ("baseline", base_s),
                             ("sql", sql_s)):
            pooled[key] += samples
        details.append({
            "expression": expr, "total": res.total,
            "engine_p50_ms": _ms(eng_s, 50), "engine_p99_ms": _ms(eng_s, 99),
            "like_p50_ms": _ms(like_s, 50), "baseline_p50_ms": _ms(base_s, 50),
            "baseline_sql_p50_ms": _ms(sql_s, 50),
            "speedup": round(float(np.median(base_s) / np.median(eng_s)), 1),
            "baseline_same_total": base[0] == res.total,
            "baseline_same_top": base[1] == [h.id for h in res.hits],
        })
    unfiltered_s, _ = _timed(lambda: engine.query(None, limit=limit, like=ref), repeats)
    engine_p50 = _ms(pooled["engine"], 50)
    baseline_p50 = _ms(pooled["baseline"], 50)
    return {
        "n": n, "k": k, "d": d, "seed": seed, "limit": limit, "repeats": repeats,
        "engine_p50_ms": engine_p50, "engine_p99_ms": _ms(pooled["engine"], 99),
        "like_p50_ms": _ms(pooled["like"], 50), "like_p99_ms": _ms(pooled["like"], 99),
        "like_unfiltered_p50_ms": _ms(unfiltered_s, 50),
        "baseline_p50_ms": baseline_p50, "baseline_sql_p50_ms": _ms(pooled["sql"], 50),
        "speedup": round(baseline_p50 / engine_p50, 1) if engine_p50 else None,
        "first_query_ms": round(first_ms, 3), "like_index_build_ms": round(like_build_ms, 3),
        "synthesis_s": round(t1 - t0, 3), "baseline_load_s": round(t3 - t2, 3),
        "expressions": details,
    }
