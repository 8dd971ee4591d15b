"""The query engine: filtering, confidence and similarity ranking, pagination, quality, bench."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facefind.db.errors import CatalogError, FacefindError, ModelError, QuerySyntaxError
from facefind.db.snapshot import Snapshot
from facefind.retrieval.bench.query import EXPRESSIONS, run_query_bench, synthetic_snapshot
from facefind.retrieval.engine import Engine, top_order
from facefind.retrieval.query import evaluate, parse


def make_snapshot(probs, ids=None, thresholds=None, emb=None, names=("A", "B")) -> Snapshot:
    probs = np.asarray(probs, dtype=np.float32)
    k, n = probs.shape
    ids = np.arange(1, n + 1) if ids is None else np.asarray(ids)
    if emb is None:
        emb = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return Snapshot(model_id=1, stamp=1, attributes=list(names),
                    thresholds=np.full(k, 0.5, np.float32) if thresholds is None
                    else np.asarray(thresholds, np.float32),
                    ids=ids.astype(np.int64), probs=probs, emb=np.asarray(emb, np.float16),
                    paths=[f"/img/{i}.jpg" for i in ids])


@pytest.fixture(scope="module")
def synth():
    snap, labels = synthetic_snapshot(n=3000, k=40, d=32, seed=1)
    return Engine(snap), snap, labels


def _ids(result) -> list[int]:
    return [h.id for h in result.hits]


# -- filtering --------------------------------------------------------------------------------


def _truth(expr: str, snap: Snapshot) -> np.ndarray:
    """Which images satisfy ``expr``, written out by hand in plain Python: no parser, no ``evaluate``.

    A bare name is on when its probability reaches the attribute's threshold; comparisons are made
    against the constant rounded to float32, as the engine documents.
    """
    col = {name: k for k, name in enumerate(snap.attributes)}

    def truth(i: int) -> bool:
        def p(name: str) -> float:
            return float(snap.probs[col[name], i])

        def on(name: str) -> bool:
            return p(name) >= float(np.float32(snap.thresholds[col[name]]))

        def c(value: float) -> float:
            return float(np.float32(value))

        return {
            "Big_Nose and Eyeglasses and not Male": on("Big_Nose") and on("Eyeglasses") and not on("Male"),
            "Smiling > 0.9 or (Blond_Hair and Young)": p("Smiling") > c(0.9) or (on("Blond_Hair") and on("Young")),
            "Eyeglasses and not Male": on("Eyeglasses") and not on("Male"),
            "Male and (Goatee or Mustache or 5_o_Clock_Shadow) and not Young":
                on("Male") and (on("Goatee") or on("Mustache") or on("5_o_Clock_Shadow")) and not on("Young"),
            "not Bald and Young <= 0.2": not on("Bald") and p("Young") <= c(0.2),
            "eyeglasses": on("Eyeglasses"),
            "!Eyeglasses": not on("Eyeglasses"),
            "Smiling > 0.5 & Smiling <= 0.7": c(0.5) < p("Smiling") <= c(0.7),
        }[expr]

    return np.array([truth(i) for i in range(len(snap.ids))])


@pytest.mark.parametrize("expr", [
    "Big_Nose and Eyeglasses and not Male", "Smiling > 0.9 or (Blond_Hair and Young)", "Eyeglasses and not Male",
    "Male and (Goatee or Mustache or 5_o_Clock_Shadow) and not Young", "not Bald and Young <= 0.2",
    "eyeglasses", "!Eyeglasses", "Smiling > 0.5 & Smiling <= 0.7",
])
def test_total_and_hits_agree_with_brute_force(synth, expr: str) -> None:
    engine, snap, _ = synth
    expected = _truth(expr, snap)
    assert 0 < expected.sum() < len(expected)  # the data can tell a wrong mask from a right one
    result = engine.query(expr, limit=len(expected))
    assert result.total == int(expected.sum())
    assert result.n_indexed == 3000
    assert sorted(_ids(result)) == sorted(snap.ids[expected].tolist())  # every match, nothing else
    pos = {int(i): p for p, i in enumerate(snap.ids)}
    for hit in result.hits[:50]:
        assert hit.path == snap.paths[pos[hit.id]]
        assert hit.attributes == dict(zip(snap.attributes, snap.probs[:, pos[hit.id]].tolist()))


def test_confidence_ranking_is_weakest_literal_margin() -> None:
    a = [0.9, 0.6, 0.99, 0.2, 0.7]
    b = [0.9, 0.99, 0.6, 0.9, 0.7]
    engine = Engine(make_snapshot([a, b], ids=[50, 20, 30, 40, 10]))
    # 'and' = min margin: 50 (0.9) > 10 (0.7) > 20 = 30 (0.6, tie -> id ascending)
    assert _ids(engine.query("A and B")) == [50, 10, 20, 30]
    # 'or' = max margin: 20 = 30 (0.99) > 50 = 40 (0.9) > 10 (0.7)
    assert _ids(engine.query("A or B")) == [20, 30, 40, 50, 10]
    # 'not' flips: least A first
    assert _ids(engine.query("not A")) == [40]
    scores = [h.score for h in engine.query("A and B").hits]
    assert scores[0] == pytest.approx(np.log(9.0), rel=1e-5)
    assert scores == sorted(scores, reverse=True)


def test_comparison_literals_rank_by_distance_from_the_cut() -> None:
    engine = Engine(make_snapshot([[0.95, 0.5, 0.05, 0.3], [0.5] * 4]))
    assert _ids(engine.query("A > 0.4")) == [1, 2]
    assert _ids(engine.query("A < 0.4")) == [3, 4]


def test_ties_are_broken_by_id_across_pages_and_partition() -> None:
    rng = np.random.default_rng(3)
    ids = rng.permutation(np.arange(100, 400, 3))
    n = ids.shape[0]
    probs = np.full((2, n), 0.8, np.float32)
    probs[0, ::7] = 0.95  # a few clear winners first
    engine = Engine(make_snapshot(probs, ids=ids))
    full = _ids(engine.query("A", limit=n))
    winners = sorted(ids[::7].tolist())
    assert full == winners + sorted(set(ids.tolist()) - set(winners))
    assert _ids(engine.query("A", limit=len(winners) + 3)) == full[:len(winners) + 3]
    pages = [_ids(engine.query("A", limit=7, offset=o)) for o in range(0, n, 7)]
    assert sum(pages, []) == full
    assert engine.query("A", limit=5, offset=n).hits == []
    assert engine.query("A", limit=0).total == n


def test_no_expression_lists_everything_by_id() -> None:
    engine = Engine(make_snapshot([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], ids=[9, 3, 5]))
    result = engine.query(None)
    assert (result.total, result.ranking, _ids(result)) == (3, "id", [3, 5, 9])


def test_matched_lists_the_literals_that_hold() -> None:
    engine = Engine(make_snapshot([[0.9, 0.1], [0.2, 0.8]], names=("Eyeglasses", "Male")))
    result = engine.query("Eyeglasses and not Male or Male > 0.7", limit=5)
    by_id = {h.id: h.matched for h in result.hits}
    assert by_id == {1: ["Eyeglasses", "not Male"], 2: ["Male > 0.7"]}


def test_result_to_dict_is_json() -> None:
    engine = Engine(make_snapshot([[0.9, 0.1], [0.2, 0.8]]))
    data = json.loads(json.dumps(engine.query("A or B").to_dict()))
    assert data["total"] == 2
    assert set(data["hits"][0]) == {"id", "path", "face", "box", "score", "attributes", "matched"}
    assert (data["hits"][0]["face"], data["hits"][0]["box"]) == (0, None)  # a snapshot without faces


@settings(max_examples=150, deadline=None)
@given(expr=st.sampled_from(["A", "not A", "A and B", "A or not B", "not (A and C > 0.3)",
                             "A <= 0.5 or B >= 0.5 and not C", "(A or B) and (B or C)"]),
       seed=st.integers(0, 2**31))
def test_scores_are_nonnegative_exactly_for_matches(expr: str, seed: int) -> None:
    """The robustness score is >= 0 on every match and <= 0 elsewhere, even on boundaries."""
    rng = np.random.default_rng(seed)
    probs = rng.choice(np.array([0.0, 0.3, 0.5, 0.5000001, 0.7, 1.0, 1e-7], np.float32),
                       size=(3, 30))
    engine = Engine(make_snapshot(probs, names=("A", "B", "C"),
                                  thresholds=rng.choice([0.3, 0.5, 0.7], 3)))
    node = engine.parse(expr)
    mask = engine.mask(node)
    scores = engine.confidence(node, np.arange(30))
    assert (scores[mask] >= 0).all() and (scores[~mask] <= 0).all()


def test_top_order_exact_with_ties() -> None:
    scores = np.array([1.0, 2.0, 2.0, 2.0, 0.5, 2.0], np.float32)
    ids = np.array([6, 5, 4, 3, 2, 1])
    assert top_order(scores, ids, 2).tolist() == [5, 3]
    assert top_order(scores, ids, 10).tolist() == [5, 3, 2, 1, 0, 4]
    assert top_order(scores, ids, 0).tolist() == []


# -- similarity -------------------------------------------------------------------------------


def _brute_similar(snap: Snapshot, q: np.ndarray, mask: np.ndarray, k: int) -> list[int]:
    sims = snap.emb.astype(np.float32) @ (q / np.linalg.norm(q))
    sims[~mask] = -np.inf
    order = np.lexsort((snap.ids, -sims))[:k]
    return [int(snap.ids[i]) for i in order if mask[i]]


def test_like_id_returns_itself_first(synth) -> None:
    engine, snap, _ = synth
    target = int(snap.ids[1234])
    result = engine.query(None, like_id=target, limit=5)
    assert result.ranking == "similarity"
    assert result.hits[0].id == target
    assert result.hits[0].score == pytest.approx(1.0, abs=2e-3)
    assert result.total == 3000


@pytest.mark.parametrize("expr", [None, "Eyeglasses and not Male", "Bald", "not Bald", "Male",
                                  "Smiling > 0.2"])
def test_similarity_is_exact_top_k_under_the_filter(synth, expr) -> None:
    engine, snap, _ = synth
    rng = np.random.default_rng(5)
    for _ in range(3):
        q = rng.standard_normal(snap.emb.shape[1]).astype(np.float32)
        mask = np.ones(3000, bool) if expr is None else evaluate(
            parse(expr, snap.attributes), snap.probs, snap.thresholds)
        result = engine.query(expr, like=q, limit=15, offset=5)
        assert _ids(result) == _brute_similar(snap, q, mask, 20)[5:]
        scores = [h.score for h in result.hits]
        assert scores == sorted(scores, reverse=True)


def test_similarity_when_the_neighbourhood_is_filtered_out(synth) -> None:
    """The wide-filter path must widen its search when the nearest images do not match."""
    engine, snap, _ = synth
    q = np.asarray(snap.emb[10], np.float32)
    sims = snap.emb.astype(np.float32) @ q
    mask = np.ones(3000, bool)
    mask[np.argsort(-sims)[:600]] = False  # the 600 nearest are excluded
    probs = snap.probs.copy()
    probs[0] = np.where(mask, 0.9, 0.1)
    engine2 = Engine(replace(snap, probs=probs))
    name = snap.attributes[0]
    result = engine2.query(name, like=q, limit=10)
    assert result.total == int(mask.sum())
    assert _ids(result) == _brute_similar(snap, q, mask, 10)


def test_like_errors(synth) -> None:
    engine, snap, _ = synth
    with pytest.raises(CatalogError, match="not in the index"):
        engine.query(None, like_id=10**9)
    with pytest.raises(ModelError, match="dimensions"):
        engine.query(None, like=np.ones(5, np.float32))
    with pytest.raises(ModelError, match="zero"):
        engine.query(None, like=np.zeros(snap.emb.shape[1], np.float32))
    with pytest.raises(FacefindError, match="must be >= 0"):
        engine.query("Male", limit=-1)
    with pytest.raises(QuerySyntaxError, match="did you mean Eyeglasses"):
        engine.query("Eyeglases")


# -- the index itself -------------------------------------------------------------------------


def test_inconsistent_or_empty_snapshots_are_catalog_errors() -> None:
    good = make_snapshot([[0.1, 0.2, 0.3], [0.3, 0.4, 0.5]])
    with pytest.raises(CatalogError, match="empty"):
        Engine(make_snapshot(np.zeros((2, 0))))
    with pytest.raises(CatalogError, match="probs has shape"):
        Engine(replace(good, probs=good.probs.T.copy()))
    with pytest.raises(CatalogError, match="paths"):
        Engine(replace(good, paths=["x"]))
    with pytest.raises(CatalogError, match="ids repeat"):
        Engine(replace(good, ids=np.array([7, 7, 8])))
    with pytest.raises(CatalogError, match="case-insensitive"):
        Engine(replace(good, attributes=["Male", "MALE"]))


# -- retrieval quality ------------------------------------------------------------------------


def test_quality_against_labels() -> None:
    #          image:  1    2    3    4    5    6
    a = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.2], np.float32)
    labels = np.array([[1, 0, 1, -1, 1, -1], [0, 0, 0, 0, 0, 0]])  # -1/1 as in CelebA files
    engine = Engine(make_snapshot([a, a]))
    result = engine.query("A", limit=3)  # ids 1, 2, 3
    q = engine.evaluate_quality(result, labels, np.arange(1, 7), ["A", "B"])
    assert (q.k, q.relevant, q.precision_at_k) == (3, 2, pytest.approx(2 / 3))
    assert q.precision_all == pytest.approx(2 / 4)   # predicted 1-4, true 1 and 3
    assert q.recall == pytest.approx(2 / 3)          # true 1, 3, 5
    assert q.base_rate == pytest.approx(3 / 6)
    assert q.n_labelled == 6
    # label columns may come in another order, and only some images may be labelled
    q2 = engine.evaluate_quality(result, labels[::-1, [4, 0, 1]], np.array([5, 1, 2]), ["b", "a"])
    assert (q2.k, q2.relevant, q2.n_labelled, q2.base_rate) == (2, 1, 3, pytest.approx(2 / 3))
    with pytest.raises(CatalogError, match="no A"):
        engine.evaluate_quality(result, labels[1:], np.arange(1, 7), ["B"])
    with pytest.raises(FacefindError, match="needs an expression"):
        engine.evaluate_quality(engine.query(None), labels, np.arange(1, 7), ["A", "B"])


def test_quality_on_synthetic_index_beats_base_rate(synth) -> None:
    engine, snap, labels = synth
    result = engine.query("Eyeglasses and not Male", limit=20)
    q = engine.evaluate_quality(result, labels, snap.ids, snap.attributes)
    assert q.precision_at_k > 2 * q.base_rate


# -- process-level and benchmark --------------------------------------------------------------


def test_query_path_imports_neither_torch_nor_faiss() -> None:
    code = (
        "import sys, numpy as np\n"
        "from facefind.retrieval.engine import Engine\n"
        "from facefind.retrieval.bench.query import synthetic_snapshot\n"
        "import facefind.retrieval.gallery\n"
        "e = Engine(synthetic_snapshot(n=200, d=8)[0])\n"
        "assert e.query('Male and not Young').total > 0\n"
        "assert 'torch' not in sys.modules and 'faiss' not in sys.modules, 'heavy import'\n"
        "e.query(None, like_id=5)\n"
        "assert 'faiss' in sys.modules and 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_bench_runs_small_and_the_baseline_agrees() -> None:
    out = run_query_bench(n=2000, k=40, d=16, repeats=2, baseline_repeats=1)
    for key in ("n", "engine_p50_ms", "engine_p99_ms", "like_p50_ms", "baseline_p50_ms",
                "speedup"):
        assert key in out
    assert out["n"] == 2000
    assert len(out["expressions"]) == len(EXPRESSIONS)
    for row in out["expressions"]:
        assert row["baseline_same_total"], row
        assert row["baseline_same_top"], row
        for name in ("same_settings", "numpy_brute_force"):  # independent implementations agree
            assert row[f"{name}_same_total"] and row[f"{name}_same_top"], (name, row)
    assert set(out["baselines"]) == {"study_style", "same_settings", "numpy_brute_force"}
    for key in ("recall_at_10", "approx_p50_ms", "exact_p50_ms", "bytes_per_vector", "build_s", "first_like_ms"):
        assert key in out
    assert out["approximate"] is None and out["vector_search"]["unfiltered"]["search"] == "exact"
    assert out["recall_at_10"] == 1.0 and out["bytes_per_vector"] >= 2 * 16  # fp16 rows, exact below the cut-over
    json.dumps(out)


# -- threshold sets -----------------------------------------------------------------------------


def two_set_snapshot(**overrides) -> Snapshot:
    #                image:  1     2     3     4     5
    rare = np.array([0.45, 0.30, 0.12, 0.05, 0.02], np.float32)  # rarely reaches its accuracy cut
    common = np.array([0.9, 0.8, 0.3, 0.7, 0.1], np.float32)
    sets = {"accuracy": np.array([0.40, 0.5], np.float32), "f1": np.array([0.10, 0.5], np.float32)}
    fields = dict(model_id=1, stamp=1, attributes=["Rare", "Common"], thresholds=sets["f1"],
                  ids=np.arange(1, 6), probs=np.stack([rare, common]),
                  emb=np.ones((5, 4), np.float16), paths=[f"/img/{i}.jpg" for i in range(1, 6)],
                  threshold_set="f1", threshold_sets=sets,
                  threshold_stats={"f1": {"f1": [0.15, 0.8], "precision": [0.1, 0.8], "recall": [0.4, 0.8]},
                                   "accuracy": {"f1": [0.05, 0.8], "precision": [0.5, 0.8],
                                                "recall": [0.03, 0.8]}})
    fields.update(overrides)
    return Snapshot(**fields)


def test_bare_names_use_the_index_default_set_and_the_api_picks_another() -> None:
    engine = Engine(two_set_snapshot())
    assert engine.default_thresholds == "f1" and set(engine.threshold_sets) == {"accuracy", "f1"}
    default = engine.query("Rare", limit=10)
    assert default.thresholds == "f1" and _ids(default) == [1, 2, 3]  # p >= 0.10
    strict = engine.query("Rare", limit=10, thresholds="accuracy")
    assert strict.thresholds == "accuracy" and _ids(strict) == [1]   # p >= 0.40
    assert engine.query("rare or Common", thresholds="ACCURACY").total == 3  # 1, 2, 4
    # comparisons ignore the sets
    for name in ("f1", "accuracy"):
        assert _ids(engine.query("Rare > 0.2", limit=10, thresholds=name)) == [1, 2]
    with pytest.raises(FacefindError, match="unknown threshold set 'recall'"):
        engine.query("Rare", thresholds="recall")


def test_confidence_and_matched_follow_the_set_in_use() -> None:
    def logit(p: float) -> float:
        return float(np.log(np.float32(p)) - np.log1p(-np.float32(p)))

    engine = Engine(two_set_snapshot())
    for name, cut in (("f1", 0.10), ("accuracy", 0.40)):
        result = engine.query("Rare", limit=10, thresholds=name)
        for hit in result.hits:  # margin against this set's cut: >= 0 for every match
            assert hit.score == pytest.approx(logit(hit.attributes["Rare"]) - logit(cut), abs=1e-4)
            assert hit.score >= 0 and hit.matched == ["Rare"]
    # an image matched through "not Rare" at accuracy's cut is not one at f1's
    assert 2 in _ids(engine.query("not Rare", limit=10, thresholds="accuracy"))
    assert 2 not in _ids(engine.query("not Rare", limit=10))


def test_weak_attributes_warn_in_one_line_each() -> None:
    engine = Engine(two_set_snapshot())
    warnings = engine.query("Rare and Common or not rare").warnings
    assert len(warnings) == 1 and warnings[0].startswith("Rare has val F1 0.15 at the f1 thresholds")
    assert "\n" not in warnings[0]
    assert engine.query("Common").warnings == () and engine.query("Rare > 0.3").warnings == ()
    assert "F1 0.05 at the accuracy" in engine.query("Rare", thresholds="accuracy").warnings[0]
    assert engine.query("Rare").to_dict()["warnings"] == list(warnings[:1])
    # without val figures (older index), nothing to warn about
    assert Engine(two_set_snapshot(threshold_stats={})).query("Rare").warnings == ()


def test_a_one_set_index_falls_back_and_says_so_once(caplog) -> None:
    old = make_snapshot([[0.9, 0.2], [0.1, 0.8]], thresholds=[0.5, 0.5])  # no sets: an older index
    engine = Engine(old)
    assert engine.default_thresholds == "accuracy" and list(engine.threshold_sets) == ["accuracy"]
    with caplog.at_level("WARNING", logger="facefind.retrieval.engine"):
        first = engine.query("A")
        again = engine.query("A", thresholds="f1")
        engine.query("B")
    assert first.thresholds == again.thresholds == "accuracy" and first.total == again.total == 1
    assert sum("no f1 thresholds" in r.getMessage() for r in caplog.records) == 1


def test_query_takes_a_parsed_node_and_quality_does_not_reparse(monkeypatch) -> None:
    import facefind.retrieval.engine as engine_module

    engine = Engine(two_set_snapshot())
    real_parse, calls = engine_module.parse, []
    monkeypatch.setattr(engine_module, "parse", lambda *a: calls.append(a) or real_parse(*a))
    checked = engine.parse("Rare & !Common")  # as the CLI checks before loading a model
    from_text = engine.query("Rare & !Common", limit=5)
    assert len(calls) == 1 and from_text.node is checked and from_text.expression == "Rare & !Common"
    node = real_parse("rare and not common", engine.attributes)
    from_node = engine.query(node, limit=5)
    assert len(calls) == 1 and from_node.node is node and from_node.expression == "Rare and not Common"
    assert _ids(from_node) == _ids(from_text) == [3]
    # labels in another order and case; bare names read the labels, the prediction uses the set in use
    labels = np.array([[0, 1, 0, 0, 0], [1, 1, 0, 0, 0]])  # rows: common, rare
    q = engine.evaluate_quality(from_node, labels, np.arange(1, 6), ["common", "RARE"])
    assert len(calls) == 1
    assert (q.k, q.relevant, q.recall) == (1, 0, 0.0)  # truly: only image 1 is rare and not common
