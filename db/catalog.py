"""The catalog: facefind's source of truth, and the small API the indexer, queries and checks use.

``Catalog`` opens one SQLAlchemy URL (SQLite by default, PostgreSQL by URL; transactions in
facefind.db.backend), creates or upgrades its schema (facefind.db.schema), records index runs and
publish holds (facefind.db.runs), and adds what is specific to facefind's data: models, batches of
predictions, faces, labels, identities, failures, and bulk reads for snapshots.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from facefind.db import vectors
from facefind.db.errors import CatalogError
from facefind.db.ids import find_sorted
from facefind.db.paths import default_db_url, normalize_path
from facefind.db.runs import RunLog
from facefind.db.schema import (
    IDENTITY_DIM,
    faces,
    failures_table,
    identities,
    images,
    label_sets,
    labels,
    models,
    open_schema,
    predictions,
    runs,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRecord:
    """A registered checkpoint. ``generation`` changes whenever its predictions change."""

    id: int
    sha256: str
    arch: str
    attributes: list[str]
    thresholds: list[float]
    embedding_dim: int
    checkpoint: str | None
    meta: dict[str, Any]
    created: float
    generation: int

    @property
    def num_attributes(self) -> int:
        return len(self.attributes)


Box = tuple[int, int, int, int]  # x, y, width, height in the decoded image (facefind.indexer.faces.align.Box)


@dataclass
class IndexedImage:
    """One index entry from the indexer, ready for ``Catalog.write_batch``: a file as it is
    (``face`` 0, no ``box``), or face number ``face`` of a photo, found at ``box``.

    A file's faces all travel in one batch (rows with the same path): the batch replaces every
    face the file had. ``labels`` optionally carries the file's ground-truth attributes (any
    integer array where ``> 0`` means present, so both CelebA's -1/1 and 0/1 work), in the order
    of the ``label_names`` given to ``write_batch``.
    """

    path: str
    size: int
    mtime: float
    width: int | None
    height: int | None
    probs: np.ndarray       # float32 (K,)
    embedding: np.ndarray   # float32 (D,)
    labels: np.ndarray | None = None
    split: int | None = None              # with labels: 0 train, 1 val, 2 test (the partition file)
    described: bool = False               # True: identity was looked for (``index --identity``)
    identity: np.ndarray | None = None    # float32 (128,) descriptor; None: no face (or not looked)
    face: int = 0                         # the face's number in its file (0: the largest, or the file)
    box: Box | None = None                # where it is; None: the entry is the whole file


@dataclass(frozen=True)
class FailureRecord:
    path: str
    reason: str
    at: float


class Predictions(NamedTuple):
    """One model's predictions, row ``i`` belonging to face ``ids[i]`` (ascending) of file ``paths[i]``."""

    ids: np.ndarray     # int64 (N,) face ids
    paths: list[str]    # N
    probs: np.ndarray   # float32 (N, K)
    emb: np.ndarray     # float32 (N, D), as stored (not normalised, float16-rounded since schema v4);
                        # float16 normalised: export(stored=True)
    identity: np.ndarray | None = None      # float32 (N, 128) descriptors (zeros where has_identity is False)
    has_identity: np.ndarray | None = None  # bool (N,): which rows have a descriptor
    image_ids: np.ndarray | None = None     # int64 (N,): the file (images.id) of each face
    faces: np.ndarray | None = None         # int32 (N,): the face's number in its file
    boxes: np.ndarray | None = None         # int32 (N, 4) x, y, w, h; -1 where the entry is the whole file
    label_names: list[str] | None = None    # ground truth: the attribute names of ``labels``' rows
    labels: np.ndarray | None = None        # int8 (L, N): 1/0, -1 where the entry carries no such label
    splits: np.ndarray | None = None        # int8 (N,): 0 train, 1 val, 2 test, -1 unknown


def _raw_rows(conn: Connection, statement: Any) -> list[tuple]:
    """Every row of ``statement`` as plain tuples through the DBAPI cursor of ``conn``'s transaction:
    bulk reads of 200k rows skip SQLAlchemy's per-row processing (~0.2 s)."""
    compiled = statement.compile(dialect=conn.dialect)
    params = compiled.construct_params()
    cursor = conn.connection.cursor()
    try:
        cursor.execute(str(compiled), tuple(params[p] for p in compiled.positiontup)
                       if conn.dialect.positional else params)
        return cursor.fetchall()
    finally:
        cursor.close()


UNSTORABLE_REASON = "file name is not valid UTF-8: rename the file to index it"


