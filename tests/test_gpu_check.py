"""scripts/gpu_check.sh: the one-call GPU check, dry-run on the CPU.

The end-to-end test runs every step of ``run --device cpu --small --no-install`` on a tiny synthetic
sample tar (no wheels, no network), with one step made to fail, and reads the report. The other
tests drive the driver's parts directly: packing the sample under a byte budget, a step that
hangs, and bad input.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import ModuleType

import pytest

from facefind.trainer.synth import synthesize

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["install", "env", "bench-index", "bench-train-resnet50", "bench-train-densenet121", "unpack",
         "train-resnet18", "evaluate-val", "agree", "cuda-tests", "ddp", "bench-query"]


def load_driver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def sample_tar(folder: Path, n: int = 48) -> Path:
    """A synthetic CelebA folder packed as prepare packs the real one (celeba/... in a tar.gz)."""
    src = folder / "synth"
    synthesize(src, n=n, seed=3)
    tar_path = folder / "data" / "celeba-sample.tar.gz"
    tar_path.parent.mkdir(parents=True)
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(src, arcname="celeba")
    return tar_path.parent


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_cpu_dry_run_reports_every_step_and_goes_on_after_a_failure(tmp_path: Path) -> None:
    data = sample_tar(tmp_path)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    r = run_script("run", "--device", "cpu", "--small", "--no-install", "--data", str(data), "--out", str(out),
                   "--work", str(tmp_path / "work"), "--fail-step", "ddp")
    wall = time.perf_counter() - t0
    assert r.returncode == 1, r.stdout + r.stderr  # one step failed, so the run says so
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == STEPS
    failed = {name: s["status"] for name, s in steps.items() if s["status"] not in ("ok",)}
    assert failed == {"install": "skipped", "ddp": "failed"}, (failed, r.stdout)
    assert steps["ddp"]["returncode"] == 1
    assert "failure injected" in (out / "ddp.log").read_text()
    assert steps["bench-query"]["status"] == "ok"  # the step after the failure still ran
    for name in STEPS[1:]:
        assert (out / f"{name}.log").is_file()
    # Key figures come from each step's own JSON.
    assert "skipped" in steps["cuda-tests"]["figure"]  # no GPU here: the cuda tests report skips
    assert steps["unpack"]["figure"] == "48 images"
    assert "img/s" in steps["bench-index"]["figure"] and "x same-settings" in steps["bench-index"]["figure"]
    assert steps["bench-train-resnet50"].get("target_met") is None  # targets only judged on CUDA, full size
    agree = json.loads((out / "agree.json").read_text())
    assert agree["within_tolerance"] and agree["max_abs_prob_diff"] == 0.0  # cpu against cpu
    assert agree["val_mean_accuracy"]["cpu"] == json.loads((out / "evaluate-val.json").read_text())["mean_accuracy"]
    # The table is the last thing printed: header, one row per step, then the closing line.
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith("device cpu (small): 11 of 12 steps not failed")
    rows = lines[-1 - len(STEPS):-1]
    assert [row.split()[0] for row in rows] == STEPS
    assert lines[-3 - len(STEPS)].split()[:3] == ["step", "status", "key"]
    assert summary["seconds"] <= wall + 1


def test_steps_runs_what_a_step_needs_and_skips_what_a_failure_blocks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_script("run", "--device", "cpu", "--small", "--no-install", "--data", str(sample_tar(tmp_path, n=8)),
                   "--out", str(out), "--steps", "evaluate-val", "--fail-step", "unpack")
    assert r.returncode == 1, r.stdout + r.stderr
    steps = {s["step"]: s for s in json.loads((out / "summary.json").read_text())["steps"]}
    assert steps["env"]["status"] == "ok" and steps["unpack"]["status"] == "failed"
    assert (steps["train-resnet18"]["status"], steps["train-resnet18"]["figure"]) == ("skipped", "needs unpack")
    assert steps["evaluate-val"]["figure"] == "needs train-resnet18"
    assert {s["figure"] for n, s in steps.items() if n not in ("install", "env", "unpack", "train-resnet18",
                                                                "evaluate-val")} == {"not in --steps"}


def test_sample_tar_fits_the_budget_dropping_train_images_only(tmp_path: Path) -> None:
    driver = load_driver()
    src = tmp_path / "synth"
    synthesize(src, n=40, seed=5)
    split = driver._split_of(src)
    val = {name for name, part in split.items() if part == "1"}
    all_bytes = sum(p.stat().st_size for p in (src / "img_align_celeba").glob("*.jpg"))
    budget = all_bytes * 2 // 3
    info = driver.build_sample_tar(src, tmp_path / "s.tar.gz", budget, quality=75)
    assert info["bytes"] <= budget and info["dropped"] > 0
    with tarfile.open(tmp_path / "s.tar.gz") as tar:
        names = {Path(m.name).name for m in tar.getmembers() if m.name.endswith(".jpg")}
        attr = tar.extractfile("celeba/list_attr_celeba.txt").read().decode().splitlines()
    assert val <= names and len(names) == info["images"] == 40 - info["dropped"]
    assert int(attr[0]) == len(attr) - 2 == len(names)  # the count line matches the rows kept
    assert {row.split()[0] for row in attr[2:]} == names


def test_a_hanging_step_is_killed_at_its_timeout(tmp_path: Path) -> None:
    driver = load_driver()
    step = driver.Step("hang", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 1)
    t0 = time.perf_counter()
    status, code = driver._run_one(step, tmp_path, dict(os.environ), timeout=1.0)
    assert (status, code) == ("timeout", None) and time.perf_counter() - t0 < 10
    log = (tmp_path / "hang.log").read_text()
    assert "started" in log and "timed out after 1 s" in log


def test_bad_input_gets_one_line(tmp_path: Path) -> None:
    r = run_script("run", "--device", "cpu", "--no-install", "--out", str(tmp_path / "o"), "--fail-step", "nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("gpu_check: --fail-step nope: no such step (install, env,")
    r = run_script("prepare", "--sample", str(tmp_path / "missing"), "--wheels", str(tmp_path / "w"),
                   "--data", str(tmp_path / "d"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "pass --sample" in r.stderr
    assert not (tmp_path / "w").exists()  # refused before downloading anything
