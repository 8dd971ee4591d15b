"""Past one machine (issue 12 sections 2-3): torchrun DDP training and sharded indexing, on the CPU.

- Sharding units: batch parts, the file-to-shard hash, and that DDP ranks see exactly the
  (augmented) images a single process would.
- 2 gloo processes under torchrun against one process with the same global batch and seed. The
  tolerance: per-epoch train loss within 0.01 and val mean accuracy within 0.01; val loss within
  0.05. The remaining difference is BatchNorm, which normalises each rank's half batch with that
  half's statistics (SyncBatchNorm needs a GPU); measured here: train loss <= 0.001 apart, val
  loss <= 0.025, val accuracy <= 0.002 (docs/SCALING-distributed.md).
- Two ``--shard K/N`` processes against one catalog (SQLite, and a real PostgreSQL server where
  tests/pg.py provides one), one SIGKILLed mid-run and restarted: every file once, the same
  probabilities as one process to 1e-5, and queries on the previous complete snapshot until
  ``--finalize``. A torchrun index run publishes from rank 0 after a barrier.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from facefind.db.errors import FacefindError
from facefind.trainer import distributed
from facefind.trainer.data import AugmentConfig, training_input

sys.path.insert(0, str(Path(__file__).parent))
from helpers import reap, tiny_checkpoint, tiny_faces  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ATTRS = ["Male", "Smiling", "Eyeglasses", "Young"]
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


def _env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FACEFIND_HOME": str(tmp / "home"), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(*args: str) -> list[str]:
    # --standalone: a private rendezvous on a free port, so parallel test workers never collide.
    return [TORCHRUN, "--standalone", "--nproc_per_node", "2", "--no-python", sys.executable, "-m", "facefind.retrieval.cli",
            *args]


# ------------------------------------------------------------------------------------ units


def test_shard_slices_cover_every_item_once() -> None:
    for n in (0, 1, 7, 32, 33):
        for world in (1, 2, 3, 8):
            parts = [distributed.shard_slice(n, r, world) for r in range(world)]
            covered = [i for p in parts for i in range(n)[p]]
            assert covered == list(range(n))
            sizes = [len(range(n)[p]) for p in parts]
            assert max(sizes) - min(sizes) <= 1


def test_file_shards_are_stable_balanced_and_independent_of_python_hash(tmp_path: Path) -> None:
    names = [f"sub/{i:06d}.jpg" for i in range(4000)]
    here = [distributed.shard_of(p, 4) for p in names]
    counts = np.bincount(here, minlength=4)
    assert counts.min() > 900, counts  # 1000 each, give or take
    # Another interpreter with another hash seed assigns every file the same shard.
    code = ("import sys, json; from facefind.trainer.distributed import shard_of; "
            "print(json.dumps([shard_of(l.strip(), 4) for l in sys.stdin]))")
    out = subprocess.run([sys.executable, "-c", code], input="\n".join(names), capture_output=True, text=True,
                         env={**_env(tmp_path), "PYTHONHASHSEED": "12345"}, cwd=ROOT, check=True)
    assert json.loads(out.stdout) == here
    assert distributed.shard_of("sub/000001.jpg", 1) == 0


def test_shard_option_errors_are_one_line() -> None:
    assert distributed.parse_shard(" 1/4 ") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(FacefindError, match="K/N|0..N-1"):
            distributed.parse_shard(bad)


def test_ranks_see_exactly_the_images_one_process_augments() -> None:
    """Each rank's part of a global batch gets the augmentation one process gives those rows."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    whole = training_input(images, mean, std, torch.Generator().manual_seed(7), AugmentConfig())
    parts = []
    for rank in range(3):
        rows = distributed.shard_slice(len(images), rank, 3)
        parts.append(training_input(images[rows], mean, std, torch.Generator().manual_seed(7), AugmentConfig(),
                                    part=(rows.start, len(images))))
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-6)
    other = training_input(images[5:], mean, std, torch.Generator().manual_seed(7), AugmentConfig())
    assert not torch.allclose(other, whole[5:])  # without ``part`` a half batch draws other parameters


