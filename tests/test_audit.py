"""The audit (facefind.retrieval.audit, `facefind audit`, GET /api/audit) against an independent oracle.

The oracle is written out below with plain Python loops over the labels and the predicted sets
(p >= threshold): counts, rates, precision/recall/F1, AP (distinct scores: mean precision at each
positive's rank), per-group TPR/FPR and the gaps. It shares no code with the module under test.
"""

from __future__ import annotations

import json
import math
import sys
import subprocess

import numpy as np
import pytest

from facefind.db.errors import FacefindError
from facefind.db.snapshot import Snapshot
from facefind.retrieval.audit import CONFIDENT, run_audit
from facefind.retrieval.engine import Engine

ATTRS = ["Eyeglasses", "Male", "Smiling", "Young"]


def make_engine(probs: np.ndarray, thresholds: np.ndarray, labels: np.ndarray | None,
                splits: np.ndarray | None = None, label_attributes: list[str] | None = None) -> Engine:
    """An engine over an in-memory snapshot with ground truth (ids 1..N)."""
    k, n = probs.shape
    t = thresholds.astype(np.float32)
    snap = Snapshot(model_id=1, stamp=1, attributes=list(ATTRS[:k]), thresholds=t, threshold_set="f1",
                    threshold_sets={"f1": t, "accuracy": np.full(k, 0.5, np.float32)},
                    ids=np.arange(1, n + 1, dtype=np.int64), probs=probs.astype(np.float32),
                    emb=np.zeros((n, 4), np.float16), paths=[f"/x/{i:06d}.jpg" for i in range(1, n + 1)],
                    label_attributes=None if labels is None else (label_attributes or list(ATTRS[:k])),
                    labels=labels, splits=splits)
    return Engine(snap)


