"""Durable job records: SQLite (WAL, one service) or PostgreSQL (several service replicas).

One table. A job's life: `queued` -> `running` (claimed by a dispatcher, which hands it to
Ray under the submission id `specmill-<id>-<attempt>`) -> `succeeded` | `failed` |
`cancelled`. The submission id is fixed before the job is submitted, so a service that dies
between claiming and submitting finds the job again and submits it exactly once (Ray refuses
a second submission under the same id). State changes that race (two replicas, a cancel
during a dispatch) are compare-and-set updates or run under the dispatch lock
(`BEGIN IMMEDIATE` in SQLite, a transaction-scoped advisory lock in PostgreSQL).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.service.settings import redact_url

log = logging.getLogger("specmill.service.store")

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")
_DISPATCH_LOCK = 0x5BEC_0001  # PostgreSQL advisory lock key

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    idempotency_key TEXT,
    request_sha256 TEXT NOT NULL,
    spec TEXT NOT NULL,
    out_dir TEXT NOT NULL,
    state TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 0,
    submitted INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    report TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    UNIQUE (owner, idempotency_key)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created_at);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, created_at);
"""


class StoreError(RuntimeError):
    """The database cannot be opened or used."""


class OutDirInUse(ValueError):
    """Another job writes (or wrote) the same output directory."""


@dataclass(kw_only=True, slots=True)
class JobRow:
    id: str
    owner: str
    idempotency_key: str | None
    request_sha256: str
    spec: dict[str, Any]
    out_dir: str
    state: str
    cancel_requested: bool
    attempt: int
    submitted: bool
    error: str | None
    report: dict[str, Any] | None
    created_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def submission_id(self) -> str:
        """The Ray job this attempt runs as; one per attempt, fixed before it is submitted."""
        return f"specmill-{self.id}-{self.attempt}"

    @classmethod
    def from_db(cls, row: Any) -> JobRow:
        d = dict(row)
        d["spec"] = json.loads(d["spec"])
        d["report"] = json.loads(d["report"]) if d["report"] else None
        d["cancel_requested"], d["submitted"] = bool(d["cancel_requested"]), bool(d["submitted"])
        return cls(**d)


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


