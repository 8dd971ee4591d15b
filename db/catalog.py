"""The catalog: facefind's source of truth, an SQLAlchemy 2 Core schema and a small API over it.

Tables (any SQLAlchemy URL; SQLite by default, tuned for one writer and many readers):

    meta         key/value: schema version, a random catalog id (so a snapshot can tell that
                 the catalog it came from was replaced)
    images       one row per file: normalised absolute path (unique), size, mtime, width, height
    faces        one row per index entry (schema v3): the file, the face's number in it (0 = the
                 largest) and its box in the decoded image; no box: the whole file is the entry
                 (a CelebA-style crop). Users, snapshots and FAISS refer to entries by face id
    models       one row per checkpoint (sha256 unique) with its attribute names, thresholds,
                 embedding size and a ``generation`` counter bumped by every transaction that
                 changes the model's predictions; snapshots compare it to know they are current
    predictions  per (model, face): K float32 probabilities and a D float32 embedding as BLOBs
    label_sets   one row per distinct list of ground-truth attribute names
    labels       per image: uint8 0/1 values in the order of its label set (they describe a
                 whole-file entry, so only faces without a box carry them into queries)
    identities   per face: its 128-D dlib identity descriptor, float32 BLOB, NULL when
                 ``index --identity`` found no face in a whole-file entry (looked, none there)
    failures     files that could not be indexed, with the reason (cleared when a file succeeds)
    runs         index runs: root, start/finish time, status, counts and stage timings

Write transactions are short and serialised, so concurrent writers queue instead of failing, and
readers never see half a batch:

    SQLite       writers take the write lock up front (``BEGIN IMMEDIATE``) and wait behind
                 ``busy_timeout``; readers run in WAL snapshots.
    PostgreSQL   (``postgresql+psycopg://``, the ``postgres`` extra) writers run at READ COMMITTED
                 and first take one transaction-scoped advisory lock (``pg_advisory_xact_lock``),
                 waiting up to ``lock_timeout``: the same one-writer-at-a-time model, so a batch's
                 read-then-upsert and the generation bump never race another writer; readers run
                 at REPEATABLE READ, one consistent view per read transaction.

The schema lives here, once, as SQLAlchemy tables; ``SCHEMA_VERSION`` numbers it. An older
catalog is upgraded on open by the steps in ``MIGRATIONS`` (one transaction, DDL included, on both
backends); see ``MIGRATIONS`` for how to add a step. Alembic is not used: the steps are a few lines
each, need no revision files or env.py, and must run inside ``Catalog``'s own locked transaction.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from facefind.db.errors import CatalogError
from facefind.db.paths import default_db_url

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
IDENTITY_DIM = 128  # dlib's face descriptor (facefind.indexer.faces.identity.DIM; db imports nothing of ours)
BUSY_TIMEOUT_S = 60.0
PG_WRITE_LOCK = 0x66616365  # the advisory lock key writers hold (b"face"), one per database
PAGE_SIZE = 16384
RUN_STATUSES = ("running", "finished", "interrupted", "failed")

metadata = sa.MetaData()

meta_table = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

images = sa.Table(
    "images",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("path", sa.Text, nullable=False, unique=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("mtime", sa.Float, nullable=False),
    sa.Column("width", sa.Integer),
    sa.Column("height", sa.Integer),
    sa.Column("added", sa.Float, nullable=False),
    # Never reuse the id of a pruned image: ids are what snapshots, FAISS and users refer to.
    sqlite_autoincrement=True,
)

models = sa.Table(
    "models",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("arch", sa.String(128), nullable=False),
    sa.Column("attributes", sa.JSON, nullable=False),
    sa.Column("thresholds", sa.JSON, nullable=False),
    sa.Column("embedding_dim", sa.Integer, nullable=False),
    sa.Column("checkpoint", sa.Text),
    sa.Column("meta", sa.JSON),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("generation", sa.BigInteger, nullable=False, server_default="0"),
    sqlite_autoincrement=True,
)

# An entry of the index. A file indexed as it is (CelebA-style folders) has one face, number 0,
# with no box; ``index --detect-faces`` gives a photo one face per detected face, largest first.
# A changed file keeps the ids of the faces it still has by number; the rest are deleted.
faces = sa.Table(
    "faces",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("x", sa.Integer),  # the box in the decoded (EXIF-upright) image, pixels; NULL: whole file
    sa.Column("y", sa.Integer),
    sa.Column("w", sa.Integer),
    sa.Column("h", sa.Integer),
    sa.UniqueConstraint("image_id", "number", name="uq_faces_image_number"),
    # Never reuse the id of a deleted face: ids are what snapshots, FAISS and users refer to.
    sqlite_autoincrement=True,
)

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("face_id", sa.Integer, sa.ForeignKey("faces.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("probs", sa.LargeBinary, nullable=False),
    sa.Column("embedding", sa.LargeBinary, nullable=False),
    sa.Index("ix_predictions_face", "face_id"),
)

label_sets = sa.Table(
    "label_sets",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("key", sa.String(64), nullable=False, unique=True),  # sha256 of the JSON names
    sa.Column("names", sa.JSON, nullable=False),
)

labels = sa.Table(
    "labels",
    metadata,
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("label_set_id", sa.Integer, sa.ForeignKey("label_sets.id"), nullable=False),
    sa.Column("values", sa.LargeBinary, nullable=False),
)

# Keyed by face, not by (model, face): who a face is does not depend on the attribute model, so
# indexing with a second model keeps the descriptors, and a row per face that was looked at (NULL:
# no face found in a whole-file entry) lets a re-run of ``index --identity`` skip files already described.
identities = sa.Table(
    "identities",
    metadata,
    sa.Column("face_id", sa.Integer, sa.ForeignKey("faces.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("descriptor", sa.LargeBinary),
)

failures_table = sa.Table(
    "failures",
    metadata,
    sa.Column("path", sa.Text, primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="SET NULL")),
    sa.Column("root", sa.Text, nullable=False),
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("finished", sa.Float),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("counts", sa.JSON),
    sa.Column("timings", sa.JSON),
    sa.Column("host", sa.String(255)),
    sa.Column("pid", sa.Integer),
    sqlite_autoincrement=True,
)


# Schema upgrades: ``MIGRATIONS[v]`` turns a version-v catalog into version v+1, inside the write
# transaction ``Catalog`` opens (the write lock held, DDL transactional on SQLite and PostgreSQL).
# To change the schema: edit the tables above, bump SCHEMA_VERSION, and register the step from the
# old version, built from the tables themselves so that the schema stays written in one place:
#
#     def _v1_to_v2(conn: Connection) -> None:
#         add_columns(conn, images, "face", "box")          # new nullable columns of images
#         metadata.create_all(conn, tables=[faces_table])    # new tables
#
#     MIGRATIONS[1] = _v1_to_v2
#
# tests/test_catalog.py checks that a catalog created at the old version and upgraded has the same
# tables and columns as a new one.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}


def _v1_to_v2(conn: Connection) -> None:
    """v2: the ``identities`` table (search by person), keyed by image as it was in v2."""
    v2 = sa.MetaData()
    sa.Table("images", v2, sa.Column("id", sa.Integer, primary_key=True))
    sa.Table("identities", v2,
             sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
             sa.Column("descriptor", sa.LargeBinary))
    v2.create_all(conn, tables=[v2.tables["identities"]])


MIGRATIONS[1] = _v1_to_v2


def _v2_to_v3(conn: Connection) -> None:
    """v3: the ``faces`` table; predictions and identities keyed by face. Every image becomes one
    whole-file face with the image's own id, so the ids that users, snapshots and FAISS hold stay
    valid, and faces' id sequence continues where images' is, so new files keep equal ids."""
    metadata.create_all(conn, tables=[faces])
    conn.exec_driver_sql("INSERT INTO faces (id, image_id, number) SELECT id, id, 0 FROM images")
    _continue_sequence(conn, "faces", after="images")
    # Copy, drop, recreate from the definitions above, copy back: SQLite cannot change a foreign key
    # in place, and the copy leaves index and constraint names free for the new tables on PostgreSQL.
    for table in (predictions, identities):
        others = ", ".join(c.name for c in table.columns if c.name != "face_id")
        conn.exec_driver_sql(f"CREATE TABLE v2_{table.name} AS SELECT * FROM {table.name}")
        conn.exec_driver_sql(f"DROP TABLE {table.name}")
        metadata.create_all(conn, tables=[table])
        conn.exec_driver_sql(f"INSERT INTO {table.name} ({others}, face_id) "
                             f"SELECT {others}, image_id FROM v2_{table.name}")
        conn.exec_driver_sql(f"DROP TABLE v2_{table.name}")


MIGRATIONS[2] = _v2_to_v3


def _continue_sequence(conn: Connection, table: str, *, after: str) -> None:
    """Make ``table``'s next autoincrement id follow ``after``'s (pruned ids included), for a step
    that copied ids over explicitly (which never advances a PostgreSQL sequence)."""
    if conn.dialect.name == "postgresql":
        source = conn.exec_driver_sql(f"SELECT pg_get_serial_sequence('{after}', 'id')").scalar()
        last, called = conn.exec_driver_sql(f"SELECT last_value, is_called FROM {source}").one()
        conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {int(last)}, "
                             f"{'true' if called else 'false'})")
        return
    seq = conn.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name = ?", (after,)).scalar()
    if seq is None:
        return
    if conn.exec_driver_sql("SELECT 1 FROM sqlite_sequence WHERE name = ?", (table,)).first():
        conn.exec_driver_sql("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = ?", (int(seq), table))
    else:
        conn.exec_driver_sql("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, int(seq)))


def add_columns(conn: Connection, table: sa.Table, *names: str) -> None:
    """``ALTER TABLE table ADD COLUMN`` for these columns of ``table``, typed by its definition.

    For upgrade steps. New columns must be nullable or have a server default, as existing rows
    get no value.
    """
    preparer = conn.dialect.identifier_preparer
    for name in names:
        column = table.c[name]
        ddl = f"{preparer.quote(name)} {column.type.compile(dialect=conn.dialect)}"
        if column.server_default is not None:
            ddl += f" DEFAULT {column.server_default.arg}"
        if not column.nullable:
            if column.server_default is None:
                raise ValueError(f"{table.name}.{name} is NOT NULL without a server default")
            ddl += " NOT NULL"
        conn.exec_driver_sql(f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN {ddl}")


def _version(meta: Mapping[str, str]) -> int:
    try:
        return int(meta.get("schema_version", 0))
    except ValueError:
        return 0


def normalize_path(path: str | os.PathLike[str]) -> str:
    """The catalog's key for a file: absolute, ``~`` expanded, ``..`` folded, symlinks kept.

    Symlinks are not resolved on purpose: the path the user gave is the one shown, and resolving
    a dangling link or a link loop must not fail.
    """
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


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
    described: bool = False               # True: identity was looked for (``index --identity``)
    identity: np.ndarray | None = None    # float32 (128,) descriptor; None: no face (or not looked)
    face: int = 0                         # the face's number in its file (0: the largest, or the file)
    box: Box | None = None                # where it is; None: the entry is the whole file


@dataclass(frozen=True)
class FailureRecord:
    path: str
    reason: str
    at: float


@dataclass(frozen=True)
class RunRecord:
    id: int
    model_id: int | None
    root: str
    started: float
    finished: float | None
    status: str
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)


class Predictions(NamedTuple):
    """One model's predictions, row ``i`` belonging to face ``ids[i]`` (ascending) of file ``paths[i]``."""

    ids: np.ndarray     # int64 (N,) face ids
    paths: list[str]    # N
    probs: np.ndarray   # float32 (N, K)
    emb: np.ndarray     # float32 (N, D), as stored (not normalised)
    identity: np.ndarray | None = None      # float32 (N, 128) descriptors (zeros where has_identity is False)
    has_identity: np.ndarray | None = None  # bool (N,): which rows have a descriptor
    image_ids: np.ndarray | None = None     # int64 (N,): the file (images.id) of each face
    faces: np.ndarray | None = None         # int32 (N,): the face's number in its file
    boxes: np.ndarray | None = None         # int32 (N, 4) x, y, w, h; -1 where the entry is the whole file


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


