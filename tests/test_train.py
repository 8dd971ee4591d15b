"""Training: it learns, thresholds help, resume is exact, the CLI and the tune grid work.

Everything runs on the CPU with one torch thread: on a shared 2-core machine, two OpenMP threads
competing with other processes make small convolutions 10-50x slower.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from facefind.db.errors import ModelError
from facefind.retrieval.cli import app
from facefind.trainer.checkpoint import load_checkpoint, load_model
from facefind.trainer.evaluate import evaluate_checkpoint
from facefind.trainer.fit import FitConfig, FitEvent, fit, history_path, state_path
from facefind.trainer.metrics import majority_baseline

REAL = Path(__file__).resolve().parents[2] / "shared" / "celeba-sample"

pytestmark = pytest.mark.slow


def tiny(data: Path, tmp: Path, **overrides) -> FitConfig:
    """A seconds-long run: 160 images at 32 px."""
    settings = dict(data=data, out=tmp / "m.pt", arch="mobilenet_v3_small", img_size=32, epochs=2, batch_size=16,
                    lr=2e-3, embedding_dim=16, subset=200, device="cpu", seed=3, workers=1,
                    cache_dir=tmp.parent / "cache")
    settings.update(overrides)
    return FitConfig(**settings)


def cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------------------ learning


def test_it_learns_the_rendered_attributes(trained_model, synth_dataset: Path) -> None:
    from facefind.trainer.celeba import load_celeba
    from facefind.trainer.synth import RENDERED

    result = trained_model
    assert result.test is not None  # the synthetic folder has a test split
    names = sorted(RENDERED)
    test = result.test.select(names)
    ds = load_celeba(synth_dataset)
    baseline = majority_baseline(
        ds.labels[ds.indices("test")], ds.labels[ds.indices("train")].mean(0), ds.attributes, "test"
    ).select(names)
    # measured: mean accuracy 0.835 vs 0.797, macro F1 0.23 vs 0.046, on the held-out test split
    assert test.mean_accuracy > baseline.mean_accuracy + 0.02, (test.mean_accuracy, baseline.mean_accuracy)
    assert test.macro_f1 > baseline.macro_f1 + 0.12, (test.macro_f1, baseline.macro_f1)
    assert test.mean_balanced_accuracy > 0.55  # the majority class scores exactly 0.5
    assert result.val.mean_accuracy > result.baseline_val.mean_accuracy + 0.03
    # training reduced the loss
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < losses[0] * 0.85


def _test_outputs(result, synth_dataset: Path):
    """The trained model's outputs on the held-out test split (not where thresholds were chosen)."""
    from facefind.trainer.evaluate import evaluate
    from facefind.trainer.fit import FitConfig, prepare_data

    model, meta = load_model(result.checkpoint)
    data, _ = prepare_data(FitConfig(data=synth_dataset, arch=meta.arch, img_size=meta.img_size, device="cpu",
                                     workers=1, cache_dir=result.cache.parent), torch.device("cpu"))
    return meta, evaluate(model, data, "test"), evaluate(model, data, "val")


def test_calibrated_thresholds_help_on_held_out_rows(trained_model, synth_dataset: Path) -> None:
    # Chosen on val, judged on test: on val they cannot lose to 0.5 by construction, on test they can.
    meta, test, _ = _test_outputs(trained_model, synth_dataset)
    sets = meta.threshold_sets
    at_half = test.metrics(0.5)
    for_accuracy, for_f1 = test.metrics(sets["accuracy"]), test.metrics(sets["f1"])
    # measured on test: mean accuracy 0.832 at the accuracy set vs 0.836 at 0.5 (200 val rows do not
    # buy accuracy back, but cost little); macro F1 0.427 at the F1 set vs 0.266 (accuracy set) and
    # 0.233 (0.5); macro recall 0.618 vs 0.273
    assert for_accuracy.mean_accuracy >= at_half.mean_accuracy - 0.01, (for_accuracy.mean_accuracy,
                                                                        at_half.mean_accuracy)
    assert for_accuracy.macro_f1 >= at_half.macro_f1, (for_accuracy.macro_f1, at_half.macro_f1)
    assert for_f1.macro_f1 > at_half.macro_f1 + 0.1, (for_f1.macro_f1, at_half.macro_f1)
    assert for_f1.macro_f1 > for_accuracy.macro_f1 + 0.08, (for_f1.macro_f1, for_accuracy.macro_f1)
    assert for_f1.macro_recall > for_accuracy.macro_recall + 0.2, (for_f1.macro_recall, for_accuracy.macro_recall)
    assert np.asarray(meta.thresholds).shape == (40,) and np.any(np.asarray(meta.thresholds) != 0.5)