# ------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_two_gloo_processes_train_like_one(tmp_path: Path) -> None:
    """torchrun --nproc_per_node 2 (gloo) against one process, same global batch 32 and seed."""
    from facefind.trainer.fit import FitConfig, fit
    from facefind.trainer.synth import synthesize

    data = tmp_path / "synth"
    synthesize(data, n=320, seed=4)
    common = dict(arch="small_cnn", img_size=32, epochs=3, batch_size=32, lr=3e-3, dropout=0.0,
                  embedding_dim=32, seed=0)
    single = fit(FitConfig(data=data, out=tmp_path / "one" / "m.pt", device="cpu", workers=1,
                           cache_dir=tmp_path / "cache", **common))
    args = ["train", str(data), "--out", str(tmp_path / "two" / "m.pt"), "--device", "cpu", "--workers", "1",
            "--cache-dir", str(tmp_path / "cache"), "--json", "--arch", "small_cnn", "--img-size", "32",
            "--epochs", "3", "--batch-size", "32", "--lr", "3e-3", "--dropout", "0", "--embedding-dim", "32",
            "--seed", "0"]
    proc = subprocess.run(_torchrun(*args), capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)  # one rank prints
    assert printed["epochs"] == 3
    two = json.loads((tmp_path / "two" / "m.history.json").read_text())["epochs"]
    one = single.history
    assert not (tmp_path / "two" / "m.state.pt").exists()
    # Both learned: the loss fell, and val beats always predicting the training majority.
    assert one[-1]["train_loss"] < one[0]["train_loss"] - 0.05
    for val, base in ((single.val.summary(), single.baseline_val.summary()),
                      (printed["val"], printed["val_majority_baseline"])):
        assert val["mean_accuracy"] > base["mean_accuracy"] + 0.02, (val, base)
        assert val["macro_f1"] > base["macro_f1"] + 0.05, (val, base)
    for a, b in zip(one, two, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 0.01, (a["train_loss"], b["train_loss"])
        assert abs(a["val_loss"] - b["val_loss"]) <= 0.05, (a["val_loss"], b["val_loss"])
        assert abs(a["val"]["mean_accuracy"] - b["val"]["mean_accuracy"]) <= 0.01
    assert abs(printed["val"]["mean_accuracy"] - single.val.summary()["mean_accuracy"]) <= 0.01


# ------------------------------------------------------------------------------------ indexing


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", ATTRS, size=32, dim=16)


def _cli(*args: str | Path) -> None:
    from typer.testing import CliRunner

    from facefind.retrieval.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def _predictions(idx: Path) -> dict[str, np.ndarray]:
    """{path: probabilities} from the catalog; each path must be there once."""
    from facefind.db.catalog import Catalog

    with Catalog.open(idx, create=False) as catalog:
        info = catalog.info()
        _, preds = catalog.export(catalog.latest_model(require_predictions=True).id)
    assert info["images"] == info["predictions"] == len(preds.paths) == len(set(preds.paths))
    return dict(zip(preds.paths, np.asarray(preds.probs)))


def _published(idx: Path) -> set[str]:
    """The paths a query sees now (the live snapshot, opened as `facefind query` opens it)."""
    from facefind.retrieval.index import open_index

    opened = open_index(idx)
    try:
        return set(opened.engine.snapshot.paths)
    finally:
        opened.close()


def _count(idx: Path) -> int:
    from facefind.db.catalog import Catalog

    try:
        with Catalog.open(idx, create=False) as catalog:
            return int(catalog.info()["predictions"])
    except FacefindError:
        return 0


@pytest.fixture(params=["sqlite", "postgresql"])
def shard_catalog(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The catalog the shards share: the index folder's SQLite file, or a fresh PostgreSQL database
    (``FACEFIND_DB``, inherited by the shard processes) from tests/pg.py's ``pg_url`` fixture."""
    monkeypatch.delenv("FACEFIND_DB", raising=False)
    if request.param == "sqlite":
        return "sqlite"
    try:
        url = request.getfixturevalue("pg_url")
    except pytest.FixtureLookupError:
        pytest.skip("this tree has no PostgreSQL test server yet (the pg_url fixture of tests/pg.py)")
    monkeypatch.setenv("FACEFIND_DB", url)
    return "postgresql"


# facefind, with each committed batch followed by a pause: under load the poll below (a catalog
# open per look) could otherwise see the shard's 16th file only after it had committed them all.
_SLOW_WRITER = (
    "import runpy, sys, time\n"
    "from facefind.indexer import writer\n"
    "commit = writer.CatalogWriter._commit\n"
    "def slow(self, job):\n"
    "    commit(self, job)\n"
    "    time.sleep(0.4)\n"
    "writer.CatalogWriter._commit = slow\n"
    "sys.argv = ['facefind', *sys.argv[1:]]\n"
    "runpy.run_module('facefind.retrieval.cli', run_name='__main__')\n"
)


@pytest.mark.slow
def test_shards_with_a_killed_one_index_every_file_once_like_one_process(
    model: Path, shard_catalog: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "faces"
    early = tiny_faces(folder, 40, seed=11, prefix="a")
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    common = ("--device", "cpu", "--workers", "0")
    _cli("index", folder, "--index", sharded, "--model", model, *common)  # a complete generation first
    previous = {str(p) for p in early}
    assert _published(sharded) == previous
    tiny_faces(folder, 200, seed=12, prefix="b")
    with monkeypatch.context() as plain:  # the reference: one process, its own SQLite catalog
        plain.delenv("FACEFIND_DB", raising=False)
        _cli("index", folder, "--index", single, "--model", model, *common)
        reference = _predictions(single)
    assert len(reference) == 240

    # Shard 1 of 2 starts, commits some batches and is killed.
    log = tmp_path / "shard1.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SLOW_WRITER, "index", str(folder), "--index", str(sharded), "--shard", "1/2",
             "--batch-size", "8", *common],
            cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and _count(sharded) < 40 + 16:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert reap(proc) == -signal.SIGKILL, log.read_text()
    assert 40 < _count(sharded) < 240
    assert _published(sharded) == previous  # a query sees the last complete generation

    _cli("index", folder, "--index", sharded, "--shard", "0/2", *common)
    assert _published(sharded) == previous
    from typer.testing import CliRunner

    from facefind.retrieval.cli import app

    early_finalize = CliRunner().invoke(app, ["index", str(folder), "--index", str(sharded), "--finalize"])
    assert early_finalize.exit_code == 1
    assert "not indexed yet (shard 1/2)" in early_finalize.output
    assert len(early_finalize.output.strip().splitlines()) == 1
    assert _published(sharded) == previous

    _cli("index", folder, "--index", sharded, "--shard", "1/2", *common)  # the restart
    assert _published(sharded) == previous
    _cli("index", folder, "--index", sharded, "--finalize")
    got = _predictions(sharded)
    assert sorted(got) == sorted(reference)
    assert max(float(np.abs(got[p] - reference[p]).max()) for p in reference) <= 1e-5
    assert _published(sharded) == set(reference)


@pytest.mark.slow
def test_torchrun_index_publishes_once_after_every_rank(model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "faces"
    tiny_faces(folder, 120, seed=13)
    single, ranks = tmp_path / "single", tmp_path / "ranks"
    _cli("index", folder, "--index", single, "--model", model, "--device", "cpu", "--workers", "0")
    proc = subprocess.run(
        _torchrun("index", str(folder), "--index", str(ranks), "--model", str(model), "--device", "cpu",
                  "--workers", "0", "--batch-size", "16", "--json"),
        capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(part) for part in proc.stdout.replace("}\n{", "}\0{").split("\0")]
    assert sorted(r["shard"] for r in reports) == ["0/2", "1/2"]
    assert sum(r["indexed"] for r in reports) == 120
    assert [r["published"] for r in sorted(reports, key=lambda r: r["shard"])] == [True, False]
    want, got = _predictions(single), _predictions(ranks)
    assert sorted(got) == sorted(want)
    assert max(float(np.abs(got[p] - want[p]).max()) for p in want) <= 1e-5
    assert _published(ranks) == set(want)
