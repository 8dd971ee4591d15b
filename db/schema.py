"""The catalog's schema: its tables as SQLAlchemy 2 Core, the schema version, and the upgrades.

    meta         key/value: schema version, a random catalog id (so a snapshot can tell that
                 the catalog it came from was replaced), publish holds (facefind.db.runs)
    images       one row per file: normalised absolute path (unique), size, mtime, width, height
    faces        one row per index entry (schema v3): the file, the face's number in it (0 = the
                 largest) and its box in the decoded image; no box: the whole file is the entry
                 (a CelebA-style crop). Users, snapshots and FAISS refer to entries by face id
    models       one row per checkpoint (sha256 unique) with its attribute names, thresholds,
                 embedding size and a ``generation`` counter bumped by every transaction that
                 changes the model's predictions; snapshots compare it to know they are current
    predictions  per (model, face): K float32 probabilities and a D-dimensional embedding as BLOBs.
                 Since v4 new rows carry the embedding as float16 (2*D bytes: the model's output,
                 not normalised, rounded); rows written before keep float32 (4*D bytes) and are not
                 rewritten: readers tell the two apart by length (Catalog.export, `facefind check`)
    label_sets   one row per distinct list of ground-truth attribute names
    labels       per image: uint8 0/1 values in the order of its label set (they describe a
                 whole-file entry, so only faces without a box carry them into queries), and the
                 image's split (0 train, 1 val, 2 test) when the folder had a partition file
    identities   per face: its 128-D dlib identity descriptor, float32 BLOB, NULL when
                 ``index --identity`` found no face in a whole-file entry (looked, none there)
    persons      (v5) one row per person ``facefind people`` found: id (never reused), its name
    person_faces (v5) per face: its person (a face with a descriptor but no row: not grouped yet)
    person_constraints, person_constraint_faces  (v5) the user's corrections, kept by every
                 regroup: kind 'same' (a merge: its faces stay together) or 'apart' (a split: the
                 faces of side 0 never share a person with those of side 1)
    failures     files that could not be indexed, with the reason (cleared when a file succeeds)
    runs         index runs: root, start/finish time, status, counts and stage timings

The schema lives here, once; ``SCHEMA_VERSION`` numbers it (the names the query path reads
without SQLAlchemy come from facefind.db.names). ``open_schema`` creates it in a new catalog and
upgrades an older one by the steps in ``MIGRATIONS`` (one transaction, DDL included, on both
backends); see ``MIGRATIONS`` for how to add a step. Alembic is not used: the steps are a few lines
each, need no revision files or env.py, and must run inside the catalog's own locked transaction.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from facefind.db import names
from facefind.db.errors import CatalogError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5
PG_WRITE_LOCK = 0x66616365  # the advisory lock key writers hold (b"face"), one per database
IDENTITY_DIM = 128  # dlib's face descriptor (facefind.indexer.faces.identity.DIM; db imports nothing of ours)

metadata = sa.MetaData()

meta_table = sa.Table(
    names.META,
    metadata,
    sa.Column(names.META_KEY, sa.String(64), primary_key=True),
    sa.Column(names.META_VALUE, sa.Text, nullable=False),
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
    names.MODELS,
    metadata,
    sa.Column(names.MODEL_ID, sa.Integer, primary_key=True),
    sa.Column(names.MODEL_SHA256, sa.String(64), nullable=False, unique=True),
    sa.Column("arch", sa.String(128), nullable=False),
    sa.Column("attributes", sa.JSON, nullable=False),
    sa.Column("thresholds", sa.JSON, nullable=False),
    sa.Column("embedding_dim", sa.Integer, nullable=False),
    sa.Column(names.MODEL_CHECKPOINT, sa.Text),
    sa.Column("meta", sa.JSON),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column(names.MODEL_GENERATION, sa.BigInteger, nullable=False, server_default="0"),
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
    names.PREDICTIONS,
    metadata,
    sa.Column(names.PREDICTION_MODEL, sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("face_id", sa.Integer, sa.ForeignKey("faces.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("probs", sa.LargeBinary, nullable=False),
    sa.Column("embedding", sa.LargeBinary, nullable=False),
    sa.Index("ix_predictions_face", "face_id"),
    # A float32 row (~2.2 KB at D = 512) is just over PostgreSQL's TOAST threshold (~2 KB): without
    # this each embedding is tried for compression (random floats never compress) and moved to a
    # TOAST table, which cost a third of the server's time per row. Up to a page, rows now stay
    # whole (float16 rows, ~1.2 KB, are under the threshold anyway, unless D is above ~900).
    postgresql_with={"toast_tuple_target": 8160},
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
    sa.Column("split", sa.SmallInteger),  # v4: 0 train, 1 val, 2 test (the partition file); NULL: none
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

# Persons (schema v5, facefind.db.people). Ids are never reused: ``person:12`` keeps meaning the
# same person as long as it exists.
persons = sa.Table(
    "persons",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text),
    sa.Column("created", sa.Float, nullable=False),
    sqlite_autoincrement=True,
)

person_faces = sa.Table(
    "person_faces",
    metadata,
    sa.Column("face_id", sa.Integer, sa.ForeignKey("faces.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("person_id", sa.Integer, sa.ForeignKey("persons.id", ondelete="CASCADE"), nullable=False),
    sa.Index("ix_person_faces_person", "person_id"),
)

person_constraints = sa.Table(
    "person_constraints",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(8), nullable=False),  # 'same' (merge) or 'apart' (split)
    sa.Column("created", sa.Float, nullable=False),
    sa.CheckConstraint("kind IN ('same', 'apart')", name="ck_person_constraints_kind"),
    sqlite_autoincrement=True,
)

person_constraint_faces = sa.Table(
    "person_constraint_faces",
    metadata,
    sa.Column("constraint_id", sa.Integer, sa.ForeignKey("person_constraints.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("face_id", sa.Integer, sa.ForeignKey("faces.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("side", sa.SmallInteger, nullable=False, server_default="0"),
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


def _v3_to_v4(conn: Connection) -> None:
    """v4: ``labels.split``, the dataset split of an annotated image (``split:`` in queries).
    Existing rows get NULL: re-index the folder to record it. New predictions also store their
    embedding as float16; the float32 ones already there stay as they are (no table rewrite)."""
    add_columns(conn, labels, "split")


MIGRATIONS[3] = _v3_to_v4


def _v4_to_v5(conn: Connection) -> None:
    """v5: persons, their faces and the user's corrections (``facefind people``)."""
    metadata.create_all(conn, tables=[persons, person_faces, person_constraints, person_constraint_faces])