def test_both_threshold_sets_round_trip_through_the_checkpoint(trained_model, synth_dataset: Path) -> None:
    meta, _, val = _test_outputs(trained_model, synth_dataset)
    # Recomputed from the best epoch's val outputs, they are the sets the checkpoint stores.
    assert set(meta.threshold_sets) == {"accuracy", "f1"}
    for name in ("accuracy", "f1"):
        np.testing.assert_allclose(meta.threshold_sets[name], val.calibrate(name), atol=1e-6)
        at_set = val.metrics(meta.threshold_sets[name])
        np.testing.assert_allclose(meta.threshold_stats[name]["recall"], at_set.recall, atol=1e-9)
        np.testing.assert_allclose(meta.threshold_stats[name]["precision"], at_set.precision, atol=1e-9)
    assert meta.thresholds == meta.threshold_sets["accuracy"]  # --threshold-metric accuracy (the default)
    assert meta.query_set() == "f1"
    # F1 thresholds sit lower than accuracy's on rare attributes: that is what lets queries find them
    rare = np.asarray(meta.train_positive_rate) < 0.1
    assert np.mean(np.asarray(meta.threshold_sets["f1"])[rare]) < np.mean(np.asarray(meta.thresholds)[rare])


def test_a_rare_attributes_bare_name_query_finds_most_of_it(trained_model, synth_dataset: Path) -> None:
    from types import SimpleNamespace

    from facefind.db.snapshot import Snapshot, model_threshold_sets
    from facefind.indexer.pipeline import _model_meta
    from facefind.retrieval.engine import Engine

    meta, test, _ = _test_outputs(trained_model, synth_dataset)
    j = meta.attributes.index("Mustache")
    assert meta.train_positive_rate[j] < 0.05  # rare: 3% of the synthetic training faces
    # the sets travel checkpoint -> catalog meta -> snapshot as the indexer stores them
    record = SimpleNamespace(meta=_model_meta(meta), thresholds=meta.thresholds)
    default, sets, stats = model_threshold_sets(record)
    n = test.n_images
    engine = Engine(Snapshot(model_id=1, stamp=0, attributes=meta.attributes,
                             thresholds=np.asarray(sets[default], np.float32), ids=np.arange(n),
                             probs=np.ascontiguousarray(test.probs.T, dtype=np.float32),
                             emb=np.ones((n, 2), np.float16), paths=[str(i) for i in range(n)],
                             threshold_set=default, threshold_sets=sets, threshold_stats=stats))
    truth = set(np.flatnonzero(test.labels[:, j]).tolist())
    recall = {}
    for name in (None, "accuracy"):
        result = engine.query("Mustache", limit=n, thresholds=name)
        found = {h.id for h in result.hits}
        recall[result.thresholds] = len(found & truth) / len(truth)
    # measured on the held-out test split: 7 of its 7 mustaches at the default (f1) set, in 31 hits;
    # none at the accuracy set, which returns 1 face
    assert len(truth) >= 5 and recall["f1"] >= 0.7, recall
    assert recall["f1"] > recall["accuracy"] + 0.5, recall


def test_an_old_one_set_checkpoint_loads_and_falls_back(trained_model, tmp_path: Path, caplog) -> None:
    from facefind.indexer.pipeline import _model_meta

    payload = load_checkpoint(trained_model.checkpoint)
    for key in ("threshold_sets", "threshold_stats"):  # what a checkpoint written before both were kept lacks
        del payload["meta"][key]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    _, meta = load_model(old)
    assert meta.all_threshold_sets() == {"accuracy": meta.thresholds} and meta.query_set() == "accuracy"
    # its val figures still come from the metrics it recorded at those thresholds
    per = payload["meta"]["val_metrics"]["per_attribute"]
    assert meta.all_threshold_stats()["accuracy"]["recall"] == [per[a]["recall"] for a in meta.attributes]
    with caplog.at_level("WARNING"):
        recorded = _model_meta(meta)
    assert recorded["threshold_set"] == "accuracy"
    assert sum("only accuracy thresholds" in r.getMessage() for r in caplog.records) == 1