class JobStore:
    """Thread-safe: one connection per thread (FastAPI runs sync routes on a thread pool)."""

    def __init__(self, url: str):
        self.url = url
        self.kind = "postgresql" if url.startswith(("postgresql://", "postgres://")) else "sqlite"
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()
        if self.kind == "sqlite":
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        with self.tx() as cur:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                cur.execute(statement)
        log.info("job store: %s", redact_url(url))

    # ----------------------------------------------------------------- connections

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _connect(self) -> Any:
        if self.kind == "sqlite":
            path = self.url.removeprefix("sqlite:///")
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a committed submit survives power loss
            conn.execute("PRAGMA busy_timeout=30000")
            return conn
        import psycopg
        from psycopg.rows import dict_row

        try:
            return psycopg.connect(self.url, autocommit=True, row_factory=dict_row)
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to {redact_url(self.url)}: {e}") from None

    @contextmanager
    def tx(self, *, exclusive: bool = False) -> Iterator[Any]:
        """A transaction; `exclusive` also takes the dispatch lock (one dispatcher at a time)."""
        conn = self._conn()
        if self.kind == "sqlite":
            conn.execute("BEGIN IMMEDIATE")  # writers queue here instead of failing on upgrade
            cur = _SqliteCursor(conn)
            try:
                yield cur
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return
        with conn.transaction():
            cur = _PgCursor(conn)
            if exclusive:
                cur.execute("SELECT pg_advisory_xact_lock(?)", (_DISPATCH_LOCK,))
            yield cur

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    # ----------------------------------------------------------------- queries

    def create(self, *, owner: str, idempotency_key: str | None, request_sha256: str, spec: dict[str, Any],
               out_dir: str, job_id: str) -> tuple[JobRow, bool]:
        """Insert a queued job; with a key already used by this owner, the earlier job and False."""
        with self.tx(exclusive=True) as cur:
            if idempotency_key is not None:
                cur.execute("SELECT * FROM jobs WHERE owner = ? AND idempotency_key = ?", (owner, idempotency_key))
                if (row := cur.fetchone()) is not None:
                    return JobRow.from_db(row), False
            cur.execute("SELECT id, owner, state FROM jobs WHERE out_dir = ? AND (owner <> ? OR state IN (?, ?))",
                        (out_dir, owner, *ACTIVE))
            if (other := cur.fetchone()) is not None:
                whose = "another user's job" if other["owner"] != owner else f"job {other['id']} ({other['state']})"
                raise OutDirInUse(f"out {out_dir} is used by {whose}; choose another directory")
            cur.execute("INSERT INTO jobs (id, owner, idempotency_key, request_sha256, spec, out_dir, state, "
                        "created_at) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?)",
                        (job_id, owner, idempotency_key, request_sha256, json.dumps(spec), out_dir, time.time()))
        return self.get(job_id), True

    def get(self, job_id: str) -> JobRow | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return JobRow.from_db(rows[0]) if rows else None

    def by_key(self, owner: str, idempotency_key: str) -> JobRow | None:
        rows = self._query("SELECT * FROM jobs WHERE owner = ? AND idempotency_key = ?", (owner, idempotency_key))
        return JobRow.from_db(rows[0]) if rows else None

    def list(self, *, owner: str | None, state: str | None = None, limit: int = 100, offset: int = 0) -> list[JobRow]:
        where, args = [], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self._query(sql + " ORDER BY created_at DESC, id LIMIT ? OFFSET ?", (*args, limit, offset))
        return [JobRow.from_db(r) for r in rows]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for row in self._query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            counts[row["state"]] = int(row["n"])
        return counts

    def active(self) -> list[JobRow]:
        return [JobRow.from_db(r) for r in self._query("SELECT * FROM jobs WHERE state = 'running' ORDER BY "
                                                      "started_at, id")]

    def request_cancel(self, job_id: str) -> JobRow:
        """A queued job is cancelled at once; a running one is flagged for the dispatcher to stop."""
        with self.tx() as cur:
            cur.execute("UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_at = ? "
                        "WHERE id = ? AND state = 'queued'", (time.time(), job_id))
            cur.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state = 'running'", (job_id,))
        return self.get(job_id)

    def claim(self, limit: int) -> list[JobRow]:
        """Move the oldest queued jobs to running, keeping at most `limit` running in all."""
        with self.tx(exclusive=True) as cur:
            cur.execute("SELECT COUNT(*) AS n FROM jobs WHERE state = 'running'")
            free = limit - int(cur.fetchone()["n"])
            if free <= 0:
                return []
            cur.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at, id LIMIT ?", (free,))
            ids = [r["id"] for r in cur.fetchall()]
            for job_id in ids:
                cur.execute("UPDATE jobs SET state = 'running', attempt = 1, submitted = 0, started_at = ? "
                            "WHERE id = ? AND state = 'queued'", (time.time(), job_id))
        return [row for job_id in ids if (row := self.get(job_id)) is not None]

    def mark_submitted(self, job: JobRow) -> bool:
        return self._cas(job, "submitted = 1")

    def next_attempt(self, job: JobRow) -> bool:
        """The cluster lost the job (a new cluster): run it again; it resumes from its committed output."""
        return self._cas(job, "attempt = attempt + 1, submitted = 0")

    def finish(self, job: JobRow, state: str, *, error: str | None = None,
               report: dict[str, Any] | None = None) -> bool:
        assert state in ("succeeded", "failed", "cancelled"), state
        with self.tx() as cur:
            cur.execute("UPDATE jobs SET state = ?, error = ?, report = ?, finished_at = ? "
                        "WHERE id = ? AND state = 'running' AND attempt = ?",
                        (state, error, json.dumps(report) if report is not None else None, time.time(), job.id,
                         job.attempt))
            return cur.rowcount == 1

    def _cas(self, job: JobRow, assignment: str) -> bool:
        """Apply `assignment` only if the job is still running the attempt the caller saw."""
        with self.tx() as cur:
            cur.execute(f"UPDATE jobs SET {assignment} WHERE id = ? AND state = 'running' AND attempt = ?",
                        (job.id, job.attempt))
            return cur.rowcount == 1

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        conn = self._conn()
        if self.kind == "sqlite":
            return conn.execute(sql, args).fetchall()
        with conn.cursor() as cur:
            cur.execute(_pg(sql), args)
            return cur.fetchall() if cur.description else []


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


class _SqliteCursor:
    def __init__(self, conn: sqlite3.Connection):
        self._cur = conn.cursor()

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        self._cur.execute(sql, args)

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount


class _PgCursor(_SqliteCursor):
    def __init__(self, conn: Any):
        self._cur = conn.cursor()

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        self._cur.execute(_pg(sql), args)