def _names_key(names: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(list(names)).encode()).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class Catalog:
    """The catalog behind one SQLAlchemy URL. Safe to share between threads; cheap to open.

    Each method runs in its own transaction. Processes may open the same catalog at once: writers
    wait for each other (up to ``BUSY_TIMEOUT_S``), readers never wait.
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        try:
            self._sa_url = sa.engine.make_url(url)
        except sa.exc.ArgumentError:
            raise CatalogError("the catalog URL (FACEFIND_DB) is not a database URL: use e.g. "
                               "postgresql+psycopg://user@host/dbname, or unset it for SQLite") from None
        backend = self._sa_url.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise CatalogError(f"facefind supports SQLite and PostgreSQL catalogs, not {backend!r}: "
                               "set FACEFIND_DB to a postgresql+psycopg:// URL, or unset it")
        self._is_sqlite = backend == "sqlite"
        self._dims: dict[int, tuple[int, int]] = {}
        self._sql_cache: dict[tuple[Any, ...], tuple[str, tuple[str, ...] | None]] = {}
        db_file = self.sqlite_file
        if db_file is not None and not create and not db_file.exists():
            raise CatalogError(
                f"no index at {db_file.parent}: run `facefind index DIR` first, "
                "or point --index / FACEFIND_INDEX at an existing index"
            )
        if db_file is not None:
            try:
                db_file.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise CatalogError(f"cannot create the index folder {db_file.parent}: {err.strerror}; "
                                   "choose another with --index or FACEFIND_INDEX") from None
        self._writer = self._make_engine(immediate=True)
        self._reader = self._writer if self._in_memory else self._make_engine(immediate=False)
        self._catalog_id = self._init_schema(create)

    @classmethod
    def open(cls, index_dir: str | os.PathLike[str], *, create: bool = True) -> "Catalog":
        """Open the catalog of an index folder (``$FACEFIND_DB`` overrides the SQLite file)."""
        return cls(default_db_url(Path(index_dir)), create=create)

    # ----------------------------------------------------------------------------- plumbing

    @property
    def _in_memory(self) -> bool:
        return self._is_sqlite and self._sa_url.database in (None, "", ":memory:")

    @property
    def sqlite_file(self) -> Path | None:
        """The SQLite database file, or None for another backend or an in-memory catalog."""
        if not self._is_sqlite or self._in_memory:
            return None
        return Path(self._sa_url.database).expanduser().absolute()

    @property
    def catalog_id(self) -> str:
        """A random id fixed when the catalog was created; a recreated catalog gets a new one."""
        return self._catalog_id

    def _make_engine(self, *, immediate: bool) -> Engine:
        if not self._is_sqlite:
            return self._make_server_engine(writer=immediate)
        kwargs: dict[str, Any] = {"connect_args": {"timeout": BUSY_TIMEOUT_S, "check_same_thread": False}}
        if self._in_memory:
            kwargs["poolclass"] = StaticPool
        engine = sa.create_engine(self.url, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let us emit BEGIN ourselves (pysqlite's implicit BEGIN is deferred and too late).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            cur.execute("PRAGMA foreign_keys = ON")
            if not self._in_memory:
                # Only takes effect on a new, empty file. A prediction row is ~2.2 KB: 16 KiB pages
                # hold 7 of them instead of 1.8, making the file 40% smaller and writes 1.6x faster.
                cur.execute(f"PRAGMA page_size = {PAGE_SIZE}")
                mode = cur.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    cur.execute("PRAGMA journal_mode = WAL")
                # In WAL mode NORMAL loses nothing on a process crash (kill -9); only an OS crash
                # or power cut can roll back the last commits, which the indexer simply redoes.
                cur.execute("PRAGMA synchronous = NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    def _make_server_engine(self, *, writer: bool) -> Engine:
        """A PostgreSQL engine. Writers: READ COMMITTED behind the advisory write lock (each
        statement then sees every earlier writer's commit). Readers: REPEATABLE READ, which gives
        multi-statement reads one consistent view, as WAL does in SQLite."""
        try:
            engine = sa.create_engine(self.url, pool_pre_ping=True,
                                      isolation_level="READ COMMITTED" if writer else "REPEATABLE READ")
        except ModuleNotFoundError as err:
            if self._sa_url.get_driver_name() != "psycopg":  # e.g. postgresql:// means psycopg2
                raise CatalogError(f"the catalog {self._where()} needs the {err.name} package: write the URL "
                                   "as postgresql+psycopg://... (psycopg 3, pip install 'facefind[postgres]')") from None
            raise CatalogError(f"the catalog {self._where()} needs the {err.name} package: "
                               "pip install 'facefind[postgres]'") from None

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            with dbapi_conn.cursor() as cur:
                # A writer waits for the lock as long as SQLite's busy_timeout, then fails clearly.
                cur.execute(f"SET lock_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            dbapi_conn.commit()

        if writer:
            @event.listens_for(engine, "begin")
            def _on_begin(conn: Connection) -> None:
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_WRITE_LOCK})")

        return engine

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction; database errors become a CatalogError that says what to check."""
        try:
            with self._writer.begin() as conn:
                yield conn
        except sa.exc.OperationalError as err:
            raise CatalogError(f"cannot write to the catalog {self._where()}: {_reason(err)}; "
                               f"{self._hint()}") from None
        except Exception as err:
            if not self._damaged(err):
                raise
            raise CatalogError(self._damage_message(err)) from None

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        """One read transaction (a consistent snapshot of the catalog)."""
        try:
            with self._reader.begin() as conn:
                yield conn
        except sa.exc.OperationalError as err:
            raise CatalogError(f"cannot read the catalog {self._where()}: {_reason(err)}"
                               + ("" if self._is_sqlite else f"; {self._hint()}")) from None
        except Exception as err:
            if self._damaged(err):
                raise CatalogError(self._damage_message(err)) from None
            if isinstance(err, self._reader.dialect.loaded_dbapi.OperationalError):  # raw, from export's cursor
                raise CatalogError(f"cannot read the catalog {self._where()}: {_reason(err)}") from None
            raise

    def _damaged(self, err: Exception) -> bool:
        """Whether ``err`` is the DBAPI's plain DatabaseError (SQLite: 'database disk image is
        malformed'), wrapped by SQLAlchemy or raw from a cursor (``export`` reads through one).
        Its subclasses (integrity, programming errors) are bugs and keep their traceback."""
        orig = err.orig if isinstance(err, sa.exc.DBAPIError) else err
        return type(orig) is getattr(self._reader.dialect.loaded_dbapi, "DatabaseError", None)

    def _damage_message(self, err: Exception) -> str:
        return (f"the catalog {self._where()} is damaged ({_reason(err)}): run `facefind check` to see "
                "what is wrong; keep a copy, then restore a backup or move it away and re-run "
                "`facefind index` to rebuild it")

    def _hint(self) -> str:
        """What to check when the database cannot be reached or written."""
        if self._is_sqlite:
            return ("check that the index folder is writable, the disk is not full, and no other "
                    "process holds the database")
        return ("check that the PostgreSQL server is running and reachable, the database exists, "
                "and FACEFIND_DB names the right user and password")

    def _where(self) -> str:
        f = self.sqlite_file
        return str(f) if f is not None else self._sa_url.render_as_string(hide_password=True)

    def _init_schema(self, create: bool) -> str:
        """Check (and when allowed, create) the schema, upgrading an older one; return the catalog id."""
        try:
            with self._reader.begin() as conn:
                have = self._read_meta(conn)
            if have is None and create:
                with self._writer.begin() as conn:  # serialised: concurrent creators wait here
                    metadata.create_all(conn, checkfirst=True)
                    have = self._read_meta(conn)
                    if have is None:
                        have = {"schema_version": str(SCHEMA_VERSION), "catalog_id": uuid.uuid4().hex}
                        conn.execute(sa.insert(meta_table), [{"key": k, "value": v} for k, v in have.items()])
            if have is not None and _version(have) < SCHEMA_VERSION and _version(have) in MIGRATIONS:
                have = self._upgrade()
        except sa.exc.DatabaseError as err:
            if self._is_sqlite:
                hint = "if the file is damaged, move it away and re-run `facefind index` to rebuild it"
            else:
                hint = self._hint()
            raise CatalogError(f"cannot open the catalog {self._where()}: {_reason(err)}; {hint}") from None
        if have is None:
            raise CatalogError(f"{self._where()} is not a facefind catalog (no schema); "
                               "run `facefind index DIR` to create one")
        version = _version(have)
        if version > SCHEMA_VERSION:
            raise CatalogError(
                f"the catalog {self._where()} has schema version {version}, written by a newer facefind "
                f"(this one reads up to {SCHEMA_VERSION}): upgrade facefind (pip install -U facefind)")
        if version != SCHEMA_VERSION:
            raise CatalogError(
                f"the catalog {self._where()} has schema version {have.get('schema_version')}, which this "
                f"facefind cannot upgrade to {SCHEMA_VERSION}: re-index into a new --index folder")
        return have["catalog_id"]

    def _upgrade(self) -> dict[str, str]:
        """Apply the pending ``MIGRATIONS`` steps in one write transaction; return the new meta.

        Under the writer lock, so two processes opening an old catalog at once upgrade it once.
        """
        try:
            with self._writer.begin() as conn:
                have = self._read_meta(conn) or {}
                start = version = _version(have)
                while version < SCHEMA_VERSION and version in MIGRATIONS:
                    MIGRATIONS[version](conn)
                    version += 1
                if version != start:
                    conn.execute(sa.update(meta_table).where(meta_table.c.key == "schema_version")
                                 .values(value=str(version)))
                    log.warning("upgraded the catalog %s from schema version %d to %d",
                                self._where(), start, version)
                return {**have, "schema_version": str(version)}
        except sa.exc.OperationalError as err:
            raise CatalogError(
                f"the catalog {self._where()} has schema version {_version(self._read_only_meta())} and "
                f"must be upgraded to {SCHEMA_VERSION}, but cannot be written ({_reason(err)}): run "
                "`facefind check --repair` as a user who can write it") from None

    def _read_only_meta(self) -> dict[str, str]:
        with self._reader.begin() as conn:
            return self._read_meta(conn) or {}

    @staticmethod
    def _read_meta(conn: Connection) -> dict[str, str] | None:
        if not sa.inspect(conn).has_table("meta"):
            return None
        have = dict(conn.execute(sa.select(meta_table.c.key, meta_table.c.value)).all())
        return have or None

    def close(self) -> None:
        """Release all connections (the catalog can be reopened later)."""
        self._writer.dispose()
        if self._reader is not self._writer:
            self._reader.dispose()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _upsert(self, table: sa.Table, keys: Sequence[str], columns: Sequence[str],
                update: Sequence[str]) -> tuple[str, tuple[str, ...] | None]:
        """SQL for ``INSERT (columns) ... ON CONFLICT (keys) DO UPDATE SET update`` (SQLite,
        PostgreSQL), compiled once, and for positional paramstyles the parameter order."""
        cache_key = (table.name, tuple(keys), tuple(columns), tuple(update))
        if cache_key not in self._sql_cache:
            backend = self._sa_url.get_backend_name()
            if backend == "sqlite":
                from sqlalchemy.dialects.sqlite import insert
            elif backend == "postgresql":
                from sqlalchemy.dialects.postgresql import insert
            else:
                raise CatalogError(f"facefind supports SQLite and PostgreSQL catalogs, not {backend!r}")
            stmt = insert(table).values({c: sa.bindparam(c) for c in columns})
            if update:
                stmt = stmt.on_conflict_do_update(index_elements=list(keys),
                                                  set_={c: stmt.excluded[c] for c in update})
            else:
                stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
            compiled = stmt.compile(dialect=self._writer.dialect)
            order = tuple(compiled.positiontup) if self._writer.dialect.positional else None
            if order is not None and order != tuple(columns):
                raise AssertionError(f"unexpected parameter order {order}")
            self._sql_cache[cache_key] = (str(compiled), order)
        return self._sql_cache[cache_key]

    def _executemany(self, conn: Connection, sql: tuple[str, tuple[str, ...] | None],
                     columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        """Run compiled ``sql`` once per row, as plain tuples (7x faster than dicts through Core)."""
        text, order = sql
        conn.exec_driver_sql(text, rows if order is not None else [dict(zip(columns, r)) for r in rows])

    def _upsert_rows(self, conn: Connection, table: sa.Table, keys: Sequence[str],
                     columns: Sequence[str], update: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        if rows:
            self._executemany(conn, self._upsert(table, keys, columns, update), columns, rows)

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

    # A publish hold marks a sharded build in progress: while it stands, queries keep the last
    # published snapshot instead of rebuilding one from a catalog that only some shards have filled.

    def hold_publish(self, model_id: int, detail: Mapping[str, Any]) -> None:
        """Hold back snapshot rebuilds of ``model_id`` until ``release_publish`` (idempotent).

        Shards starting together all call this: an equal hold is left alone, and a write that
        loses a race to another shard's (a serialisation failure on PostgreSQL) is tried again.
        """
        key, value = f"publish_hold:{int(model_id)}", json.dumps(dict(detail), sort_keys=True)
        for attempt in range(3):
            if self.publish_hold(model_id) == json.loads(value):
                return
            try:
                with self._write() as conn:
                    self._upsert_rows(conn, meta_table, ["key"], ["key", "value"], ["value"], [(key, value)])
                return
            except CatalogError:
                if attempt == 2:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def publish_hold(self, model_id: int) -> dict[str, Any] | None:
        """The hold's detail (e.g. the shard count) while a sharded build of ``model_id`` stands."""
        with self._read() as conn:
            value = conn.execute(sa.select(meta_table.c.value).where(
                meta_table.c.key == f"publish_hold:{int(model_id)}")).scalar()
        return None if value is None else dict(json.loads(value))

    def release_publish(self, model_id: int) -> None:
        """End the hold: the next snapshot sync publishes what the catalog holds."""
        with self._write() as conn:
            conn.execute(sa.delete(meta_table).where(meta_table.c.key == f"publish_hold:{int(model_id)}"))

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
        blobs = []
        for path, number, r in entries:
            p = np.ascontiguousarray(r.probs, dtype=np.float32)
            e = np.ascontiguousarray(r.embedding, dtype=np.float32)
            if p.shape != (k,) or e.shape != (d,):
                raise ValueError(
                    f"model {model_id} expects probs ({k},) and embedding ({d},), got {p.shape} and {e.shape}"
                )
            if r.box is not None and len(r.box) != 4:
                raise ValueError(f"a face box is (x, y, w, h), got {r.box!r}")
            blobs.append((p.tobytes(), e.tobytes()))
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
        with self._write() as conn:
            old = {
                path: (iid, size, mtime)
                for iid, path, size, mtime in conn.execute(
                    sa.select(images.c.id, images.c.path, images.c.size, images.c.mtime).where(
                        images.c.path.in_(paths)
                    )
                )
            }
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
            ids = dict(
                conn.execute(sa.select(images.c.path, images.c.id).where(images.c.path.in_(paths))).all()
            )
            path_of = {image_id: path for path, image_id in ids.items()}
            self._upsert_rows(
                conn, faces, ["image_id", "number"], ["image_id", "number", "x", "y", "w", "h"],
                ["x", "y", "w", "h"],
                [(ids[path], number, *(r.box if r.box is not None else (None,) * 4)) for path, number, r in entries],
            )
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
            self._upsert_rows(
                conn, predictions, ["model_id", "face_id"], ["model_id", "face_id", "probs", "embedding"],
                ["probs", "embedding"],
                [(model_id, face_ids[path, number], pb, eb) for (path, number, _), (pb, eb) in zip(entries, blobs)],
            )
            if described:  # other models' snapshots carry these descriptors too: they are now stale
                described_ids = [face_ids[key] for key in described]
                touched |= set(conn.execute(sa.select(predictions.c.model_id)
                                            .where(predictions.c.face_id.in_(described_ids)).distinct()).scalars())
            self._upsert_rows(conn, identities, ["face_id"], ["face_id", "descriptor"], ["descriptor"],
                              [(face_ids[key], blob) for key, blob in described.items()])
            conn.execute(sa.delete(failures_table).where(failures_table.c.path.in_(paths)))
            labelled = {ids[p]: r.labels for p, r in files.items() if r.labels is not None}
            if labelled:
                if label_names is None:
                    raise ValueError("rows carry labels but write_batch got no label_names")
                self._store_labels(conn, label_names, labelled)
            self._bump(conn, touched)

    @staticmethod
    def _faces_of(conn: Connection, image_ids: list[int]) -> list[tuple[int, int, int]]:
        """``(face id, image id, number)`` of every face of these images."""
        rows: list[tuple[int, int, int]] = []
        for start in range(0, len(image_ids), 10_000):
            chunk = image_ids[start:start + 10_000]
            rows += [(int(f), int(i), int(n)) for f, i, n in conn.execute(
                sa.select(faces.c.id, faces.c.image_id, faces.c.number).where(faces.c.image_id.in_(chunk)))]
        return rows

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

    def _store_labels(self, conn: Connection, names: Sequence[str], by_id: Mapping[int, np.ndarray]) -> None:
        set_id = self._label_set_id(conn, names)
        rows = []
        for image_id, values in by_id.items():
            v = np.asarray(values)
            if v.shape != (len(names),):
                raise ValueError(f"labels of shape {v.shape} for {len(names)} attribute names")
            rows.append((image_id, set_id, (v > 0).astype(np.uint8).tobytes()))
        self._upsert_rows(conn, labels, ["image_id"], ["image_id", "label_set_id", "values"],
                          ["label_set_id", "values"], rows)

    def add_labels(self, attribute_names: Sequence[str], by_path: Mapping[str, np.ndarray]) -> int:
        """Store ground-truth labels for catalogued images; returns how many were stored.

        Paths not (yet) in the catalog are ignored. ``> 0`` means present (CelebA -1/1 or 0/1).
        """
        wanted = {normalize_path(p): v for p, v in by_path.items()}
        if not wanted:
            return 0
        stored = 0
        keys = list(wanted)
        with self._write() as conn:
            for start in range(0, len(keys), 10_000):
                chunk = keys[start:start + 10_000]
                ids = dict(
                    conn.execute(sa.select(images.c.path, images.c.id).where(images.c.path.in_(chunk))).all()
                )
                if ids:
                    self._store_labels(conn, attribute_names, {ids[p]: wanted[p] for p in ids})
                    stored += len(ids)
        return stored

    def record_failures(self, items: Iterable[tuple[str, str]]) -> None:
        """Record files that could not be indexed (one row per path; the newest reason wins)."""
        now = time.time()
        rows = {_storable_text(normalize_path(p)): str(reason) for p, reason in items}
        if not rows:
            return
        with self._write() as conn:
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
        with self._write() as conn:
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

    # ----------------------------------------------------------------------------- runs

    def start_run(self, model_id: int | None, root: str | os.PathLike[str]) -> int:
        """Record the start of an index run; earlier runs left 'running' become 'interrupted'.

        A run still 'running' in another live process on this host is left alone.
        """
        host, pid = socket.gethostname(), os.getpid()
        now = time.time()
        with self._write() as conn:
            stale = [
                r.id for r in conn.execute(
                    sa.select(runs.c.id, runs.c.host, runs.c.pid).where(runs.c.status == "running")
                )
                if not (r.host == host and r.pid is not None and r.pid != pid and _pid_alive(r.pid))
            ]
            if stale:
                conn.execute(
                    sa.update(runs).where(runs.c.id.in_(stale)).values(status="interrupted", finished=now)
                )
            return int(conn.execute(sa.insert(runs).values(
                model_id=model_id, root=normalize_path(root), started=now, status="running",
                counts={}, timings={}, host=host, pid=pid,
            )).inserted_primary_key[0])

    def finish_run(
        self,
        run_id: int,
        status: str,
        counts: Mapping[str, Any] | None = None,
        timings: Mapping[str, Any] | None = None,
    ) -> None:
        """Close a run with its final status ('finished', 'interrupted' or 'failed')."""
        if status not in RUN_STATUSES or status == "running":
            raise ValueError(f"status must be one of finished/interrupted/failed, not {status!r}")
        with self._write() as conn:
            conn.execute(sa.update(runs).where(runs.c.id == run_id).values(
                status=status, finished=time.time(), counts=dict(counts or {}), timings=dict(timings or {})
            ))

    def runs(self, limit: int | None = None) -> list[RunRecord]:
        """Index runs, newest first."""
        query = sa.select(runs).order_by(runs.c.id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            return [
                RunRecord(r.id, r.model_id, r.root, r.started, r.finished, r.status,
                          dict(r.counts or {}), dict(r.timings or {}))
                for r in conn.execute(query)
            ]

    def active_runs(self) -> list[RunRecord]:
        """Runs marked 'running' whose process still lives (runs on other hosts count as live)."""
        host = socket.gethostname()
        with self._read() as conn:
            rows = conn.execute(sa.select(runs).where(runs.c.status == "running").order_by(runs.c.id)).all()
        return [
            RunRecord(r.id, r.model_id, r.root, r.started, r.finished, r.status,
                      dict(r.counts or {}), dict(r.timings or {}))
            for r in rows
            if r.host != host or r.pid is None or _pid_alive(r.pid)
        ]

    # ----------------------------------------------------------------------------- reading

    def load_predictions(self, model_id: int) -> Predictions:
        """All of a model's predictions as arrays, ordered by image id."""
        return self.export(model_id)[1]

    def export(self, model_id: int) -> tuple[int, Predictions]:
        """``(stamp, predictions)`` read in one transaction, so the stamp describes exactly them."""
        k, d = self._model_dims(model_id)
        query = (
            sa.select(predictions.c.face_id, images.c.path, predictions.c.probs, predictions.c.embedding,
                      faces.c.image_id, faces.c.number, faces.c.x, faces.c.y, faces.c.w, faces.c.h)
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
            emb = np.empty((n, d), dtype=np.float32)
            image_ids = np.empty(n, dtype=np.int64)
            numbers = np.empty(n, dtype=np.int32)
            boxes = np.empty((n, 4), dtype=np.int32)
            paths: list[str] = []
            # The raw DBAPI cursor (same transaction) skips SQLAlchemy's per-row processing: 5x faster.
            compiled = query.compile(dialect=conn.dialect)
            params = compiled.construct_params()
            cursor = conn.connection.cursor()
            try:
                cursor.execute(str(compiled), tuple(params[p] for p in compiled.positiontup)
                               if conn.dialect.positional else params)
                at = 0
                while chunk := cursor.fetchmany(8192):
                    if at + len(chunk) > n:
                        raise CatalogError("predictions changed while being read; try again")
                    cid, cpath, cprobs, cemb, cimage, cnumber, *cbox = zip(*chunk)
                    sl = slice(at, at + len(chunk))
                    ids[sl] = cid
                    image_ids[sl] = cimage
                    numbers[sl] = cnumber
                    boxes[sl] = np.array([[-1 if v is None else v for v in col] for col in cbox], np.int64).T
                    paths.extend(cpath)
                    probs[sl] = np.frombuffer(b"".join(cprobs), dtype=np.float32).reshape(-1, k)
                    emb[sl] = np.frombuffer(b"".join(cemb), dtype=np.float32).reshape(-1, d)
                    at += len(chunk)
            finally:
                cursor.close()
            identity, has_identity = self._identities(conn, ids)
        if at != n:
            raise CatalogError("predictions changed while being read; try again")
        return int(stamp), Predictions(ids, paths, probs, emb, identity, has_identity, image_ids, numbers, boxes)

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
        got = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        at = np.searchsorted(ids, got)
        for (face_id, blob), i in zip(rows, at):
            if i < len(ids) and ids[i] == face_id:
                vectors[i] = np.frombuffer(blob, np.float32)
                mask[i] = True
        if not mask.any():
            return None, None
        return vectors, mask

    def identity_count(self) -> tuple[int, int]:
        """``(described, with_face)``: entries ``index --identity`` looked at, and those with a face."""
        with self._read() as conn:
            looked = int(conn.execute(sa.select(sa.func.count()).select_from(identities)).scalar() or 0)
            found = int(conn.execute(sa.select(sa.func.count()).select_from(identities)
                                     .where(identities.c.descriptor.is_not(None))).scalar() or 0)
        return looked, found

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

    def disk_bytes(self) -> int | None:
        """Size of the SQLite files (database + WAL) or of the PostgreSQL database; None in memory."""
        f = self.sqlite_file
        if f is None:
            if self._is_sqlite:
                return None
            with self._read() as conn:
                return int(conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar() or 0)
        return sum(p.stat().st_size for p in (f, f.with_name(f.name + "-wal")) if p.exists())


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


def _reason(err: sa.exc.DBAPIError) -> str:
    return str(getattr(err, "orig", err)).splitlines()[0]
