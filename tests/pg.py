"""A real PostgreSQL server for the test suite: initdb + pg_ctl into a temporary folder.

    server = PgServer.start()          # or the session fixture ``pg_server`` (tests/conftest.py)
    url = server.create_database()     # a fresh, empty database: postgresql+psycopg://...
    ...
    server.stop()

The server listens only on a unix socket inside its own folder (no TCP port, so parallel xdist
workers never collide), trusts local connections, and runs with fsync off: the tests kill clients,
never the server, so durability against power loss is not what they measure. PostgreSQL refuses
to run as root; as root (CI) the server runs as the ``postgres`` user through ``runuser``.
``unavailable()`` says why no server can be started here (the only reason to skip).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

BIN_GLOB = "/usr/lib/postgresql/*/bin"
RUN_AS = "postgres"  # the account the Debian package creates


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` holding initdb and pg_ctl, else one on PATH."""
    found = [Path(d) for d in glob.glob(BIN_GLOB) if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists()]
    if found:
        return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def _run_as() -> str | None:
    """The user to run the server as: None for the current (non-root) user, else ``postgres``."""
    return RUN_AS if os.geteuid() == 0 else None


def unavailable() -> str | None:
    """Why a server cannot be started here (None when it can)."""
    if find_bindir() is None:
        return ("PostgreSQL binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin or on PATH: "
                "apt-get install postgresql")
    if _run_as() is not None:
        import pwd

        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return f"running as root and there is no {RUN_AS!r} user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser (util-linux) is missing"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed: pip install -e '.[postgres]'"
    return None


class PgServer:
    """One running PostgreSQL cluster; ``create_database()`` hands out fresh databases."""

    def __init__(self, root: Path, bindir: Path, user: str | None) -> None:
        self.root = root          # holds data/, the socket and the log
        self.bindir = bindir
        self._user = user

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, *, settings: dict[str, str] | None = None) -> "PgServer":
        """initdb a new cluster in a fresh /tmp folder and start it (waits until it accepts).

        ``settings`` are extra server parameters (``-c name=value``), e.g. to restore
        ``fsync=on`` for a benchmark.
        """
        reason = unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        bindir, user = find_bindir(), _run_as()
        assert bindir is not None
        # /tmp, short name: a unix socket path must stay under ~107 bytes.
        root = Path(tempfile.mkdtemp(prefix="ffpg-", dir="/tmp"))
        if user is not None:
            shutil.chown(root, user=user)
        server = cls(root, bindir, user)
        server._cmd("initdb", "-D", str(root / "data"), "-U", "postgres", "--auth=trust", "--no-sync",
                    "-E", "UTF8", "--locale=C")
        params = {"listen_addresses": "''", "unix_socket_directories": str(root), "fsync": "off",
                  "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "300",
                  **(settings or {})}
        opts = " ".join(f"-c {k}={v}" for k, v in params.items())
        server._cmd("pg_ctl", "-D", str(root / "data"), "-l", str(root / "server.log"), "-o", opts,
                    "-w", "-t", "60", "start")
        return server

    def stop(self) -> None:
        """Stop the server (immediate mode) and delete its folder."""
        try:
            self._cmd("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _cmd(self, tool: str, *args: str) -> None:
        argv = [str(self.bindir / tool), *args]
        if self._user is not None:
            argv = ["runuser", "-u", self._user, "--", *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=self.root)
        if proc.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr.strip()}\n{tail}")

    # ------------------------------------------------------------------ databases

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` on this server (psycopg 3, over the unix socket)."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.root}"

    def conninfo(self, database: str = "postgres") -> str:
        """The libpq connection string of ``database`` (for psycopg.connect)."""
        return f"host={self.root} user=postgres dbname={database}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a random name by default); return its SQLAlchemy URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting whoever is still connected to it."""
        import psycopg

        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Backend:
    """The catalog a parametrised test runs against: ``sqlite`` (the index folder's own file) or
    ``postgresql`` (one fresh database on the session's server, named by ``$FACEFIND_DB``).

    With PostgreSQL every index folder of the test shares that one database, as it would for a
    user who sets FACEFIND_DB; tests that need two separate catalogs pass ``url`` explicitly.
    """

    def __init__(self, name: str, url: str | None) -> None:
        self.name = name
        self.url = url
        self._engines: dict[str, object] = {}

    @property
    def is_sqlite(self) -> bool:
        return self.url is None

    def url_for(self, index_dir: Path) -> str:
        """The catalog URL facefind uses for ``index_dir`` under this backend."""
        return self.url or f"sqlite:///{Path(index_dir).resolve() / 'catalog.db'}"

    def env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` for a subprocess: FACEFIND_DB set to this backend's URL (or removed)."""
        env = dict(env)
        env.pop("FACEFIND_DB", None)
        if self.url is not None:
            env["FACEFIND_DB"] = self.url
        return env

    def scalar(self, index_dir: Path, sql: str) -> int:
        """One integer from the catalog, read outside facefind (0 before the schema exists).

        Safe to poll while another process writes: SQLite through the stdlib (read-only), the
        server through one pooled SQLAlchemy engine.
        """
        if self.url is None:
            import contextlib
            import sqlite3

            db = Path(index_dir) / "catalog.db"
            if not db.exists():
                return 0
            try:
                with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:  # `with conn` alone never closes
                    return int(conn.execute(sql).fetchone()[0])
            except sqlite3.OperationalError:  # schema not created yet
                return 0
        import sqlalchemy as sa

        engine = self._engines.get(self.url)
        if engine is None:
            engine = self._engines[self.url] = sa.create_engine(self.url, pool_size=1)
        try:
            with engine.connect() as conn:  # type: ignore[attr-defined]
                return int(conn.exec_driver_sql(sql).scalar() or 0)
        except sa.exc.ProgrammingError:  # schema not created yet
            return 0

    def rows(self, index_dir: Path, sql: str) -> list[tuple]:
        """All rows of ``sql`` (no parameters), read outside facefind."""
        import sqlalchemy as sa

        engine = sa.create_engine(self.url_for(index_dir))
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.exec_driver_sql(sql)]
        finally:
            engine.dispose()

    def close(self) -> None:
        for engine in self._engines.values():
            engine.dispose()  # type: ignore[attr-defined]
        self._engines.clear()