MIGRATIONS[4] = _v4_to_v5


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
        return int(meta.get(names.SCHEMA_VERSION_KEY, 0))
    except ValueError:
        return 0


def open_schema(reader: Engine, writer: Engine, *, create: bool, where: str, hint: str) -> str:
    """Check (and when ``create``, create) the schema of the catalog behind these engines,
    upgrading an older one; return its catalog id. ``where`` names the catalog in messages, ``hint``
    says what to check when it cannot be opened."""
    try:
        with reader.begin() as conn:
            have = read_meta(conn)
        if have is None and create:
            with writer.begin() as conn:  # serialised: concurrent creators wait here
                lock_writers(conn)
                metadata.create_all(conn, checkfirst=True)
                have = read_meta(conn)
                if have is None:
                    have = {names.SCHEMA_VERSION_KEY: str(SCHEMA_VERSION), names.CATALOG_ID: uuid.uuid4().hex}
                    conn.execute(sa.insert(meta_table), [{"key": k, "value": v} for k, v in have.items()])
        if have is not None and _version(have) < SCHEMA_VERSION and _version(have) in MIGRATIONS:
            have = _upgrade(reader, writer, where)
    except sa.exc.DatabaseError as err:
        raise CatalogError(f"cannot open the catalog {where}: {reason(err)}; {hint}") from None
    if have is None:
        raise CatalogError(f"{where} is not a facefind catalog (no schema); "
                           "run `facefind index DIR` to create one")
    version = _version(have)
    if version > SCHEMA_VERSION:
        raise CatalogError(
            f"the catalog {where} has schema version {version}, written by a newer facefind "
            f"(this one reads up to {SCHEMA_VERSION}): upgrade facefind (pip install -U facefind)")
    if version != SCHEMA_VERSION:
        raise CatalogError(
            f"the catalog {where} has schema version {have.get(names.SCHEMA_VERSION_KEY)}, which this "
            f"facefind cannot upgrade to {SCHEMA_VERSION}: re-index into a new --index folder")
    return have[names.CATALOG_ID]


def _upgrade(reader: Engine, writer: Engine, where: str) -> dict[str, str]:
    """Apply the pending ``MIGRATIONS`` steps in one write transaction; return the new meta.

    Under the writer lock, so two processes opening an old catalog at once upgrade it once.
    """
    try:
        with writer.begin() as conn:
            lock_writers(conn)
            have = read_meta(conn) or {}
            start = version = _version(have)
            while version < SCHEMA_VERSION and version in MIGRATIONS:
                MIGRATIONS[version](conn)
                version += 1
            if version != start:
                conn.execute(sa.update(meta_table).where(meta_table.c.key == names.SCHEMA_VERSION_KEY)
                             .values(value=str(version)))
                log.warning("upgraded the catalog %s from schema version %d to %d", where, start, version)
            return {**have, names.SCHEMA_VERSION_KEY: str(version)}
    except sa.exc.OperationalError as err:
        with reader.begin() as conn:
            now = _version(read_meta(conn) or {})
        raise CatalogError(
            f"the catalog {where} has schema version {now} and must be upgraded to {SCHEMA_VERSION}, but "
            f"cannot be written ({reason(err)}): run `facefind check --repair` as a user who can write it") from None


def lock_writers(conn: Connection, *, shared: bool = False) -> None:
    """PostgreSQL: take the catalog's advisory write lock until the transaction ends (shared:
    beside other shared holders; exclusive: alone). Schema changes hold it exclusively."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock{'_shared' if shared else ''}({PG_WRITE_LOCK})")


def read_meta(conn: Connection) -> dict[str, str] | None:
    """The meta table's rows as a dict; None when the database holds no facefind schema."""
    if not sa.inspect(conn).has_table(names.META):
        return None
    have = dict(conn.execute(sa.select(meta_table.c.key, meta_table.c.value)).all())
    return have or None


def reason(err: sa.exc.DBAPIError) -> str:
    """The first line of the database's own message."""
    return str(getattr(err, "orig", err)).splitlines()[0]
