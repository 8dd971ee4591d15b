"""Memory-mappable sidecar files: the query engine's read-only view of one model's predictions.

The catalog is the source of truth; a snapshot is derived from it and can always be rebuilt. One
folder per model under the index folder, one immutable generation per write (the layout and the
types: ``format``).

Readers open CURRENT once and then only immutable files, so a reader never sees a half-written
generation while an indexer writes the next one. A writer builds the generation in a hidden
staging folder, fsyncs every file, renames the folder into place, then replaces CURRENT (temp
file + fsync + rename), and finally deletes generations older than the previous one. A crash at
any point leaves the previous snapshot live; the leftover staging folder is removed next time.

Snapshots are identified by the catalog's ``catalog_id``, the model's sha256 and its prediction
``stamp`` (``Catalog.stamp``): ``sync_snapshot`` rebuilds whenever any of them differs.

    format   names of the files, ``Snapshot``, ``PathList``, the stored form of optional arrays
    lock     the model folder's writer lock
    write    ``write_snapshot``: stage, rename into place, move CURRENT, collect old generations
    read     ``load_snapshot``: open the live generation, memory-mapped
    sync     ``sync_snapshot``: the live snapshot when current, else rebuilt from the catalog
    fast     ``current_snapshot_fast``: the query path's check without SQLAlchemy; PUBLISHED
"""

from __future__ import annotations

from facefind.db.snapshot.fast import current_snapshot_fast, record_published
from facefind.db.snapshot.format import (
    APPROX,
    CURRENT,
    FORMAT,
    MANIFEST,
    PUBLISHED,
    SPLITS,
    VECTORS,
    PathList,
    Snapshot,
    current_name,
    entry_fields,
    model_dir,
    model_threshold_sets,
)
from facefind.db.snapshot.lock import writer_lock
from facefind.db.snapshot.read import folder_bytes, load_current, load_snapshot, snapshot_info
from facefind.db.snapshot.sync import resolve_model_id, sync_snapshot
from facefind.db.snapshot.write import write_snapshot

__all__ = [
    "APPROX", "CURRENT", "FORMAT", "MANIFEST", "PUBLISHED", "SPLITS", "VECTORS", "PathList", "Snapshot",
    "current_name", "current_snapshot_fast", "entry_fields", "folder_bytes", "load_current", "load_snapshot",
    "model_dir", "model_threshold_sets", "record_published", "resolve_model_id", "snapshot_info",
    "sync_snapshot", "write_snapshot", "writer_lock",
]