def test_outputs_beside_the_checkpoint(trained_model) -> None:
    result = trained_model
    payload = load_checkpoint(result.checkpoint)
    meta = payload["meta"]
    assert meta["arch"] == "mobilenet_v3_small" and meta["img_size"] == (64, 64)
    assert len(meta["attributes"]) == 40 and meta["attributes"][0] == "5_o_Clock_Shadow"
    assert meta["train_args"]["lr"] == 3e-3 and meta["train_args"]["epochs"] == 6
    assert len(meta["history"]) == 6 and meta["best_epoch"] == result.best_epoch
    assert meta["val_metrics"]["split"] == "val" and meta["test_metrics"]["split"] == "test"
    assert set(meta["versions"]) >= {"torch", "torchvision", "facefind"}
    assert "optimizer" not in payload  # the deployable file carries no training state
    history = json.loads(history_path(result.checkpoint).read_text())
    assert [r["epoch"] for r in history["epochs"]] == [1, 2, 3, 4, 5, 6]
    assert history["best_epoch"] == result.best_epoch
    assert not state_path(result.checkpoint).exists()


# -------------------------------------------------------------------------------------------- resume


def test_resume_continues_exactly(synth_dataset: Path, tmp_path: Path) -> None:
    straight = fit(tiny(synth_dataset, tmp_path / "a", epochs=3))

    class Stop(KeyboardInterrupt):
        pass

    def stop_after_first(event: FitEvent) -> None:
        if event.kind == "epoch_end" and event.epoch == 1:
            raise Stop

    config = tiny(synth_dataset, tmp_path / "b", epochs=3)
    with pytest.raises(Stop):
        fit(config, progress=stop_after_first)
    state = load_checkpoint(state_path(config.out))
    assert state["extra"]["epoch"] == 1 and "optimizer" in state and "scheduler" in state

    epochs = []
    # settings other than the runtime ones come from the saved state, whatever is passed now
    resumed = fit(tiny(synth_dataset, tmp_path / "b", epochs=3, lr=0.5, resume=True),
                  progress=lambda e: epochs.append(e.epoch) if e.kind == "epoch" else None)
    assert epochs == [2, 3]
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    assert resumed.best_epoch == straight.best_epoch
    a, b = load_checkpoint(straight.checkpoint)["model"], load_checkpoint(resumed.checkpoint)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not state_path(config.out).exists()


