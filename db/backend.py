"""The catalog's database: one SQLAlchemy URL, SQLite or PostgreSQL, and its transactions.

Write transactions are short and serialised, so concurrent writers queue instead of failing, and
readers never see half a batch:

    SQLite       writers take the write lock up front (``BEGIN IMMEDIATE``) and wait behind
                 ``busy_timeout``; readers run in WAL snapshots.
    PostgreSQL   (``postgresql+psycopg://``, the ``postgres`` extra) writers run at READ COMMITTED
                 and first take one transaction-scoped advisory lock, waiting up to
                 ``lock_timeout``. By default it is exclusive (``pg_advisory_xact_lock``): the
                 one-writer-at-a-time model, for schema changes, models, runs and publish holds.
                 Batches of rows (``_write(shared=True)``: ``write_batch``, failures, prunes) take
                 it shared, so the writers of a sharded run write at once: each locks only the
                 rows it writes (shards hold different files, so no two wait for each other's
                 rows, and PostgreSQL ends any deadlock with an error), and the generation bump,
                 an UPDATE of the model's row, makes a second writer wait only for the first's
                 commit. Readers run at REPEATABLE READ, one consistent view per read transaction.

Database errors leave ``Database._write`` and ``_read`` as a CatalogError that says what to check.
``Database`` knows no tables: facefind.db.schema declares them, facefind.db.catalog uses them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from facefind.db.errors import CatalogError
from facefind.db.schema import lock_writers, reason

BUSY_TIMEOUT_S = 60.0
PAGE_SIZE = 16384
COPY_MIN_ROWS = 32  # PostgreSQL: from this many rows an upsert goes through COPY (3 round trips, not N)
IN_CHUNK = 10_000   # values per membership query (SQLite allows 32,766 parameters)

_Self = TypeVar("_Self", bound="Database")


class Database:
    """The engines behind one SQLAlchemy URL: a writer (serialised) and a reader (snapshots).

    Safe to share between threads; each transaction is a ``with self._write()`` or ``self._read()``.
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
        self._sql_cache: dict[tuple[Any, ...], tuple[str, tuple[str, ...] | None]] = {}
        self._copy_cache: dict[tuple[Any, ...], tuple[str, str, str, list[int]]] = {}
        self._type_cache: dict[tuple[str, tuple[str, ...]], list[int]] = {}
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
                if writer:
                    # As SQLite's synchronous=NORMAL in WAL mode: a commit returns before its WAL
                    # reaches the disk. A killed client loses nothing it was told is committed; a
                    # server or OS crash can lose the last commits (never consistency), which
                    # the indexer redoes. Waiting for the flush cost 2/3 of a batch's time.
                    cur.execute("SET synchronous_commit = off")
            dbapi_conn.commit()

        return engine

    @contextlib.contextmanager
    def _write(self, *, shared: bool = False) -> Iterator[Connection]:
        """One write transaction; database errors become a CatalogError that says what to check.

        PostgreSQL: ``shared`` writers run beside each other, the others alone (see the module
        docstring). SQLite has one writer at a time whatever is asked.
        """
        try:
            with self._writer.begin() as conn:
                if not self._is_sqlite:
                    lock_writers(conn, shared=shared)
                yield conn
        except sa.exc.OperationalError as err:
            raise CatalogError(f"cannot write to the catalog {self._where()}: {reason(err)}; "
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
            raise CatalogError(f"cannot read the catalog {self._where()}: {reason(err)}"
                               + ("" if self._is_sqlite else f"; {self._hint()}")) from None
        except Exception as err:
            if self._damaged(err):
                raise CatalogError(self._damage_message(err)) from None
            if isinstance(err, self._reader.dialect.loaded_dbapi.OperationalError):  # raw, from export's cursor
                raise CatalogError(f"cannot read the catalog {self._where()}: {reason(err)}") from None
            raise

    def _damaged(self, err: Exception) -> bool:
        """Whether ``err`` is the DBAPI's plain DatabaseError (SQLite: 'database disk image is
        malformed'), wrapped by SQLAlchemy or raw from a cursor (``export`` reads through one).
        Its subclasses (integrity, programming errors) are bugs and keep their traceback."""
        orig = err.orig if isinstance(err, sa.exc.DBAPIError) else err
        return type(orig) is getattr(self._reader.dialect.loaded_dbapi, "DatabaseError", None)

    def _damage_message(self, err: Exception) -> str:
        return (f"the catalog {self._where()} is damaged ({reason(err)}): run `facefind check` to see "
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


    def close(self) -> None:
        """Release all connections (the catalog can be reopened later)."""
        self._writer.dispose()
        if self._reader is not self._writer:
            self._reader.dispose()

    def __enter__(self: _Self) -> _Self:
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
            insert = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}[backend]
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
        """Upsert ``rows`` (tuples in ``columns`` order): a row whose ``keys`` exist updates ``update``;
        the same key twice: the last row wins. PostgreSQL takes a large batch by binary COPY."""
        if not rows:
            return
        if self._is_sqlite or len(rows) < COPY_MIN_ROWS:
            self._executemany(conn, self._upsert(table, keys, columns, update), columns, rows)
        else:
            self._copy_upsert(conn, table, keys, columns, update, rows)

    def _insert_rows(self, conn: Connection, table: sa.Table, columns: Sequence[str],
                     rows: list[tuple[Any, ...]]) -> None:
        """Insert rows that cannot exist yet (they belong to rows this transaction created): no
        conflict handling, and on PostgreSQL a binary COPY straight into the table."""
        if not rows:
            return
        if self._is_sqlite or len(rows) < COPY_MIN_ROWS:
            key = ("insert", table.name, tuple(columns))
            if key not in self._sql_cache:
                compiled = sa.insert(table).values({c: sa.bindparam(c) for c in columns}).compile(
                    dialect=self._writer.dialect)
                order = tuple(compiled.positiontup) if self._writer.dialect.positional else None
                if order is not None and order != tuple(columns):
                    raise AssertionError(f"unexpected parameter order {order}")
                self._sql_cache[key] = (str(compiled), order)
            self._executemany(conn, self._sql_cache[key], columns, rows)
            return
        types = self._pg_types(conn, table.name, columns)
        cursor = conn.connection.cursor()
        try:
            with cursor.copy(f"COPY {self._quoted([table.name])} ({self._quoted(columns)}) FROM STDIN "
                             "(FORMAT BINARY)") as copy:
                copy.set_types(types)
                for row in rows:
                    copy.write_row(row)
        finally:
            cursor.close()

    def _quoted(self, names: Sequence[str]) -> str:
        """``names`` as SQL identifiers, comma-separated (quoted where a name is a keyword)."""
        return ", ".join(self._writer.dialect.identifier_preparer.quote(n) for n in names)

    def _pg_types(self, conn: Connection, table: str, columns: Sequence[str]) -> list[int]:
        """The type oids of these columns of a PostgreSQL table (what a binary COPY must send)."""
        key = (table, tuple(columns))
        if key not in self._type_cache:
            found = dict(conn.exec_driver_sql(
                "SELECT attname, atttypid FROM pg_attribute WHERE attrelid = CAST(%s AS regclass) AND attnum > 0",
                (table,)).all())
            self._type_cache[key] = [int(found[c]) for c in columns]
        return self._type_cache[key]

    def _copy_upsert(self, conn: Connection, table: sa.Table, keys: Sequence[str],
                     columns: Sequence[str], update: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        """PostgreSQL: binary COPY into a session-private staging table, then one INSERT ... SELECT
        ... ON CONFLICT. One round trip of data instead of one statement per row (5x faster)."""
        at = [list(columns).index(k) for k in keys]
        # ON CONFLICT may touch a row only once: the last row of a key wins, as row by row. The
        # order stays the caller's, so new rows get ids in that order.
        ordered = list({tuple(r[i] for i in at): r for r in rows}.values())
        stage, create, insert, types = self._copy_sql(conn, table, keys, columns, update)
        cursor = conn.connection.cursor()
        try:
            cursor.execute(create)
            with cursor.copy(f"COPY {stage} ({self._quoted(columns)}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(types)
                for row in ordered:
                    copy.write_row(row)
            cursor.execute(insert)
            cursor.execute(f"DELETE FROM {stage}")  # a second upsert in this transaction starts empty
        finally:
            cursor.close()

    def _copy_sql(self, conn: Connection, table: sa.Table, keys: Sequence[str], columns: Sequence[str],
                  update: Sequence[str]) -> tuple[str, str, str, list[int]]:
        """(staging table, its CREATE, the INSERT from it, the columns' type oids), made once.

        The staging table lives as long as the connection and is emptied at every commit; its
        columns are the target's, without constraints or defaults (a serial default would use up ids).
        """
        cache_key = ("copy", table.name, tuple(keys), tuple(columns), tuple(update))
        if cache_key not in self._copy_cache:
            stage = f"facefind_stage_{table.name}_{len(self._copy_cache)}"
            q = self._writer.dialect.identifier_preparer.quote  # names that are SQL keywords (labels.values)
            name, cols = q(table.name), ", ".join(q(c) for c in columns)
            # toast_tuple_target: rows up to a page stay whole (no compression tried, no TOAST table).
            create = (f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage} WITH (toast_tuple_target = 8160) "
                      f"ON COMMIT DELETE ROWS AS SELECT {cols} FROM {name} WITH NO DATA")
            conflict = (f"DO UPDATE SET {', '.join(f'{q(c)} = EXCLUDED.{q(c)}' for c in update)}" if update
                        else "DO NOTHING")
            insert = (f"INSERT INTO {name} ({cols}) SELECT {cols} FROM {stage} "
                      f"ON CONFLICT ({', '.join(q(k) for k in keys)}) {conflict}")
            self._copy_cache[cache_key] = (stage, create, insert, self._pg_types(conn, table.name, columns))
        return self._copy_cache[cache_key]

    def _rows_in(self, conn: Connection, sql: str, values: Sequence[Any]) -> list[tuple[Any, ...]]:
        """The rows of ``sql`` (a SELECT, or a DELETE: none), whose ``{in}`` stands for "is one of
        ``values``", run in chunks.

        Plain SQL with one parameter per value (SQLite) or one array (PostgreSQL): building the
        same through SQLAlchemy's ``in_`` costs more than running it, at a few hundred values.
        """
        rows: list[tuple[Any, ...]] = []
        for start in range(0, len(values), IN_CHUNK):
            chunk = list(values[start:start + IN_CHUNK])
            if self._is_sqlite:
                text, params = sql.format(**{"in": f"IN ({', '.join('?' * len(chunk))})"}), tuple(chunk)
            else:
                text, params = sql.format(**{"in": "= ANY(%s)"}), (chunk,)
            result = conn.exec_driver_sql(text, params)
            if result.returns_rows:
                rows += [tuple(r) for r in result]
        return rows


    def disk_bytes(self) -> int | None:
        """Size of the SQLite files (database + WAL) or of the PostgreSQL database; None in memory."""
        f = self.sqlite_file
        if f is None:
            if self._is_sqlite:
                return None
            with self._read() as conn:
                return int(conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar() or 0)
        return sum(p.stat().st_size for p in (f, f.with_name(f.name + "-wal")) if p.exists())

