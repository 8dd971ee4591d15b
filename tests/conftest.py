"""Fixtures shared across test files: one synthetic CelebA folder and one tiny trained model per session.

Both are built once (seeded, in a session temp folder) because drawing faces and training are the
slowest things the suite does.
"""

from __future__ import annotations

import os
from pathlib import Path

# The suite runs as 2 xdist workers on 2 cores: one OpenMP thread per worker (and per subprocess,
# which inherit this) avoids oversubscription, which made CPU forward passes up to 100x slower.
# This is the one place that sets it: torch reads it when a test module first imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

SYNTH_N = 2000


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


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic CelebA folder (original layout, 2,000 faces, seed 1, all three splits)."""
    from facefind.trainer.synth import synthesize

    root = tmp_path_factory.mktemp("synth") / "synth-faces"
    synthesize(root, n=SYNTH_N, seed=SYNTH_SEED)
    return root


@pytest.fixture(scope="session")
def trained_model(synth_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """mobilenet_v3_small trained on ``synth_dataset`` at 64 px on the CPU; returns the FitResult.

    The checkpoint is ``result.checkpoint``; its image cache lives in a session temp folder.
    """

    from facefind.trainer.fit import FitConfig, fit

    work = tmp_path_factory.mktemp("trained")
    config = FitConfig(
        data=synth_dataset, out=work / "model.pt", arch="mobilenet_v3_small", img_size=64, epochs=6,
        batch_size=32, lr=3e-3, embedding_dim=64, device="cpu", seed=0, workers=2, cache_dir=work / "cache",
    )
    return fit(config)


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