def synthetic(n: int = 400, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded probabilities (distinct values), thresholds, labels that mostly agree, and splits;
    every 17th entry carries no labels."""
    rng = np.random.default_rng(seed)
    k = len(ATTRS)
    truth = rng.random((k, n)) < np.array([0.15, 0.45, 0.5, 0.75])[:, None]
    noise = rng.normal(0, 1.2, (k, n))
    probs = 1 / (1 + np.exp(-(np.where(truth, 1.5, -1.5) + noise)))
    probs = probs.astype(np.float32)
    thresholds = np.array([0.4, 0.5, 0.55, 0.45], np.float32)
    labels = truth.astype(np.int8)
    labels[:, ::17] = -1
    splits = rng.integers(0, 3, n).astype(np.int8)
    return probs, thresholds, labels, splits


# ------------------------------------------------------------------------------------ the oracle


def oracle_attribute(probs, t, labels, k):
    """Hand-counted metrics of attribute k over entries with labels."""
    tp = fp = fn = tn = 0
    scored = []
    for i in range(probs.shape[1]):
        y = int(labels[k, i])
        if y < 0:
            continue
        p = bool(probs[k, i] >= t[k])
        tp += p and y == 1
        fp += p and y == 0
        fn += (not p) and y == 1
        tn += (not p) and y == 0
        scored.append((float(probs[k, i]), y))
    scored.sort(key=lambda s: -s[0])
    hits, precisions = 0, []
    for rank, (_, y) in enumerate(scored, start=1):
        if y == 1:
            hits += 1
            precisions.append(hits / rank)
    n = tp + fp + fn + tn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "accuracy": (tp + tn) / n, "label_rate": (tp + fn) / n,
            "predicted_rate": (tp + fp) / n, "precision": tp / (tp + fp), "recall": tp / (tp + fn),
            "f1": 2 * tp / (2 * tp + fp + fn), "ap": sum(precisions) / len(precisions)}


def oracle_group(probs, t, labels, k, g, member):
    """TPR, FPR, predicted rate and accuracy of attribute k among entries whose label of g is ``member``."""
    tp = fp = pos = neg = predicted = 0
    for i in range(probs.shape[1]):
        if labels[g, i] != member or labels[k, i] < 0:
            continue
        p = probs[k, i] >= t[k]
        predicted += bool(p)
        if labels[k, i] == 1:
            pos += 1
            tp += bool(p)
        else:
            neg += 1
            fp += bool(p)
    return {"tpr": tp / pos, "fpr": fp / neg, "predicted_rate": predicted / (pos + neg),
            "accuracy": (tp + neg - fp) / (pos + neg), "fn": pos - tp, "fp": fp}


def close(a, b):
    return a is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


# ------------------------------------------------------------------------------------- unit tests


def test_attribute_metrics_match_hand_counts():
    probs, t, labels, splits = synthetic()
    report = run_audit(make_engine(probs, t, labels, splits), by=["Male"]).to_dict()
    assert report["checked_against_labels"] is True
    assert report["coverage"]["entries"] == 400
    assert report["coverage"]["with_labels"] == sum(1 for i in range(400) if labels[0, i] >= 0)
    for k, row in enumerate(report["attributes"]):
        want = oracle_attribute(probs, t, labels, k)
        assert row["attribute"] == ATTRS[k]
        for key in ("tp", "fp", "fn", "tn"):
            assert row[key] == want[key], (ATTRS[k], key)
        for key in ("accuracy", "label_rate", "predicted_rate", "precision", "recall", "f1", "ap"):
            assert close(row[key], want[key]), (ATTRS[k], key, row[key], want[key])
        assert row["false_negatives"]["count"] == want["fn"]
        assert row["false_positives"]["count"] == want["fp"]


def test_disagreements_rank_by_margin_and_count_confident_ones():
    probs, t, labels, splits = synthetic()
    report = run_audit(make_engine(probs, t, labels, splits), by=[], top=5).to_dict()
    for k, row in enumerate(report["attributes"]):
        logit = lambda p: math.log(p / (1 - p))  # noqa: E731
        fns = [(logit(t[k]) - logit(probs[k, i]), i + 1) for i in range(400) if labels[k, i] == 1 and probs[k, i] < t[k]]
        fps = [(logit(probs[k, i]) - logit(t[k]), i + 1) for i in range(400) if labels[k, i] == 0 and probs[k, i] >= t[k]]
        for way, pairs in (("false_negatives", fns), ("false_positives", fps)):
            pairs.sort(key=lambda m: (-m[0], m[1]))
            assert row[way]["top"] == [i for _, i in pairs[:5]], (ATTRS[k], way)
            assert row[way]["confident"] == sum(1 for m, _ in pairs if m >= CONFIDENT - 1e-5)
    assert report["attributes"][0]["false_negatives"]["query"] == "label:Eyeglasses and not Eyeglasses"
    assert report["attributes"][0]["false_positives"]["query"] == "Eyeglasses and not label:Eyeglasses"
    assert report["confident_margin"] == CONFIDENT


def test_a_flipped_label_comes_first_in_its_disagreement_query():
    probs, t, labels, splits = synthetic()
    # The face the model is surest wears glasses, with its label flipped: the likeliest label error.
    i = int(np.argmax(probs[0]))
    labels[0, i] = 0
    engine = make_engine(probs, t, labels, splits)
    row = run_audit(engine, by=[]).to_dict()["attributes"][0]
    assert row["false_positives"]["top"][0] == i + 1
    hits = engine.query(row["false_positives"]["query"], limit=10).hits
    assert [h.id for h in hits] == row["false_positives"]["top"]


@pytest.mark.parametrize("where", ["Smiling or split:val", "Smiling | split:val"])  # '|' once lost its parentheses
def test_listed_ids_are_the_first_hits_of_their_queries_also_under_where(where):
    probs, t, labels, splits = synthetic()
    engine = make_engine(probs, t, labels, splits)
    report = run_audit(engine, where=where, by=["Male"], top=8).to_dict()
    for row in report["attributes"]:
        for way in ("false_negatives", "false_positives"):
            result = engine.query(row[way]["query"], limit=8)
            assert result.total == row[way]["count"]
            assert [h.id for h in result.hits] == row[way]["top"], (row["attribute"], way)


def test_groups_by_label_match_hand_counts_and_gaps():
    probs, t, labels, splits = synthetic()
    engine = make_engine(probs, t, labels, splits)
    report = run_audit(engine, by=["Male"]).to_dict()
    (block,) = report["groups"]
    assert block["by"] == "Male" and block["source"] == "label"
    male, female = block["groups"]
    assert male["name"] == "Male" and female["name"] == "not Male"
    assert male["entries"] == int(np.sum(labels[1] == 1)) and female["entries"] == int(np.sum(labels[1] == 0))
    assert "Male" not in male["attributes"]
    for k in (0, 2, 3):
        a = ATTRS[k]
        m, f = oracle_group(probs, t, labels, k, 1, 1), oracle_group(probs, t, labels, k, 1, 0)
        for key in ("tpr", "fpr", "predicted_rate", "accuracy"):
            assert close(male["attributes"][a][key], m[key]) and close(female["attributes"][a][key], f[key])
        assert male["attributes"][a]["fn"] == {"count": m["fn"], "query": f"label:{a} and not {a} and label:Male"}
        assert female["attributes"][a]["fp"]["count"] == f["fp"]
        gap = block["gaps"][a]
        assert close(gap["demographic_parity"], abs(m["predicted_rate"] - f["predicted_rate"]))
        assert close(gap["equalized_odds"], max(abs(m["tpr"] - f["tpr"]), abs(m["fpr"] - f["fpr"])))
        # Each group's counts are what its query finds.
        for grp in (male, female):
            for way in ("fn", "fp"):
                cell = grp["attributes"][a][way]
                assert engine.query(cell["query"], limit=0).total == cell["count"]
    eo = [g["equalized_odds"] for g in report["largest_gaps"]]
    assert eo == sorted(eo, reverse=True) and len(eo) == 3


def test_gap_cell_query_shows_the_worse_groups_faces():
    probs, t, labels, splits = synthetic()
    engine = make_engine(probs, t, labels, splits)
    report = run_audit(engine, by=["Male"]).to_dict()
    for a, gap in report["groups"][0]["gaps"].items():
        k = ATTRS.index(a)
        m, f = oracle_group(probs, t, labels, k, 1, 1), oracle_group(probs, t, labels, k, 1, 0)
        if abs(m["tpr"] - f["tpr"]) >= abs(m["fpr"] - f["fpr"]):
            worse = "label:Male" if m["tpr"] <= f["tpr"] else "not label:Male"
            assert gap["query"] == f"label:{a} and not {a} and {worse}"
        else:
            worse = "label:Male" if m["fpr"] >= f["fpr"] else "not label:Male"
            assert gap["query"] == f"{a} and not label:{a} and {worse}"


def test_where_restricts_coverage_and_warns_about_training_images():
    probs, t, labels, splits = synthetic()
    engine = make_engine(probs, t, labels, splits)
    everything = run_audit(engine, by=[]).to_dict()
    assert everything["coverage"]["splits"]["train"] == int(np.sum(splits == 0))
    assert any("train split" in w for w in everything["warnings"])
    val = run_audit(engine, where="not split:train", by=[]).to_dict()
    assert val["coverage"]["entries"] == int(np.sum(splits != 0))
    assert val["coverage"]["splits"]["train"] == 0
    assert not any("train split" in w for w in val["warnings"])
    keep = splits != 0
    want = oracle_attribute(probs[:, keep], t, labels[:, keep], 2)
    assert val["attributes"][2]["tp"] == want["tp"] and close(val["attributes"][2]["f1"], want["f1"])
    assert val["attributes"][2]["false_negatives"]["query"] == "not split:train and label:Smiling and not Smiling"


def test_without_labels_it_reports_predicted_composition_only():
    probs, t, _, _ = synthetic()
    report = run_audit(make_engine(probs, t, None), by=["Male"]).to_dict()
    assert report["checked_against_labels"] is False
    assert any("nothing was checked against labels" in w for w in report["warnings"])
    assert report["attributes"][0]["f1"] is None and "false_negatives" not in report["attributes"][0]
    block = report["groups"][0]
    assert block["source"] == "prediction"
    male, female = block["groups"]
    is_male = probs[1] >= t[1]
    assert male["entries"] == int(is_male.sum())
    for k in (0, 2, 3):
        a = ATTRS[k]
        rate_m = sum(1 for i in range(400) if is_male[i] and probs[k, i] >= t[k]) / int(is_male.sum())
        rate_f = sum(1 for i in range(400) if not is_male[i] and probs[k, i] >= t[k]) / int((~is_male).sum())
        assert close(male["attributes"][a]["predicted_rate"], rate_m)
        assert close(block["gaps"][a]["demographic_parity"], abs(rate_m - rate_f))
        assert block["gaps"][a]["equalized_odds"] is None
        assert male["attributes"][a]["predicted"]["query"] == f"{a} and Male"
    dp = [g["demographic_parity"] for g in report["largest_gaps"]]
    assert dp == sorted(dp, reverse=True)


def test_labels_stored_in_another_order_are_matched_by_name():
    probs, t, labels, splits = synthetic()
    order = [3, 1, 0, 2]
    engine = make_engine(probs, t, labels[order], splits, label_attributes=[ATTRS[i] for i in order])
    report = run_audit(engine, by=["Male"]).to_dict()
    for k, row in enumerate(report["attributes"]):
        assert row["tp"] == oracle_attribute(probs, t, labels, k)["tp"]


@pytest.mark.parametrize("kwargs, needle", [
    ({"by": ["Mael"]}, "unknown attribute 'Mael'"),
    ({"where": "Smilng"}, "Smiling"),
    ({"top": -1}, "--top"),
    ({"thresholds": "recall"}, "unknown threshold set"),
    ({"where": "Male and not Male"}, "nothing to audit"),
])
def test_bad_input_is_one_line_saying_what_to_do(kwargs, needle):
    probs, t, labels, splits = synthetic(n=50)
    with pytest.raises(FacefindError) as err:
        run_audit(make_engine(probs, t, labels, splits), **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value).strip()


def test_audit_never_imports_torch():
    code = ("import sys; import facefind.retrieval.cli; import facefind.retrieval.audit; "
            "import facefind.retrieval.audit_report; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------- the real CLI and API, on a real index


def built_oracle(built, attribute: str) -> dict:
    """Hand counts over helpers.Built's stored probabilities and the labels file (via Built.labels)."""
    t = built.thresholds[attribute]
    tp = fp = fn = tn = 0
    for path, probs in built.probs.items():
        y, p = built.labels[path][attribute], probs[attribute] >= t
        tp += p and y
        fp += p and not y
        fn += (not p) and y
        tn += (not p) and not y
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


@pytest.fixture(scope="module")
def built(web_index):
    return web_index


def cli(*args: str):
    from typer.testing import CliRunner

    from facefind.retrieval.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def test_cli_audit_json_agrees_with_hand_counts_and_with_query(built, tmp_path):
    out = cli("audit", "--index", built.index, "--by", "Male", "--top", "5", "--json")
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["coverage"]["entries"] == len(built.probs) == report["coverage"]["with_labels"]
    rows = {r["attribute"]: r for r in report["attributes"]}
    assert set(rows) == set(built.attributes)
    for a in built.attributes:
        want = built_oracle(built, a)
        assert {key: rows[a][key] for key in ("tp", "fp", "fn", "tn")} == want, a
    # The listed disagreements are the first hits of `facefind query` on the printed expression.
    row = max(rows.values(), key=lambda r: r["false_negatives"]["count"])
    q = cli("query", row["false_negatives"]["query"], "--index", built.index, "--limit", "5", "--json")
    assert q.exit_code == 0, q.output
    hits = json.loads(q.stdout)
    assert hits["total"] == row["false_negatives"]["count"] > 0
    assert [h["id"] for h in hits["hits"]] == row["false_negatives"]["top"]


def test_cli_audit_table_and_self_contained_html(built, tmp_path):
    html = tmp_path / "audit.html"
    out = cli("audit", "--index", built.index, "--html", html)
    assert out.exit_code == 0, out.output
    assert "Eyeglasses" in out.stdout and "largest gaps" in out.stdout and "by Male" in out.stdout
    text = html.read_text()
    assert "/static/" not in text and "<script src" not in text and "window.AUDIT" in text
    data = json.loads(text.split("window.AUDIT = ", 1)[1].split(";</script>", 1)[0].replace("<\\/", "</"))
    assert data["base"] is None and data["report"]["coverage"]["entries"] == len(built.probs)


@pytest.mark.parametrize("args, needle", [
    (["--by", "Mael"], "unknown attribute 'Mael'"),
    (["--where", "Eyeglases"], "Eyeglasses"),
    (["--where", "split:training"], "split"),
    (["--base-url", "http://x"], "--html"),
])
def test_cli_audit_bad_input_is_one_line(built, args, needle):
    out = cli("audit", "--index", built.index, *args)
    assert out.exit_code == 1
    lines = out.stderr.strip().splitlines() if out.stderr_bytes is not None else out.output.strip().splitlines()
    assert lines[0].startswith("error: ") and needle in out.output
    assert "Traceback" not in out.output


def test_audit_command_never_imports_torch(built):
    code = ("import sys; from facefind.retrieval.cli import app; from typer.testing import CliRunner; "
            f"r = CliRunner().invoke(app, ['audit', '--index', {str(built.index)!r}, '--json']); "
            "assert r.exit_code == 0, r.output; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


@pytest.fixture(scope="module")
def client(built, tmp_path_factory):
    from helpers import serving  # every /api/ answer is checked against /openapi.json

    yield from serving(built.index, tmp_path_factory.mktemp("thumbs"))


def test_api_audit_is_the_cli_json(built, client):
    out = cli("audit", "--index", built.index, "--by", "Male,Young", "--json")
    assert client.get("/api/audit").json() == json.loads(out.stdout)
    out = cli("audit", "--index", built.index, "--by", "Smiling", "--top", "3", "--json")
    assert client.get("/api/audit", params={"by": "Smiling", "top": 3}).json() == json.loads(out.stdout)
    assert "/api/audit" in client.get("/openapi.json").json()["paths"]
    page = client.get("/audit")
    assert page.status_code == 200 and "/static/audit.js" in page.text


@pytest.mark.parametrize("params, needle", [
    ({"by": "Mael"}, "unknown attribute 'Mael'"),
    ({"where": "label:Eyeglases"}, "Eyeglasses"),
    ({"top": -1}, "top"),
])
def test_api_audit_bad_input_is_one_line_json(client, params, needle):
    resp = client.get("/api/audit", params=params)
    assert resp.status_code in (400, 422)
    assert needle in resp.json()["error"] and "\n" not in resp.json()["error"]


def test_each_gap_says_how_many_labelled_faces_it_rests_on():
    probs, t, labels, splits = synthetic()
    report = run_audit(make_engine(probs, t, labels, splits), by=["Male"]).to_dict()
    for a, gap in report["groups"][0]["gaps"].items():
        k = ATTRS.index(a)
        pos = [sum(1 for i in range(400) if labels[1, i] == m and labels[k, i] == 1) for m in (1, 0)]
        neg = [sum(1 for i in range(400) if labels[1, i] == m and labels[k, i] == 0) for m in (1, 0)]
        assert gap["support"] == (min(pos) if gap["query"].startswith("label:") else min(neg))


def test_bench_audit_times_a_labelled_synthetic_index():
    from facefind.retrieval.bench.audit import run_audit_bench

    result = run_audit_bench(n=3000, repeats=1)
    assert result["n"] == 3000 and result["attributes"] == 40 and result["median_s"] > 0
    assert result["largest_gap"]["equalized_odds"] is not None  # the snapshot carried labels


# ------------------------------------- part 1 (label:, split:) through the real CLI, API and similar


@pytest.fixture(scope="module")
def bare_indexes(built, tmp_path_factory):
    """Two small indexes of the same faces: one from a folder with the attribute file but no
    partition file (labels, no splits), one from a folder with neither (no labels)."""
    import shutil

    from facefind.indexer.pipeline import index_folder

    base = tmp_path_factory.mktemp("bare")
    out = {}
    for name, annotate in (("labels_only", True), ("plain", False)):
        folder = base / name / "img_align_celeba"
        folder.mkdir(parents=True)
        for image in built.images[:8]:
            shutil.copy(image, folder / image.name)
        if annotate:
            shutil.copy(built.root / "list_attr_celeba.txt", base / name / "list_attr_celeba.txt")
        index_folder(folder, built.model, base / name / "index", device="cpu", workers=0)
        out[name] = base / name / "index"
    return out


def partition_of(built) -> dict[str, int]:
    return {name: int(s) for name, s in (line.split() for line in
                                          (built.root / "list_eval_partition.txt").read_text().splitlines() if line.strip())}


def test_api_query_label_and_split_literals_match_hand_counts(built, client):
    part = partition_of(built)
    a = "Smiling"
    for expr, keep in [
        (f"label:{a} and not {a}", lambda p: built.labels[p][a] and built.probs[p][a] < built.thresholds[a]),
        (f"{a} and not label:{a} and split:train",
         lambda p: (not built.labels[p][a]) and built.probs[p][a] >= built.thresholds[a] and part[p.rsplit("/", 1)[1]] == 0),
        ("not split:train", lambda p: part[p.rsplit("/", 1)[1]] != 0),
    ]:
        want = sorted(built.ids[p] for p in built.probs if keep(p))
        body = client.get("/api/query", params={"q": expr, "limit": 100, "eval": "false"}).json()
        assert sorted(h["id"] for h in body["hits"]) == want, expr


def test_similar_by_id_filters_by_label(built, client):
    """`similar`'s path (rank by an indexed face) with a label: filter, over the API."""
    a = "Eyeglasses"
    ref = next(iter(built.ids.values()))
    body = client.get("/api/query", params={"q": f"not label:{a}", "like_id": ref, "limit": 100, "eval": "false"}).json()
    assert body["ranking"] == "similarity"
    assert sorted(h["id"] for h in body["hits"]) == sorted(built.ids[p] for p in built.labels if not built.labels[p][a])


def test_label_and_split_errors_over_cli_and_http(bare_indexes):
    from fastapi.testclient import TestClient

    from facefind.retrieval.web.app import create_app

    cases = [(bare_indexes["plain"], "label:Male", "no ground-truth labels"),
             (bare_indexes["labels_only"], "split:val", "partition file")]
    for index, expr, needle in cases:
        out = cli("query", expr, "--index", index)
        assert out.exit_code == 1 and needle in out.output and "Traceback" not in out.output
        out = cli("audit", "--index", index, "--where", expr)
        assert out.exit_code == 1 and needle in out.output
        with TestClient(create_app(index, device="cpu"), base_url="http://127.0.0.1:8000") as c:
            for path, params in (("/api/query", {"q": expr}), ("/api/audit", {"where": expr})):
                resp = c.get(path, params=params)
                assert resp.status_code == 400 and needle in resp.json()["error"], (path, expr)


def test_audit_without_labels_reports_composition_by_prediction(bare_indexes):
    out = cli("audit", "--index", bare_indexes["plain"], "--by", "Male", "--json")
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["checked_against_labels"] is False and report["coverage"]["with_labels"] == 0
    assert report["groups"][0]["source"] == "prediction"
    assert any("nothing was checked against labels" in w for w in report["warnings"])
