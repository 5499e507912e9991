"""The intake's durable memory: every accepted alert occurrence, before it is acknowledged.

An occurrence is written (and fsynced) before Alertmanager gets its 200, so an intake crash never loses one: the
dispatcher picks up whatever is still pending when it starts. The occurrence key is the primary key, so a resend
is recognised even after a restart; cooldown and circuit-breaker decisions read the same table.
SQLite (stdlib) because the intake must not need another server to be safe; a scaled-out deployment still gets
exactly-once from Prefect's idempotency keys, which include the route.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runbook.app.intake.routing import RunRequest

SCHEMA = """
CREATE TABLE IF NOT EXISTS occurrences (
    key TEXT PRIMARY KEY,
    route TEXT NOT NULL,
    procedure TEXT NOT NULL,
    env TEXT NOT NULL,
    target TEXT NOT NULL,
    params TEXT NOT NULL,
    mode TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]',
    fingerprint TEXT NOT NULL,
    starts_at TEXT NOT NULL,
    alertname TEXT NOT NULL,
    summary TEXT NOT NULL,
    status TEXT NOT NULL,          -- pending | created | suppressed | cancelled | failed
    reason TEXT NOT NULL DEFAULT '',
    flow_run_id TEXT,
    received_at REAL NOT NULL,
    created_at REAL,
    resolved_at REAL
);
CREATE INDEX IF NOT EXISTS occ_status ON occurrences(status);
CREATE INDEX IF NOT EXISTS occ_target ON occurrences(target, received_at);
CREATE INDEX IF NOT EXISTS occ_route ON occurrences(route, mode, received_at);
"""


@dataclass(frozen=True)
class Occurrence:
    key: str
    route: str
    procedure: str
    env: str
    params: dict[str, Any]
    mode: str
    tags: list[str]
    status: str
    flow_run_id: str | None
    alertname: str
    summary: str
    received_at: float
    reason: str


class Store:
    """A small synchronous store; one connection guarded by a lock (each call is a few hundred microseconds)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged alert survives a power cut
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        # kept up to date by every write below, so /healthz (unauthenticated) costs no query at all
        self._pending = int(self._db.execute("SELECT count(*) FROM occurrences WHERE status = 'pending'"
                                             ).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -------------------------------------------------------------- writes

    def accept(self, requests: list[tuple[RunRequest, str, str]]) -> list[bool]:
        """Insert (request, status, reason) rows in one transaction; False where the key was already known."""
        now = time.time()
        out: list[bool] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for req, status, reason in requests:
                    cur = self._db.execute(
                        """INSERT OR IGNORE INTO occurrences (key, route, procedure, env, target, params, mode, tags,
                               fingerprint, starts_at, alertname, summary, status, reason, received_at)
                           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                        (req.key, req.route, req.procedure, req.env, req.target, json.dumps(req.params, default=str),
                         req.mode, json.dumps(req.tags), req.fingerprint, req.starts_at, req.alertname, req.summary,
                         status, reason, now),
                    )
                    out.append(cur.rowcount == 1)
                self._db.execute("COMMIT")
                self._pending += sum(new and status == "pending"
                                     for new, (_, status, _) in zip(out, requests, strict=True))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return out

    def mark_created(self, key: str, flow_run_id: str) -> None:
        with self._lock:
            self._leaves_pending(key)
            self._db.execute(
                "UPDATE occurrences SET status = 'created', flow_run_id = ?, created_at = ? WHERE key = ?",
                (flow_run_id, time.time(), key),
            )

    def mark(self, key: str, status: str, reason: str = "") -> None:
        with self._lock:
            if status != "pending":
                self._leaves_pending(key)
            self._db.execute("UPDATE occurrences SET status = ?, reason = ? WHERE key = ?", (status, reason, key))

    def mark_resolved(self, key: str) -> Occurrence | None:
        """Record the resolution; a still-pending occurrence is cancelled before it ever becomes a run."""
        with self._lock:
            self._leaves_pending(key)  # a resolved pending occurrence is cancelled
            self._db.execute(
                """UPDATE occurrences SET resolved_at = ?,
                          status = CASE WHEN status = 'pending' THEN 'cancelled' ELSE status END,
                          reason = CASE WHEN status = 'pending' THEN 'resolved before dispatch' ELSE reason END
                    WHERE key = ? AND resolved_at IS NULL""",
                (time.time(), key),
            )
            row = self._db.execute("SELECT * FROM occurrences WHERE key = ?", (key,)).fetchone()
        return _occ(row) if row else None

    def _leaves_pending(self, key: str) -> None:
        """Count an occurrence out of the pending ones (called under the lock, before its status changes)."""
        row = self._db.execute("SELECT status FROM occurrences WHERE key = ?", (key,)).fetchone()
        if row is not None and row[0] == "pending":
            self._pending -= 1

    # -------------------------------------------------------------- reads

    def pending_count(self) -> int:
        """Occurrences waiting for their run, without a query (see __init__)."""
        return self._pending

    def known(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM occurrences WHERE key = ?", (key,)).fetchone() is not None

    def pending(self, limit: int = 200) -> list[Occurrence]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM occurrences WHERE status = 'pending' ORDER BY received_at LIMIT ?", (limit,)
            ).fetchall()
        return [_occ(r) for r in rows]

    def last_run_for_target(self, target: str, since: float) -> Occurrence | None:
        with self._lock:
            row = self._db.execute(
                """SELECT * FROM occurrences WHERE target = ? AND status IN ('pending', 'created')
                    AND received_at >= ? ORDER BY received_at DESC LIMIT 1""",
                (target, since),
            ).fetchone()
        return _occ(row) if row else None

    def applying_runs(self, route: str, since: float) -> int:
        with self._lock:
            return int(self._db.execute(
                """SELECT count(*) FROM occurrences WHERE route = ? AND mode IN ('auto', 'approve')
                    AND status IN ('pending', 'created') AND received_at >= ?""",
                (route, since),
            ).fetchone()[0])

    def get(self, key: str) -> Occurrence | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM occurrences WHERE key = ?", (key,)).fetchone()
        return _occ(row) if row else None


def _occ(row: sqlite3.Row) -> Occurrence:
    return Occurrence(
        key=row["key"], route=row["route"], procedure=row["procedure"], env=row["env"],
        params=json.loads(row["params"]), mode=row["mode"], tags=json.loads(row["tags"]),
        status=row["status"], flow_run_id=row["flow_run_id"],
        alertname=row["alertname"], summary=row["summary"], received_at=row["received_at"], reason=row["reason"],
    )
