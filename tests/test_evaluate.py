"""Metrics, threshold calibration, and the `evaluate` command (JSON schema, table, --compare)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from facefind.retrieval.cli import app
from facefind.trainer.metrics import (
    average_precision,
    calibrate_thresholds,
    compute_metrics,
    majority_baseline,
)

PER_ATTRIBUTE = {"accuracy", "precision", "recall", "f1", "balanced_accuracy", "average_precision", "support",
                 "threshold"}
TOP_LEVEL = {"split", "n_images", "mean_accuracy", "macro_f1", "micro_precision", "micro_recall", "micro_f1",
             "mean_balanced_accuracy", "per_attribute"}


def cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------------------- metrics


def test_metrics_by_hand() -> None:
    labels = np.array([[1, 0], [1, 0], [0, 0], [0, 1]])
    probs = np.array([[0.9, 0.2], [0.4, 0.1], [0.6, 0.3], [0.1, 0.8]])
    m = compute_metrics(labels, probs, 0.5, ["a", "b"], "val")
    # a: tp 1 (0.9), fn 1 (0.4), fp 1 (0.6), tn 1; b: perfect
    assert list(m.accuracy) == [0.5, 1.0]
    assert list(m.precision) == [0.5, 1.0] and list(m.recall) == [0.5, 1.0] and list(m.f1) == [0.5, 1.0]
    assert list(m.balanced_accuracy) == [0.5, 1.0] and list(m.support) == [2, 1]
    assert m.micro_precision == pytest.approx(2 / 3) and m.micro_recall == pytest.approx(2 / 3)
    assert m.mean_accuracy == 0.75 and m.macro_f1 == 0.75
    assert m.average_precision[0] == pytest.approx((1 + 2 / 3) / 2)  # ranks: +, -, +
    # per-attribute thresholds apply column by column: 0.35 turns a's 0.4 into a positive
    m2 = compute_metrics(labels, probs, [0.35, 0.5])
    assert m2.recall[0] == 1.0 and m2.thresholds.tolist() == [0.35, 0.5]


def test_degenerate_columns_stay_defined() -> None:
    labels = np.zeros((4, 1), dtype=np.uint8)
    m = compute_metrics(labels, np.full((4, 1), 0.2))
    assert m.accuracy[0] == 1.0 and m.precision[0] == 0.0 and m.f1[0] == 0.0
    assert m.balanced_accuracy[0] == 1.0  # only the negative class exists
    assert np.isnan(m.average_precision[0])
    text = json.dumps(m.to_json(), allow_nan=False)  # NaN becomes null, so the JSON stays valid
    assert '"average_precision": null' in text


def _brute_ap(y: np.ndarray, s: np.ndarray) -> float:
    total, previous = 0.0, 0.0
    for t in np.unique(s)[::-1]:
        pred = s >= t
        tp = (pred & (y == 1)).sum()
        recall = tp / y.sum()
        total += (recall - previous) * tp / pred.sum()
        previous = recall
    return total


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 10)), min_size=1, max_size=40))
def test_average_precision_matches_the_definition(pairs) -> None:
    y = np.array([p[0] for p in pairs], dtype=np.uint8)
    s = np.array([p[1] / 10 for p in pairs])  # coarse scores make ties common
    if y.sum() == 0:
        assert np.isnan(average_precision(y, s))
    else:
        assert average_precision(y, s) == pytest.approx(_brute_ap(y, s))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["accuracy", "f1"]))
def test_calibrated_thresholds_are_never_worse_than_half(seed: int, metric: str) -> None:
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 60)), 3
    labels = (rng.random((n, k)) < rng.random(k)).astype(np.uint8)
    probs = np.clip(labels * rng.random() + rng.random((n, k)) * (1 - rng.random()), 0, 1).astype(np.float32)
    probs[:, 2] = np.round(probs[:, 2], 1)  # ties
    thresholds = calibrate_thresholds(labels, probs, metric)
    tuned = getattr(compute_metrics(labels, probs, thresholds), metric)
    half = getattr(compute_metrics(labels, probs, 0.5), metric)
    assert np.all(tuned >= half - 1e-12)
    # and no threshold does better: the chosen one is optimal over all cuts
    for j in range(k):
        cuts = np.r_[0.0, np.unique(probs[:, j]), 1.01]
        best = max(getattr(compute_metrics(labels[:, [j]], probs[:, [j]], c), metric)[0] for c in cuts)
        assert tuned[j] == pytest.approx(best)


def test_calibration_keeps_half_when_nothing_is_better() -> None:
    labels = np.array([[1], [0], [1], [0]])
    probs = np.array([[0.9], [0.1], [0.8], [0.2]])  # 0.5 is already perfect
    assert calibrate_thresholds(labels, probs).tolist() == [0.5]
    with pytest.raises(ValueError, match="threshold metric"):
        calibrate_thresholds(labels, probs, "auc")


def test_majority_baseline_uses_the_training_rates() -> None:
    labels = np.array([[1, 0], [0, 0], [0, 1], [0, 0]])
    own = majority_baseline(labels)
    assert own.mean_accuracy == 0.75 and own.macro_f1 == 0.0
    flipped = majority_baseline(labels, positive_rate=[0.9, 0.1])  # train said "a" is mostly present
    assert flipped.accuracy.tolist() == [0.25, 0.75] and flipped.recall[0] == 1.0


def test_select_restricts_and_pools_only_the_kept_attributes() -> None:
    labels = np.array([[1, 0, 1], [0, 1, 1]])
    probs = np.array([[0.9, 0.9, 0.1], [0.1, 0.1, 0.1]])
    m = compute_metrics(labels, probs, 0.5, ["a", "b", "c"])
    sub = m.select(["c", "a"])
    assert sub.attributes == ["c", "a"] and sub.accuracy.tolist() == [0.0, 1.0]
    assert sub.micro_recall == pytest.approx(1 / 3) and sub.micro_precision == 1.0


# ------------------------------------------------------------------------------------------ evaluate


def test_evaluate_json_schema_and_agreement_with_training(trained_model, synth_dataset: Path, tmp_path: Path) -> None:
    result = cli("evaluate", trained_model.checkpoint, synth_dataset, "--device", "cpu", "--workers", "1",
                 "--cache-dir", tmp_path / "cache", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert TOP_LEVEL <= set(report)
    assert report["split"] == "test" and report["n_images"] == trained_model.test.n_images
    assert len(report["per_attribute"]) == 40 and "5_o_Clock_Shadow" in report["per_attribute"]
    for row in report["per_attribute"].values():
        assert set(row) == PER_ATTRIBUTE
        assert 0 <= row["accuracy"] <= 1 and isinstance(row["support"], int)
    thresholds = [row["threshold"] for row in report["per_attribute"].values()]
    from facefind.trainer.checkpoint import load_model

    assert thresholds == load_model(trained_model.checkpoint)[1].thresholds
    # the same preprocessing as training: evaluate reproduces fit's own test numbers
    assert report["mean_accuracy"] == pytest.approx(trained_model.test.mean_accuracy, abs=1e-9)
    assert report["macro_f1"] == pytest.approx(trained_model.test.macro_f1, abs=1e-9)
    assert report["majority_baseline"]["mean_accuracy"] < report["mean_accuracy"]
    # every threshold set, and 0.5, in full; the top level is the accuracy set
    meta = load_model(trained_model.checkpoint)[1]
    sets = report["by_thresholds"]
    assert report["thresholds"] == "accuracy" and set(sets) == {"accuracy", "f1", "0.5"}
    assert sets["accuracy"]["per_attribute"] == report["per_attribute"]
    assert [r["threshold"] for r in sets["f1"]["per_attribute"].values()] == meta.threshold_sets["f1"]
    assert {r["threshold"] for r in sets["0.5"]["per_attribute"].values()} == {0.5}
    recall = {name: np.mean([r["recall"] for r in m["per_attribute"].values()]) for name, m in sets.items()}
    assert recall["f1"] > recall["accuracy"], recall  # the F1 set trades precision for recall


def test_evaluate_val_reproduces_the_training_val_numbers(trained_model, synth_dataset: Path, tmp_path: Path) -> None:
    from facefind.trainer.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(trained_model.checkpoint, synth_dataset, "val", device="cpu",
                                 cache_dir=tmp_path / "cache", workers=1)
    assert report.metrics.n_images == trained_model.val.n_images
    assert report.metrics.mean_accuracy == pytest.approx(trained_model.val.mean_accuracy, abs=1e-9)


def test_evaluate_table_shows_the_study_as_theirs(trained_model, synth_dataset: Path, tmp_path: Path) -> None:
    result = cli("evaluate", trained_model.checkpoint, synth_dataset, "--split", "val", "--device", "cpu",
                 "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    header = next(line for line in text.splitlines() if "ResNet50" in line)
    assert "DenseNet121" in header and "(theirs)" in text and "0.8968" in text and "0.7769" in text
    assert "5_o_Clock_Shadow" in text and "Wearing_Necktie" in text  # names are never cut
    assert "majority" in text and "on val" in text
    assert "precision / recall / F1 per threshold set" in text and "accuracy" in text and "f1" in text


def test_compare_shows_models_side_by_side(trained_model, synth_dataset: Path, tmp_path: Path) -> None:
    from facefind.trainer.checkpoint import load_model, save_checkpoint
    from facefind.trainer.model import create_model

    _, meta = load_model(trained_model.checkpoint)
    torch.manual_seed(1)
    untrained = create_model("resnet18", 40, embedding_dim=16).eval()
    meta.arch, meta.embedding_dim, meta.thresholds = "resnet18", 16, [0.5] * 40
    other = save_checkpoint(tmp_path / "untrained.pt", untrained, meta)

    result = cli("evaluate", trained_model.checkpoint, synth_dataset, "--compare", other, "--device", "cpu",
                 "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "(mobilenet_v3_small)" in text and "untrained.pt" in text and "(resnet18)" in text
    summary = next(line for line in text.splitlines() if "macro F1" in line)
    cells = summary.split()[2:]  # "macro F1  <model 1>  <model 2>"
    assert cells[0].endswith("*") and not cells[1].endswith("*")  # the trained model wins

    as_json = cli("evaluate", trained_model.checkpoint, synth_dataset, "--compare", other, "--device", "cpu",
                  "--cache-dir", tmp_path / "cache", "--json")
    reports = json.loads(as_json.stdout)
    assert [Path(r["model"]).name for r in reports] == ["model.pt", "untrained.pt"]
    assert reports[0]["macro_f1"] > reports[1]["macro_f1"]


def test_evaluate_refuses_data_without_the_models_attributes(trained_model, tmp_path: Path) -> None:
    from facefind.trainer.synth import synthesize

    data = tmp_path / "faces"
    synthesize(data, n=12, seed=5)
    attr = data / "list_attr_celeba.txt"
    lines = attr.read_text().split("\n")
    lines[1] = lines[1].replace("Wearing_Hat", "Wearing_Cap")
    attr.write_text("\n".join(lines))
    result = cli("evaluate", trained_model.checkpoint, data, "--device", "cpu", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 1 and "Wearing_Hat" in result.stderr and "Traceback" not in result.stderr