def test_resume_without_state_is_a_clear_error(synth_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no interrupted run"):
        fit(tiny(synth_dataset, tmp_path / "c", resume=True))


# ----------------------------------------------------------------------------------------------- CLI


def test_train_cli_json(synth_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.pt"
    result = cli("train", synth_dataset, "--arch", "mobilenet_v3_small", "--img-size", "32", "--epochs", "1",
                 "--batch-size", "16", "--subset", "120", "--embedding-dim", "16", "--device", "cpu",
                 "--workers", "1", "--cache-dir", tmp_path / "cache", "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["checkpoint"] == str(out) and out.is_file()
    assert summary["best_epoch"] == 1 and summary["device"].startswith("cpu")
    assert set(summary["val"]) >= {"mean_accuracy", "macro_f1", "micro_f1"}
    assert summary["val_majority_baseline"]["mean_accuracy"] > 0.5
    assert load_model(out)[1].embedding_dim == 16


@pytest.mark.parametrize(
    "args,expected",
    [
        (["train", "{tmp}/nowhere"], "no such folder"),
        (["train", "{data}", "--arch", "vgg11", "--device", "cpu"], "choose one of"),
        (["train", "{data}", "--arch", "inception_v3", "--img-size", "64", "--device", "cpu"], "at least 75x75"),
        (["train", "{data}", "--class-weights", "sometimes"], "--class-weights"),
        (["train", "{data}", "--img-size", "huge"], "bad image size"),
        (["train", "{data}", "--resume", "--out", "{tmp}/none.pt"], "no interrupted run"),
        (["evaluate", "{tmp}/none.pt", "{data}"], "no checkpoint at"),
    ],
)
def test_train_cli_errors_are_one_line(args, expected, synth_dataset: Path, tmp_path: Path) -> None:
    argv = [a.format(tmp=tmp_path, data=synth_dataset) for a in args]
    result = cli(*argv, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 1, result.stdout
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_says_so(synth_dataset: Path, tmp_path: Path) -> None:
    result = cli("train", synth_dataset, "--device", "cuda", "--out", tmp_path / "x.pt")
    assert result.exit_code == 1 and "no CUDA GPU" in result.stderr


# ---------------------------------------------------------------------------------------------- tune


def test_tune_two_point_grid_keeps_the_best_and_reuses_finished_runs(synth_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid"
    args = ["tune", synth_dataset, "--lr", "0.02,0.002", "--dropout", "0.3", "--arch", "mobilenet_v3_small",
            "--embedding-dim", "16", "--batch-size", "16", "--epochs", "1", "--img-size", "32", "--subset", "120",
            "--device", "cpu", "--workers", "1", "--cache-dir", tmp_path / "cache", "--out", out, "--json"]
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    scores = {r["name"]: r["val"]["mean_accuracy"] for r in summary["runs"]}
    assert set(scores) == {"lr0.02", "lr0.002"}
    assert summary["best"] == max(scores, key=scores.get)
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt"]  # the others were dropped
    assert load_model(out / "best.pt")[1].train_args["lr"] == float(summary["best"][2:])
    rows = (out / "tune.csv").read_text().splitlines()
    assert rows[0].startswith("run,lr,status") and len(rows) == 3
    stamp = (out / "best.pt").stat().st_mtime_ns

    again = cli(*args[:-1])  # table output; nothing left to train
    assert again.exit_code == 0, again.stderr
    assert "2 run(s) were already finished" in again.stdout and summary["best"] in again.stdout
    assert (out / "best.pt").stat().st_mtime_ns == stamp


def test_interrupted_grid_resumes_the_unfinished_run(synth_dataset: Path, tmp_path: Path) -> None:
    from facefind.trainer.tune import TuneEvent, tune

    base = tiny(synth_dataset, tmp_path / "t", subset=120)
    grid = {"dropout": [0.2, 0.4]}

    def interrupt(event: TuneEvent) -> None:
        if event.run == 2 and event.fit is not None and event.fit.kind == "epoch_end" and event.fit.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(base, grid, tmp_path / "grid", progress=interrupt)
    assert state_path(tmp_path / "grid" / "dropout0.4.pt").exists()
    started = []
    result = tune(base, grid, tmp_path / "grid",
                  progress=lambda e: started.append(e.fit.epoch) if e.fit and e.fit.kind == "epoch" else None)
    assert result.resumed == 1 and started == [2]
    assert all(r.status == "done" for r in result.runs) and result.checkpoint.is_file()
    with pytest.raises(ModelError, match="different tuning grid"):
        tune(base, {"dropout": [0.1, 0.5]}, tmp_path / "grid")


# ---------------------------------------------------------------------------------------- real faces


@pytest.mark.celeba
@pytest.mark.skipif(not REAL.is_dir(), reason="the real CelebA sample is not at ../shared/celeba-sample")
def test_real_sample_without_test_images(tmp_path: Path) -> None:
    result = fit(tiny(REAL, tmp_path / "r", epochs=1, subset=300))
    assert result.test is None and result.val.n_images > 0
    report = evaluate_checkpoint(result.checkpoint, REAL, device="cpu", cache_dir=tmp_path / "cache",
                                 workers=1)
    assert report.metrics.split == "val" and "no test images" in report.note
    assert report.metrics.n_images == 780  # every val image of the sample


# --------------------------------------------------------------------------------------------- bench


def test_train_bench_reports_facefind_beside_both_baselines() -> None:
    from facefind.retrieval.bench.train import run_train_bench

    result = run_train_bench(arch="mobilenet_v3_small", n=80, img_size=32, batch_size=8, steps=2, warmup=1,
                             device="cpu", workers=0, repeats=2)
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["facefind", "same_settings", "study_style"]
    for row in rows.values():  # two rounds each, reported as their median
        assert row["steps"] == 2 and len(row["runs"]) == 2 and min(row["runs"]) > 0
        assert row["images_per_s"] == pytest.approx(np.median(row["runs"]), abs=0.1)
    same, study = result["baselines"]["same_settings"], result["baselines"]["study_style"]
    # The same-settings row differs from facefind in the input pipeline only.
    differs = {k for k in rows["facefind"] if rows["facefind"][k] != same[k]}
    assert differs <= {"name", "pipeline", "images_per_s", "epoch_seconds", "runs"}, differs
    assert (study["batch_size"], study["precision"], study["sync"]) == (64, "fp32", "every step")
    # The headline is the ratio over the same-settings row, and each baseline carries its own: both
    # recomputed from the raw rounds (not from the report's own rates, which would check nothing).
    ours = np.median(rows["facefind"]["runs"])
    assert result["speedup"] == pytest.approx(ours / np.median(rows["same_settings"]["runs"]), rel=0.02)
    assert study["speedup"] == pytest.approx(ours / np.median(rows["study_style"]["runs"]), rel=0.02)
