"""Where facefind keeps its files by default, and the environment variables that move them.

    FACEFIND_HOME   root of everything below (default: ~/.facefind)
    FACEFIND_INDEX  the index folder: catalog.db + vectors + sidecar files (default: $FACEFIND_HOME/index)
    FACEFIND_DB     an SQLAlchemy URL for the catalog instead of <index>/catalog.db
    FACEFIND_CACHE  decoded-image caches used by training (default: $FACEFIND_HOME/cache)
    (models)        trained checkpoints (default: $FACEFIND_HOME/models)

Datasets are never written to: caches and outputs always go to these folders.
"""

from __future__ import annotations

import os
from pathlib import Path

CATALOG_FILE = "catalog.db"  # an index folder's SQLite catalog


def facefind_home() -> Path:
    return Path(os.environ.get("FACEFIND_HOME") or Path.home() / ".facefind").expanduser()


def default_index_dir() -> Path:
    env = os.environ.get("FACEFIND_INDEX")
    return Path(env).expanduser() if env else facefind_home() / "index"


def default_models_dir() -> Path:
    return facefind_home() / "models"


def default_cache_dir() -> Path:
    env = os.environ.get("FACEFIND_CACHE")
    return Path(env).expanduser() if env else facefind_home() / "cache"


def default_db_url(index_dir: Path) -> str:
    """The catalog URL: ``$FACEFIND_DB`` when set, else SQLite at ``<index_dir>/catalog.db``."""
    return os.environ.get("FACEFIND_DB") or f"sqlite:///{Path(index_dir).resolve() / CATALOG_FILE}"


def normalize_path(path: str | os.PathLike[str]) -> str:
    """The catalog's key for a file: absolute, ``~`` expanded, ``..`` folded, symlinks kept.

    Symlinks are not resolved on purpose: the path the user gave is the one shown, and resolving
    a dangling link or a link loop must not fail.
    """
    return os.path.abspath(os.path.expanduser(os.fspath(path)))