def _storable(path: str) -> bool:
    """Whether a path can be stored as text (names with undecodable bytes carry surrogates)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _storable_text(path: str) -> str:
    """``path``, with undecodable bytes shown as ``\\xNN`` so that it can be stored and displayed."""
    if _storable(path):
        return path
    return os.fsencode(path).decode("utf-8", "backslashreplace")


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def encode_embeddings(emb: np.ndarray) -> np.ndarray:
    """The float16 rows the catalog stores for embeddings ``emb`` (N, D): the model's output as it
    is (not normalised), rounded. Half the bytes of float32 in every write, WAL, commit and export;
    the snapshot keeps float16 rows anyway. ValueError for a value beyond float16's range
    (|x| > 65504), which would become infinite: no model facefind trains comes near it."""
    e = np.asarray(emb, dtype=np.float32)
    # Two reductions in the usual case; NaN fails both comparisons and takes the exact look.
    if e.size and not (e.max() <= FLOAT16_MAX and e.min() >= -FLOAT16_MAX):
        overflow = np.isfinite(e) & (np.abs(e) > FLOAT16_MAX)
        if overflow.any():
            row, col = np.argwhere(overflow)[0]
            raise ValueError(f"embedding value {e[row, col]:g} (row {row}, dimension {col}) is beyond float16's "
                             f"range (+-{FLOAT16_MAX:g}) that the catalog stores: is the model's output scaled?")
    return e.astype(np.float16)


def decode_embeddings(blobs: Sequence[bytes], d: int, ids: Sequence[int] | None = None) -> np.ndarray:
    """(N, D) embeddings of catalog blobs, told apart by length: float16 (2*D bytes, written since
    schema v4) or float32 (4*D bytes, rows written before). All float16: a float16 view of the
    joined bytes (no conversion); all float32: a float32 view; a mix: float32. CatalogError for any other length
    (a damaged row: ``facefind check`` lists them)."""
    lengths = np.fromiter(map(len, blobs), np.int64, len(blobs))
    if (lengths == 2 * d).all():
        return np.frombuffer(b"".join(blobs), dtype=np.float16).reshape(-1, d)
    if (lengths == 4 * d).all():
        return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(-1, d)
    half = lengths == 2 * d
    bad = np.flatnonzero(~half & (lengths != 4 * d))
    if bad.size:
        where = f"face {ids[bad[0]]}" if ids is not None else f"row {bad[0]}"
        raise CatalogError(f"{bad.size:,} embeddings are damaged ({where}: {lengths[bad[0]]} bytes, neither "
                           f"{2 * d} nor {4 * d} for dimension {d}): run `facefind check`")
    out = np.empty((len(blobs), d), dtype=np.float32)
    out[half] = np.frombuffer(b"".join(b for b, h in zip(blobs, half) if h), dtype=np.float16).reshape(-1, d)
    out[~half] = np.frombuffer(b"".join(b for b, h in zip(blobs, half) if not h), dtype=np.float32).reshape(-1, d)
    return out


def _names_key(names: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(names)).encode()).hexdigest()


class Catalog(RunLog):
    """The catalog behind one SQLAlchemy URL. Safe to share between threads; cheap to open.

    Each method runs in its own transaction. Processes may open the same catalog at once: writers
    wait for each other (up to ``BUSY_TIMEOUT_S``), readers never wait.
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        super().__init__(url, create=create)
        self._dims: dict[int, tuple[int, int]] = {}
        hint = ("if the file is damaged, move it away and re-run `facefind index` to rebuild it"
                if self._is_sqlite else self._hint())
        self._catalog_id = open_schema(self._reader, self._writer, create=create, where=self._where(), hint=hint)

    @classmethod
    def open(cls, index_dir: str | os.PathLike[str], *, create: bool = True) -> "Catalog":
        """Open the catalog of an index folder (``$FACEFIND_DB`` overrides the SQLite file)."""
        return cls(default_db_url(Path(index_dir)), create=create)

    @property
    def catalog_id(self) -> str:
        """A random id fixed when the catalog was created; a recreated catalog gets a new one."""
        return self._catalog_id

    # ----------------------------------------------------------------------------- models

    def register_model(
        self,
        sha256: str,
        arch: str,
        attributes: Sequence[str],
        thresholds: Sequence[float],
        embedding_dim: int,
        checkpoint: str | os.PathLike[str] | None,
        meta: Mapping[str, Any] | None = None,
    ) -> int:
        """Add a checkpoint and return its id; the same sha256 returns the existing id.

        A known checkpoint found at a new path gets that path recorded.
        """
        if len(thresholds) != len(attributes):
            raise ValueError(f"{len(thresholds)} thresholds for {len(attributes)} attributes")
        ckpt = normalize_path(checkpoint) if checkpoint is not None else None
        row = {
            "sha256": sha256,
            "arch": arch,
            "attributes": list(attributes),
            "thresholds": [float(t) for t in thresholds],
            "embedding_dim": int(embedding_dim),
            "checkpoint": ckpt,
            "meta": dict(meta or {}),
            "created": time.time(),
        }
        with self._write() as conn:
            found = conn.execute(
                sa.select(models.c.id, models.c.checkpoint).where(models.c.sha256 == sha256)
            ).first()
            if found is not None:
                if ckpt is not None and found.checkpoint != ckpt:
                    conn.execute(sa.update(models).where(models.c.id == found.id).values(checkpoint=ckpt))
                return int(found.id)
            return int(conn.execute(sa.insert(models).values(**row)).inserted_primary_key[0])

    def get_model(self, model_id: int) -> ModelRecord:
        """The model with this id; CatalogError when there is none."""
        with self._read() as conn:
            row = conn.execute(sa.select(models).where(models.c.id == model_id)).first()
        if row is None:
            raise CatalogError(f"no model with id {model_id} in the index; `facefind info` lists them")
        return _model_record(row)

    def models(self) -> list[ModelRecord]:
        """All registered models, oldest first."""
        with self._read() as conn:
            return [_model_record(r) for r in conn.execute(sa.select(models).order_by(models.c.id))]

    def latest_model(self, *, require_predictions: bool = False) -> ModelRecord | None:
        """The newest registered model (optionally the newest with at least one prediction)."""
        query = sa.select(models).order_by(models.c.id.desc()).limit(1)
        if require_predictions:
            query = query.where(
                sa.exists().where(predictions.c.model_id == models.c.id)
            )
        with self._read() as conn:
            row = conn.execute(query).first()
        return _model_record(row) if row is not None else None

    def stamp(self, model_id: int) -> int:
        """The model's prediction generation: equal stamps mean identical predictions."""
        with self._read() as conn:
            value = conn.execute(sa.select(models.c.generation).where(models.c.id == model_id)).scalar()
        if value is None:
            raise CatalogError(f"no model with id {model_id} in the index; `facefind info` lists them")
        return int(value)

    def _model_dims(self, model_id: int) -> tuple[int, int]:
        if model_id not in self._dims:
            m = self.get_model(model_id)
            self._dims[model_id] = (m.num_attributes, m.embedding_dim)
        return self._dims[model_id]

    # ----------------------------------------------------------------------------- writing

    def known_files(self, model_id: int, *, identity: bool = False) -> dict[str, tuple[int, float]]:
        """``{path: (size, mtime)}`` of images that already have a prediction from this model
        (``identity``: and whose face was already described, so ``index --identity`` over an index
        built without it reads the rest again)."""
        query = (
            sa.select(images.c.path, images.c.size, images.c.mtime)
            .join(faces, faces.c.image_id == images.c.id)
            .join(predictions, predictions.c.face_id == faces.c.id)
            .where(predictions.c.model_id == model_id)
        )
        if identity:  # a file's faces are written (and described) in one transaction: one tells
            query = query.join(identities, identities.c.face_id == faces.c.id)
        query = query.distinct()
        with self._read() as conn:
            return {path: (int(size), float(mtime)) for path, size, mtime in conn.execute(query)}

    def whole_files(self, model_id: int) -> dict[str, tuple[int | None, int | None]]:
        """``{path: (width, height)}`` of files this model predicted as one whole-file entry (no box)."""
        query = (
            sa.select(images.c.path, images.c.width, images.c.height)
            .join(faces, faces.c.image_id == images.c.id)
            .join(predictions, predictions.c.face_id == faces.c.id)
            .where((predictions.c.model_id == model_id) & faces.c.x.is_(None))
        )
        with self._read() as conn:
            return {path: (width, height) for path, width, height in conn.execute(query)}

    def image_paths(self, under: str | os.PathLike[str] | None = None) -> list[str]:
        """Paths of all catalogued images, optionally only those inside folder ``under``."""
        with self._read() as conn:
            paths = list(conn.execute(sa.select(images.c.path)).scalars())
        if under is None:
            return paths
        prefix = normalize_path(under).rstrip(os.sep) + os.sep
        return [p for p in paths if p.startswith(prefix)]

    def write_batch(
        self,
        model_id: int,
        rows: Sequence[IndexedImage],
        label_names: Sequence[str] | None = None,
    ) -> None:
        """Store one batch of indexer results atomically (one transaction).

        Rows with the same path are the faces of one file (by ``face`` number; the same number
        twice: the last row wins). Images are upserted by path (a changed file keeps its id; its
        size, mtime and dimensions are updated, and predictions of *other* models for its faces
        are dropped since they describe the old content). Each file's faces are replaced: faces
        it still has keep their ids (by number) and get the new boxes, faces it no longer has are
        deleted with their predictions and descriptors. Predictions are upserted, failure rows for
        these paths deleted, labels stored for files that carry them, and the generation of every
        model whose predictions changed is bumped. Committed batches survive a crash; an
        interrupted one leaves no trace.
        """
        if not rows:
            return
        k, d = self._model_dims(model_id)
        now = time.time()
        by_path: dict[str, dict[int, IndexedImage]] = {}
        unstorable = []
        for r in rows:
            path = normalize_path(r.path)
            if _storable(path):
                by_path.setdefault(path, {})[int(r.face)] = r
            else:
                unstorable.append((path, UNSTORABLE_REASON))
        if unstorable:
            log.warning("%d file names are not valid UTF-8; recorded as failures", len(unstorable))
            self.record_failures(unstorable)
        if not by_path:
            return
        entries = [(path, number, r) for path, found in by_path.items() for number, r in sorted(found.items())]
        probs_blobs = []
        emb = np.empty((len(entries), d), dtype=np.float32)
        for i, (path, number, r) in enumerate(entries):
            p = np.ascontiguousarray(r.probs, dtype=np.float32)
            e = np.asarray(r.embedding)
            if p.shape != (k,) or e.shape != (d,):
                raise ValueError(
                    f"model {model_id} expects probs ({k},) and embedding ({d},), got {p.shape} and {e.shape}"
                )
            if r.box is not None and len(r.box) != 4:
                raise ValueError(f"a face box is (x, y, w, h), got {r.box!r}")
            probs_blobs.append(p.tobytes())
            emb[i] = e
        blobs = list(zip(probs_blobs, map(np.ndarray.tobytes, encode_embeddings(emb))))
        described: dict[tuple[str, int], bytes | None] = {}
        for path, number, r in entries:
            if r.identity is not None:
                v = np.ascontiguousarray(r.identity, dtype=np.float32)
                if v.shape != (IDENTITY_DIM,):
                    raise ValueError(f"identity descriptor of shape {v.shape}, expected ({IDENTITY_DIM},)")
                described[path, number] = v.tobytes()
            elif r.described:
                described[path, number] = None
        files = {path: found[max(found)] for path, found in by_path.items()}  # size, mtime, dimensions
        paths = list(files)
        with self._write(shared=True) as conn:  # beside other batches (PostgreSQL)
            old = {path: (iid, size, mtime) for iid, path, size, mtime in self._rows_in(
                conn, "SELECT id, path, size, mtime FROM images WHERE path {in}", paths)}
            changed = [
                old[p][0] for p, r in files.items()
                if p in old and (old[p][1] != int(r.size) or old[p][2] != float(r.mtime))
            ]
            touched = {model_id}
            self._upsert_rows(
                conn, images, ["path"], ["path", "size", "mtime", "width", "height", "added"],
                ["size", "mtime", "width", "height"],
                [(p, int(r.size), float(r.mtime), r.width, r.height, now) for p, r in files.items()],
            )
            new = [p for p in paths if p not in old]  # the files we had already keep their ids
            ids = {p: v[0] for p, v in old.items()}
            ids.update(self._rows_in(conn, "SELECT path, id FROM images WHERE path {in}", new))
            path_of = {image_id: path for path, image_id in ids.items()}
            face_rows = {True: [], False: []}  # by: is the file new (its faces cannot exist yet)?
            for path, number, r in entries:
                face_rows[path not in old].append((ids[path], number, *(r.box if r.box is not None else (None,) * 4)))
            face_columns = ["image_id", "number", "x", "y", "w", "h"]
            self._insert_rows(conn, faces, face_columns, face_rows[True])
            self._upsert_rows(conn, faces, ["image_id", "number"], face_columns, ["x", "y", "w", "h"], face_rows[False])
            face_ids, gone = {}, []
            for fid, image_id, number in self._faces_of(conn, list(path_of)):  # old and new faces
                path = path_of[image_id]
                if number in by_path[path]:
                    face_ids[path, number] = fid
                else:
                    gone.append(fid)  # a face the file no longer has (fewer found in its new content)
            if gone:
                touched |= self._drop_predictions(conn, gone, keep_model=None)
                conn.execute(sa.delete(identities).where(identities.c.face_id.in_(gone)))
                conn.execute(sa.delete(faces).where(faces.c.id.in_(gone)))
            if changed:  # other models' predictions and any descriptor describe the old content
                was = set(changed)
                kept = [fid for (path, _), fid in face_ids.items() if ids[path] in was]
                touched |= self._drop_predictions(conn, kept, keep_model=model_id)
                conn.execute(sa.delete(identities).where(identities.c.face_id.in_(kept)))
            prediction_rows = {True: [], False: []}  # by: is the face new (no prediction can exist)?
            for (path, number, _), (pb, eb) in zip(entries, blobs):
                prediction_rows[path not in old].append((model_id, face_ids[path, number], pb, eb))
            prediction_columns = ["model_id", "face_id", "probs", "embedding"]
            self._insert_rows(conn, predictions, prediction_columns, prediction_rows[True])
            self._upsert_rows(conn, predictions, ["model_id", "face_id"], prediction_columns, ["probs", "embedding"],
                              prediction_rows[False])
            if described:  # other models' snapshots carry these descriptors too: they are now stale
                described_ids = [face_ids[key] for key in described]
                touched |= set(conn.execute(sa.select(predictions.c.model_id)
                                            .where(predictions.c.face_id.in_(described_ids)).distinct()).scalars())
            self._upsert_rows(conn, identities, ["face_id"], ["face_id", "descriptor"], ["descriptor"],
                              [(face_ids[key], blob) for key, blob in described.items()])
            self._rows_in(conn, "DELETE FROM failures WHERE path {in}", paths)
            labelled = {ids[p]: (r.labels, r.split) for p, r in files.items() if r.labels is not None}
            if labelled:
                if label_names is None:
                    raise ValueError("rows carry labels but write_batch got no label_names")
                self._store_labels(conn, label_names, labelled)
            self._bump(conn, touched)

    def _faces_of(self, conn: Connection, image_ids: list[int]) -> list[tuple[int, int, int]]:
        """``(face id, image id, number)`` of every face of these images."""
        return [(int(f), int(i), int(n)) for f, i, n in self._rows_in(
            conn, "SELECT id, image_id, number FROM faces WHERE image_id {in}", image_ids)]

    def _face_ids(self, conn: Connection, image_ids: list[int]) -> list[int]:
        return [fid for fid, _, _ in self._faces_of(conn, image_ids)]

    def _drop_predictions(self, conn: Connection, face_ids: list[int], keep_model: int | None) -> set[int]:
        """Delete predictions of these faces (except ``keep_model``'s); return the models hit."""
        if not face_ids:
            return set()
        where = predictions.c.face_id.in_(face_ids)
        if keep_model is not None:
            where = where & (predictions.c.model_id != keep_model)
        hit = set(conn.execute(sa.select(predictions.c.model_id).where(where).distinct()).scalars())
        if hit:
            conn.execute(sa.delete(predictions).where(where))
        return hit

    @staticmethod
    def _bump(conn: Connection, model_ids: Iterable[int]) -> None:
        ids = sorted(set(model_ids))
        if ids:
            conn.execute(
                sa.update(models).where(models.c.id.in_(ids)).values(generation=models.c.generation + 1)
            )

    def _label_set_id(self, conn: Connection, names: Sequence[str]) -> int:
        key = _names_key(names)
        found = conn.execute(sa.select(label_sets.c.id).where(label_sets.c.key == key)).scalar()
        if found is not None:
            return int(found)
        return int(conn.execute(sa.insert(label_sets).values(key=key, names=list(names))).inserted_primary_key[0])

    def _store_labels(self, conn: Connection, names: Sequence[str],
                      by_id: Mapping[int, tuple[np.ndarray, int | None]]) -> None:
        """Upsert each image's ``(labels, split)``."""
        set_id = self._label_set_id(conn, names)
        rows = []
        for image_id, (values, split) in by_id.items():
            v = np.asarray(values)
            if v.shape != (len(names),):
                raise ValueError(f"labels of shape {v.shape} for {len(names)} attribute names")
            rows.append((image_id, set_id, (v > 0).astype(np.uint8).tobytes(), split))
        self._upsert_rows(conn, labels, ["image_id"], ["image_id", "label_set_id", "values", "split"],
                          ["label_set_id", "values", "split"], rows)

    def record_failures(self, items: Iterable[tuple[str, str]]) -> None:
        """Record files that could not be indexed (one row per path; the newest reason wins)."""
        now = time.time()
        rows = {_storable_text(normalize_path(p)): str(reason) for p, reason in items}
        if not rows:
            return
        with self._write(shared=True) as conn:
            self._upsert_rows(conn, failures_table, ["path"], ["path", "reason", "at"], ["reason", "at"],
                              [(p, r, now) for p, r in rows.items()])

    def failures(self) -> list[FailureRecord]:
        """All recorded failures, by path."""
        with self._read() as conn:
            rows = conn.execute(sa.select(failures_table).order_by(failures_table.c.path)).all()
        return [FailureRecord(r.path, r.reason, float(r.at)) for r in rows]

    def prune(self, paths_missing: Iterable[str | os.PathLike[str]]) -> int:
        """Forget files: their images, faces, predictions, labels and failures (files gone from disk,
        or photos in which ``--detect-faces`` finds no face).

        Returns the number of images removed; models that lost predictions get a new generation.
        """
        paths = sorted({normalize_path(p) for p in paths_missing})
        if not paths:
            return 0
        removed = 0
        with self._write(shared=True) as conn:
            for start in range(0, len(paths), 10_000):
                chunk = paths[start:start + 10_000]
                ids = list(conn.execute(sa.select(images.c.id).where(images.c.path.in_(chunk))).scalars())
                conn.execute(sa.delete(failures_table).where(failures_table.c.path.in_(chunk)))
                if not ids:
                    continue
                face_ids = self._face_ids(conn, ids)
                self._bump(conn, self._drop_predictions(conn, face_ids, keep_model=None))
                conn.execute(sa.delete(labels).where(labels.c.image_id.in_(ids)))
                if face_ids:
                    conn.execute(sa.delete(identities).where(identities.c.face_id.in_(face_ids)))
                    conn.execute(sa.delete(faces).where(faces.c.id.in_(face_ids)))
                removed += conn.execute(sa.delete(images).where(images.c.id.in_(ids))).rowcount
        return removed

    # ----------------------------------------------------------------------------- reading

    def export(self, model_id: int, *, stored: bool = False) -> tuple[int, Predictions]:
        """``(stamp, predictions)`` read in one transaction, so the stamp describes exactly them.

        ``stored``: ``emb`` holds the float16 rows a snapshot stores (``vectors.stored_fp16``),
        made chunk by chunk as they are read, instead of the raw float32 embeddings: a publish then
        never holds a float32 copy of every embedding (800 MB at 400k x 512).
        """
        k, d = self._model_dims(model_id)
        query = (
            sa.select(predictions.c.face_id, images.c.path, predictions.c.probs, predictions.c.embedding,
                      faces.c.image_id, faces.c.number,
                      *(sa.func.coalesce(c, -1) for c in (faces.c.x, faces.c.y, faces.c.w, faces.c.h)))
            .join(faces, faces.c.id == predictions.c.face_id)
            .join(images, images.c.id == faces.c.image_id)
            .where(predictions.c.model_id == model_id)
            .order_by(predictions.c.face_id)
        )
        count = (sa.select(sa.func.count()).select_from(predictions)
                 .where(predictions.c.model_id == model_id))
        with self._read() as conn:
            stamp = conn.execute(sa.select(models.c.generation).where(models.c.id == model_id)).scalar()
            if stamp is None:
                raise CatalogError(f"no model with id {model_id} in the index; `facefind info` lists them")
            n = int(conn.execute(count).scalar() or 0)
            ids = np.empty(n, dtype=np.int64)
            probs = np.empty((n, k), dtype=np.float32)
            emb = np.empty((n, d), dtype=np.float16 if stored else np.float32)
            image_ids = np.empty(n, dtype=np.int64)
            numbers = np.empty(n, dtype=np.int32)
            boxes = np.empty((n, 4), dtype=np.int32)
            paths: list[str] = []
            # The raw DBAPI cursor (same transaction) skips SQLAlchemy's per-row processing: 5x faster.
            compiled = query.compile(dialect=conn.dialect)
            params = compiled.construct_params()
            cursor = conn.connection.cursor()
            try:
                # psycopg: binary results, so the embeddings arrive as bytes, not as hex text to
                # decode (2/3 of a PostgreSQL publish). SQLite's cursor has no such option.
                cursor.execute(str(compiled), tuple(params[p] for p in compiled.positiontup)
                               if conn.dialect.positional else params, **({} if self._is_sqlite else {"binary": True}))
                at = 0
                while chunk := cursor.fetchmany(8192):
                    if at + len(chunk) > n:
                        raise CatalogError("predictions changed while being read; try again")
                    cid, cpath, cprobs, cemb, cimage, cnumber, *cbox = zip(*chunk)
                    sl = slice(at, at + len(chunk))
                    ids[sl] = cid
                    image_ids[sl] = cimage
                    numbers[sl] = cnumber
                    boxes[sl] = np.array(cbox, dtype=np.int32).T  # -1: the whole file (coalesced in SQL)
                    paths.extend(cpath)
                    probs[sl] = np.frombuffer(b"".join(cprobs), dtype=np.float32).reshape(-1, k)
                    raw = decode_embeddings(cemb, d, cid)  # float16 rows, float32 rows of older versions
                    if stored:
                        vectors.stored_fp16(raw, out=emb[sl])
                    else:
                        emb[sl] = raw
                    at += len(chunk)
            finally:
                cursor.close()
            identity, has_identity = self._identities(conn, ids)
            truth = self._ground_truth(conn, image_ids[:at], boxes[:at, 2] < 0)
        if at != n:
            raise CatalogError("predictions changed while being read; try again")
        return int(stamp), Predictions(ids, paths, probs, emb, identity, has_identity, image_ids, numbers, boxes,
                                       *truth)

    @staticmethod
    def _ground_truth(conn: Connection, image_ids: np.ndarray, whole: np.ndarray
                      ) -> tuple[list[str] | None, np.ndarray | None, np.ndarray | None]:
        """``(names, labels int8 (L, N), splits int8 (N,))`` aligned with the exported rows, -1 where
        a row has no label or split; all None when no row has labels. A file's labels describe it as
        one face, so only whole-file entries (``whole``) carry them. Several label sets (folders
        annotated differently) give the union of their names, in the order first seen."""
        sets = {r.id: list(r.names) for r in conn.execute(sa.select(label_sets).order_by(label_sets.c.id))}
        rows = _raw_rows(conn, sa.select(labels.c.image_id, labels.c.label_set_id, labels.c["values"],
                                         labels.c.split))
        if not rows:
            return None, None, None
        names = list(dict.fromkeys(n for have in sets.values() for n in have))
        column = {n: i for i, n in enumerate(names)}
        out = np.full((len(names), len(image_ids)), -1, dtype=np.int8)
        splits = np.full(len(image_ids), -1, dtype=np.int8)
        rows_at = np.flatnonzero(whole)  # whole-file rows, whose image ids are unique
        if not rows_at.size:  # every entry a detected face (index --detect-faces): none carries labels
            return None, None, None
        order = np.argsort(image_ids[rows_at], kind="stable")
        sorted_ids = image_ids[rows_at][order]
        got = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        at, found = find_sorted(sorted_ids, got)
        pos = rows_at[order][at]
        set_of = np.fromiter((r[1] for r in rows), np.int64, len(rows))
        for sid, have in sets.items():
            pick = np.flatnonzero(found & (set_of == sid))
            if pick.size:
                values = np.frombuffer(b"".join(rows[i][2] for i in pick), np.uint8).reshape(-1, len(have))
                out[np.ix_([column[n] for n in have], pos[pick])] = values.T
        split = np.array([r[3] for r in rows], dtype=np.float64)  # NULL -> nan
        known = found & ~np.isnan(split)
        splits[pos[known]] = split[known]
        if not (out >= 0).any():
            return None, None, None
        return names, out, splits

    @staticmethod
    def _identities(conn: Connection, ids: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Descriptors aligned with ascending face ``ids``: float32 (N, 128) and a bool mask; (None,
        None) when none of these faces has one (an index built without ``--identity``)."""
        rows = conn.execute(sa.select(identities.c.face_id, identities.c.descriptor)
                            .where(identities.c.descriptor.is_not(None))).all()
        if not rows:
            return None, None
        vectors = np.zeros((len(ids), IDENTITY_DIM), np.float32)
        mask = np.zeros(len(ids), bool)
        at, found = find_sorted(ids, np.fromiter((r[0] for r in rows), np.int64, len(rows)))
        if found.any():
            vectors[at[found]] = np.frombuffer(b"".join(r[1] for r, ok in zip(rows, found) if ok),
                                               np.float32).reshape(-1, IDENTITY_DIM)
            mask[at[found]] = True
        if not mask.any():
            return None, None
        return vectors, mask

    def labels_for(self, attribute_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ground truth for these attributes: ``(face ids int64 (N,), uint8 0/1 (N, K))`` by face id.

        A file's labels describe the file as one face, so only whole-file entries (no box) carry
        them; images whose label set lacks any of the names are left out.
        """
        names = list(attribute_names)
        with self._read() as conn:
            sets = {r.id: list(r.names) for r in conn.execute(sa.select(label_sets))}
            rows = conn.execute(
                sa.select(faces.c.id, labels.c.label_set_id, labels.c["values"])
                .join(faces, faces.c.image_id == labels.c.image_id)
                .where(faces.c.x.is_(None))
                .order_by(faces.c.id)
            ).all()
        columns = {
            sid: np.array([have.index(n) for n in names], dtype=np.intp)
            for sid, have in sets.items() if all(n in have for n in names)
        }
        ids, out = [], []
        for face_id, sid, blob in rows:
            cols = columns.get(sid)
            if cols is not None:
                ids.append(face_id)
                out.append(np.frombuffer(blob, dtype=np.uint8)[cols])
        matrix = np.stack(out) if out else np.zeros((0, len(names)), np.uint8)
        return np.asarray(ids, dtype=np.int64), matrix

    def info(self, model_id: int | None = None) -> dict[str, Any]:
        """Counts for ``facefind info``: images, faces (entries), predictions of the model (default: the newest
        with predictions), labels, failures, models, last run, catalog size on disk."""
        with self._read() as conn:
            if model_id is None:
                model_id = conn.execute(sa.select(sa.func.max(predictions.c.model_id))).scalar() or conn.execute(
                    sa.select(sa.func.max(models.c.id))
                ).scalar()
            n_images, n_faces, n_labels, n_failures = (
                int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar() or 0)
                for t in (images, faces, labels, failures_table)
            )
            n_identities = int(conn.execute(sa.select(sa.func.count()).select_from(identities)
                                            .where(identities.c.descriptor.is_not(None))).scalar() or 0)
            per_model = dict(conn.execute(
                sa.select(predictions.c.model_id, sa.func.count()).group_by(predictions.c.model_id)
            ).all())
            model_rows = [_model_record(r) for r in conn.execute(sa.select(models).order_by(models.c.id))]
            last = conn.execute(sa.select(runs).order_by(runs.c.id.desc()).limit(1)).first()
        return {
            "catalog": self._where(),
            "model_id": model_id,
            "images": n_images,
            "faces": n_faces,
            "predictions": int(per_model.get(model_id, 0)) if model_id is not None else 0,
            "labels": n_labels,
            "identities": n_identities,
            "failures": n_failures,
            "models": [
                {"id": m.id, "sha256": m.sha256, "arch": m.arch, "checkpoint": m.checkpoint,
                 "attributes": m.attributes, "thresholds": m.thresholds, "embedding_dim": m.embedding_dim,
                 "created": m.created, "generation": m.generation, "predictions": int(per_model.get(m.id, 0))}
                for m in model_rows
            ],
            "last_run": None if last is None else {
                "id": last.id, "model_id": last.model_id, "root": last.root, "started": last.started,
                "finished": last.finished, "status": last.status,
                "counts": dict(last.counts or {}), "timings": dict(last.timings or {}),
            },
            "disk_bytes": self.disk_bytes(),
        }


def latest_checkpoint(index_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint path recorded for the newest model of the index at ``index_dir``.

    None when there is no index, no model, or no recorded path. The file may no longer exist:
    callers decide whether that is an error (``index``) or a reason to look elsewhere (``predict``).
    """
    try:
        with Catalog.open(index_dir, create=False) as catalog:
            latest = catalog.latest_model()
    except CatalogError:
        return None
    return Path(latest.checkpoint) if latest is not None and latest.checkpoint else None


def _model_record(row: Any) -> ModelRecord:
    return ModelRecord(
        id=int(row.id),
        sha256=row.sha256,
        arch=row.arch,
        attributes=list(row.attributes),
        thresholds=[float(t) for t in row.thresholds],
        embedding_dim=int(row.embedding_dim),
        checkpoint=row.checkpoint,
        meta=dict(row.meta or {}),
        created=float(row.created),
        generation=int(row.generation),
    )

