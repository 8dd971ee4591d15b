"""What the catalog records about index runs in progress: the runs, and publish holds.

A run row is written when ``facefind index`` starts and closed when it ends; one left 'running'
by a process that no longer lives was interrupted. A publish hold marks a sharded build in
progress: while it stands, queries keep the last published snapshot instead of rebuilding one
from a catalog that only some shards have filled.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from facefind.db.backend import Database
from facefind.db.errors import CatalogError
from facefind.db.paths import normalize_path
from facefind.db.process import pid_alive
from facefind.db.schema import meta_table, runs

RUN_STATUSES = ("running", "finished", "interrupted", "failed")


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


class RunLog(Database):
    """Index runs and publish holds, in the catalog's database (``Catalog`` is one)."""

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
                if not (r.host == host and r.pid is not None and r.pid != pid and pid_alive(r.pid))
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
        with self._write(shared=True) as conn:  # its own row only
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
            if r.host != host or r.pid is None or pid_alive(r.pid)
        ]

    def hold_publish(self, model_id: int, detail: Mapping[str, Any]) -> None:
        """Hold back snapshot rebuilds of ``model_id`` until ``release_publish`` (idempotent).

        Shards starting together all call this: an equal hold is left alone, and a write that
        loses a race to another shard's (a serialisation failure on PostgreSQL) is tried again.
        """
        key, value = _hold_key(model_id), json.dumps(dict(detail), sort_keys=True)
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
                meta_table.c.key == _hold_key(model_id))).scalar()
        return None if value is None else dict(json.loads(value))

    def release_publish(self, model_id: int) -> None:
        """End the hold: the next snapshot sync publishes what the catalog holds."""
        with self._write() as conn:
            conn.execute(sa.delete(meta_table).where(meta_table.c.key == _hold_key(model_id)))


def _hold_key(model_id: int) -> str:
    return f"publish_hold:{int(model_id)}"
