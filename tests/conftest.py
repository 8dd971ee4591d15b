"""Fixtures shared across test files: one synthetic CelebA folder and one tiny trained model per run.

Both are built once per run (seeded), not once per xdist worker: ``built_once`` lets the first
worker that needs an artefact build it into a folder all workers of the run share while the others
wait on a file lock, then read the result. Drawing faces and training are the slowest things the
suite does.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import shutil
from pathlib import Path
from typing import Callable, TypeVar

# The suite runs as 2 xdist workers on 2 cores: one OpenMP thread per worker (and per subprocess,
# which inherit this) avoids oversubscription, which made CPU forward passes up to 100x slower.
# This is the one place that sets it: torch reads it when a test module first imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

SYNTH_N = 2000
TRAIN_EPOCHS = 6


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.cuda`` tests where torch sees no GPU, so a GPU machine runs them as-is."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for item in marked:
        item.add_marker(skip)


SYNTH_SEED = 1

T = TypeVar("T")


def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shared by every xdist worker of this run (the parent of the workers' base temp
    folders), or this process's own base temp folder when the run has no workers."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], T]) -> T:
    """``build(folder)`` once per run, whichever worker asks first; every worker gets its result.

    The builder holds an exclusive ``flock`` on ``name.lock`` while it builds into ``name/`` and
    pickles the result beside it; a worker that asks meanwhile waits on the lock and then unpickles.
    A build that raised leaves no result, so the next worker to ask builds again (and fails the
    same way in its own tests). Results must be read-only for the tests that share them.
    """
    shared = run_folder(tmp_path_factory) / "shared-fixtures"
    shared.mkdir(exist_ok=True)
    folder, result = shared / name, shared / f"{name}.pickle"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if result.exists():
            return pickle.loads(result.read_bytes())
        shutil.rmtree(folder, ignore_errors=True)  # a build that raised half way
        folder.mkdir()
        value = build(folder)
        result.write_bytes(pickle.dumps(value))
        return value


@pytest.fixture(scope="session")
def build_once(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, Callable[[Path], T]], T]:
    """``built_once`` for a test module's own expensive fixture: ``build_once(name, build)``."""
    return lambda name, build: built_once(tmp_path_factory, name, build)


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic CelebA folder (original layout, SYNTH_N faces, seed 1, all three splits)."""

    def build(folder: Path) -> Path:
        from facefind.trainer.synth import synthesize

        synthesize(folder / "synth-faces", n=SYNTH_N, seed=SYNTH_SEED)
        return folder / "synth-faces"

    return built_once(tmp_path_factory, "synth", build)


@pytest.fixture(scope="session")
def trained_model(synth_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """mobilenet_v3_small trained on ``synth_dataset`` at 64 px on the CPU; returns the FitResult.

    The checkpoint is ``result.checkpoint``; its image cache lives beside it, in the run's shared folder.
    """

    def build(work: Path):
        from facefind.trainer.fit import FitConfig, fit

        config = FitConfig(
            data=synth_dataset, out=work / "model.pt", arch="mobilenet_v3_small", img_size=64, epochs=TRAIN_EPOCHS,
            batch_size=32, lr=3e-3, embedding_dim=64, device="cpu", seed=0, workers=2, cache_dir=work / "cache",
        )
        return fit(config)

    return built_once(tmp_path_factory, "trained", build)


# ------------------------------------------------------------------ the web tests' small indexes
# Built once per run (helpers.py builds them) and shared by test_server.py, test_browser.py and
# test_photo_faces.py: tests read them, and copy them before changing anything.


@pytest.fixture(scope="session")
def web_index(tmp_path_factory: pytest.TempPathFactory):
    """40 synthetic faces (seed 5) indexed with a calibrated tiny checkpoint that carries a training
    history and two threshold sets (helpers.build_index); a ``helpers.Built``."""
    from helpers import build_index

    return built_once(tmp_path_factory, "web-index", build_index)


@pytest.fixture(scope="session")
def people_index(web_index, tmp_path_factory: pytest.TempPathFactory):
    """12 of ``web_index``'s faces, face 10 in another photo and a faceless image, indexed with
    identity descriptors (helpers.build_people_index); a ``helpers.People``."""
    from helpers import build_people_index

    return built_once(tmp_path_factory, "people-index", lambda base: build_people_index(base, web_index, same=10))


@pytest.fixture(scope="session")
def photo_index(tmp_path_factory: pytest.TempPathFactory):
    """Composed group photos indexed one entry per face by ``index --detect-faces --identity``
    (helpers.build_photo_index); a ``helpers.PhotoIndex``."""
    from helpers import build_photo_index

    return built_once(tmp_path_factory, "photo-index", build_photo_index)


# ------------------------------------------------------------------------------------ PostgreSQL
# One server per test session (per xdist worker), one fresh database per test. Tests skip only
# where no server can be started (no binaries); CI sets FACEFIND_TEST_REQUIRE_POSTGRES=1 so that
# a missing server fails the run instead.


@pytest.fixture(scope="session")
def pg_server():
    """A running PostgreSQL server (tests/pg.py ``PgServer``): ``pg_server.create_database()``
    returns the SQLAlchemy URL of a new empty database."""
    from pg import PgServer, unavailable

    reason = unavailable()
    if reason is not None:
        if os.environ.get("FACEFIND_TEST_REQUIRE_POSTGRES"):
            pytest.fail(f"FACEFIND_TEST_REQUIRE_POSTGRES is set but {reason}")
        pytest.skip(reason)
    server = PgServer.start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server) -> str:
    """The URL of a fresh, empty PostgreSQL database for this test."""
    return pg_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Run the test once per catalog backend (tests/pg.py ``Backend``): for ``postgresql``,
    FACEFIND_DB names a fresh database (so ``Catalog.open``, the CLI and subprocesses that
    inherit the environment all use it); for ``sqlite`` it is unset."""
    from pg import Backend

    monkeypatch.delenv("FACEFIND_DB", raising=False)
    url = None
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        monkeypatch.setenv("FACEFIND_DB", url)
    backend = Backend(request.param, url)
    yield backend
    backend.close()


# -- a real Chromium for the page tests (tests/test_browser*.py) -----------------------------------


@pytest.fixture(scope="module")
def browser():
    from facefind.retrieval.bench.serve import CHROMIUM_ARGS, chromium_binary

    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium binary (/usr/bin/chromium or chromium on PATH): "
                    "apt-get install -y --no-install-recommends chromium")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[dev]' (never `playwright install`)")
    # expect() waits 5 s by default, the pages' own waits 30 s: on a loaded 2-core machine the held
    # /api/attributes of the autocomplete test took longer than 5 s to reach the list.
    expect.set_options(timeout=30_000)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS)
        yield b
        b.close()
