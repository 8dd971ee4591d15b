"""The query path's shortcut to a current snapshot, without SQLAlchemy, and the PUBLISHED record.

Importing SQLAlchemy costs ``facefind query`` more than the query itself: this module reads an
SQLite catalog with the stdlib's sqlite3, by the names in facefind.db.names, and trusts a server
catalog's snapshots when ``<index>/PUBLISHED`` says they were published from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

from facefind.db import names
from facefind.db.errors import CatalogError
from facefind.db.files import atomic_write_json
from facefind.db.paths import CATALOG_FILE
from facefind.db.snapshot.format import CURRENT, FORMAT, PUBLISHED, Snapshot, matches, model_dir
from facefind.db.snapshot.read import load_current, with_checkpoint

log = logging.getLogger(__name__)

# What the shortcut reads, in one transaction: the catalog id, and the newest model with predictions
# (its generation is the stamp the snapshot must have).
_CATALOG_ID_SQL = f"SELECT {names.META_VALUE} FROM {names.META} WHERE {names.META_KEY} = ?"
_NEWEST_MODEL_SQL = (
    f"SELECT m.{names.MODEL_ID}, m.{names.MODEL_SHA256}, m.{names.MODEL_GENERATION}, m.{names.MODEL_CHECKPOINT} "
    f"FROM {names.MODELS} AS m WHERE EXISTS (SELECT 1 FROM {names.PREDICTIONS} AS p "
    f"WHERE p.{names.PREDICTION_MODEL} = m.{names.MODEL_ID}) ORDER BY m.{names.MODEL_ID} DESC LIMIT 1"
)


def current_snapshot_fast(index_dir: str | os.PathLike[str]) -> Snapshot | None:
    """The newest model's snapshot when it can be served without SQLAlchemy; else None.

    The query path's shortcut: importing SQLAlchemy costs ~0.3-0.8 s of a ~1 s command (psycopg
    another 0.4 s). Returns None (the caller then takes the full ``sync_snapshot`` route) whenever
    anything is unusual. Two cases:

    - The index folder's SQLite catalog: the snapshot is served when provably current, checked
      with the stdlib's sqlite3 (two tiny reads): not behind the catalog, same catalog id.
    - A server catalog (``FACEFIND_DB`` set to a non-SQLite URL): the database is not contacted.
      Queries read the *published* snapshot, the one the last index run (or ``check --repair``)
      wrote, as long as ``PUBLISHED`` records that it was published from this very URL. After an
      index run was killed the catalog can be ahead of it; ``facefind check`` reports that as
      ``snapshot_stale`` and ``--repair`` or the next run publishes again. This is what lets
      several machines share one database while queries stay as fast as with SQLite.
    """
    url = os.environ.get("FACEFIND_DB")
    if url and not url.startswith("sqlite"):
        return _published_snapshot(Path(index_dir), url)
    path = Path(index_dir) / CATALOG_FILE
    if url or not path.is_file():
        return None
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return None
    try:
        with conn:  # one read transaction: both reads see the same catalog state
            conn.execute("BEGIN")
            catalog_id = conn.execute(_CATALOG_ID_SQL, (names.CATALOG_ID,)).fetchone()
            model = conn.execute(_NEWEST_MODEL_SQL).fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    if catalog_id is None or model is None:
        return None
    model_id, sha256, stamp, checkpoint = model
    try:
        snap, manifest = load_current(model_dir(index_dir, model_id))
    except CatalogError:
        return None
    return with_checkpoint(snap, checkpoint) if matches(manifest, catalog_id[0], sha256, stamp) else None



def _url_key(url: str) -> str:
    """What ``PUBLISHED`` records of a catalog URL: a hash, so that no password lands on disk."""
    return hashlib.sha256(url.encode()).hexdigest()


def record_published(index_dir: Path, catalog: Any) -> None:
    """Note in ``<index>/PUBLISHED`` which server catalog (URL hash, catalog id) the snapshots
    of this folder come from, for ``current_snapshot_fast``. Nothing for SQLite catalogs."""
    url = getattr(catalog, "url", "")
    if not url or url.startswith("sqlite"):
        return
    record = {"url_sha256": _url_key(url), "catalog_id": catalog.catalog_id}
    path = Path(index_dir) / PUBLISHED
    try:
        if json.loads(path.read_text(encoding="utf-8")) == record:
            return
    except (OSError, ValueError):
        pass
    try:
        atomic_write_json(path, record, indent=None)
    except OSError as err:  # a read-only index: queries then take the full route
        log.debug("cannot record %s: %s", path, err)


def _published_snapshot(index_dir: Path, url: str) -> Snapshot | None:
    """The newest model's live snapshot, if ``PUBLISHED`` says it came from the catalog at ``url``."""
    try:
        record = json.loads((index_dir / PUBLISHED).read_text(encoding="utf-8"))
        if record.get("url_sha256") != _url_key(url):
            return None
        model_ids = sorted((int(p.name[6:]) for p in index_dir.glob("model-*")
                            if p.name[6:].isdigit() and (p / CURRENT).exists()), reverse=True)
    except (OSError, ValueError, AttributeError):
        return None
    if not model_ids:
        return None
    try:
        snap, manifest = load_current(model_dir(index_dir, model_ids[0]))
    except CatalogError:
        return None
    ok = manifest.get("catalog_id") == record.get("catalog_id") and manifest.get("format") == FORMAT
    return snap if ok else None
