"""The intake's state in PostgreSQL, shared by every replica behind a load balancer.

With a SQLite file per replica each one counts its own breaker runs and cooldowns, so two replicas allow twice
the breaker's limit. Here:
- a webhook's decisions are made in one transaction that first takes a transaction-scoped advisory lock per
  procedure (sorted, so two replicas never deadlock): occurrence keys, cooldown targets and breaker routes all
  belong to one procedure, so the reads that decide and the inserts that record cannot interleave with another
  replica's for the same procedure, and the breaker's count is exact;
- occurrences are inserted with ``ON CONFLICT DO NOTHING`` on the key: one row per occurrence whoever inserts it;
- the dispatcher claims rows with ``FOR UPDATE SKIP LOCKED`` (a lease covers a replica that dies holding some),
  so two dispatchers never both create a run for one occurrence (Prefect's idempotency key backs this up).
Every connection has connect, statement, lock and idle-in-transaction timeouts; the DSN is a secret: it is
registered for redaction and never appears in an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import queue
import socket
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.pq import TransactionStatus
from psycopg.rows import DictRow, dict_row

from runbook.app.intake.routing import RunRequest
from runbook.app.intake.store import (
    CLAIM_LEASE_S,
    INSERT_COLUMNS,
    Decider,
    KnownKeys,
    Occurrence,
    Resolved,
    StoreUnavailable,
    insert_values,
    to_occurrence,
)
from runbook.engine.clients import conninfo_parts
from runbook.engine.redact import redact, register_secret

TABLE = "runbook_intake_occurrences"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    key text PRIMARY KEY,
    route text NOT NULL,
    procedure text NOT NULL,
    env text NOT NULL,
    target text NOT NULL,
    params text NOT NULL,
    mode text NOT NULL,
    tags text NOT NULL DEFAULT '[]',
    fingerprint text NOT NULL,
    starts_at text NOT NULL,
    alertname text NOT NULL,
    summary text NOT NULL,
    status text NOT NULL,          -- pending | dispatching | created | suppressed | cancelled | failed
    reason text NOT NULL DEFAULT '',
    flow_run_id text,
    received_at double precision NOT NULL,
    created_at double precision,
    resolved_at double precision,
    claimed_at double precision,
    claimed_by text
);
CREATE INDEX IF NOT EXISTS {TABLE}_status ON {TABLE} (status, received_at);
CREATE INDEX IF NOT EXISTS {TABLE}_target ON {TABLE} (target, received_at);
CREATE INDEX IF NOT EXISTS {TABLE}_route ON {TABLE} (route, mode, received_at);
CREATE INDEX IF NOT EXISTS {TABLE}_fingerprint ON {TABLE} (fingerprint);
"""
WHERE = "the intake's state DSN (--state-dsn / RUNBOOK_INTAKE_STATE_DSN)"
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 5_000  # also bounds the wait for another replica's decision lock
APPLICATION_NAME = "runbook-intake"
REQUEST_CONNECTIONS = 4  # webhooks' store calls at once (each a few round trips); more wait for a free one
DISPATCH_CONNECTIONS = 2  # the dispatcher's claims and run records
INSERT_CHUNK = 1000


def _lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for ``name`` (namespaced, so it cannot meet another user's)."""
    return int.from_bytes(hashlib.sha256(f"runbook-intake\0{name}".encode()).digest()[:8], "big", signed=True)


class _Pool:
    """A fixed number of connections, opened when the store starts (never on a webhook's way: opening one costs a
    backend process and a SCRAM exchange, 20 ms idle and 130 ms on a busy machine, which per-thread connections
    paid whenever the worker pool started a thread). A caller takes a free one or waits (bounded); a broken one is
    reopened when it is next taken, so a PostgreSQL restart costs the webhooks in flight a 503 and nothing more."""

    def __init__(self, name: str, size: int, connect: Callable[[], psycopg.Connection[DictRow]],
                 wait_s: float) -> None:
        self.name, self._connect, self._wait_s = name, connect, wait_s
        self._all: list[psycopg.Connection[DictRow]] = []
        self._free: queue.LifoQueue[psycopg.Connection[DictRow]] = queue.LifoQueue()  # the warmest first
        try:
            for _ in range(size):
                conn = connect()
                self._all.append(conn)
                self._free.put(conn)
        except BaseException:
            self.close()
            raise

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[DictRow]]:
        try:
            conn = self._free.get(timeout=self._wait_s)
        except queue.Empty:
            raise StoreUnavailable(f"intake state database: all {len(self._all)} {self.name} connections busy "
                                   f"for {self._wait_s:g} s") from None
        try:
            if conn.closed or conn.broken:
                conn = self._reopen(conn)  # if that fails, the broken one goes back, to be reopened next time
            yield conn
        finally:
            _rollback(conn)  # never hand on a connection inside a transaction
            self._free.put(conn)

    def _reopen(self, old: psycopg.Connection[DictRow]) -> psycopg.Connection[DictRow]:
        conn = self._connect()
        old.close()
        self._all[self._all.index(old)] = conn
        return conn

    def close(self) -> None:
        for conn in self._all:
            conn.close()


class PostgresStore:
    """The shared store. Its connections are opened when it starts, in two pools: one for the webhooks' path
    (dedup, decisions, resolves) and one for the dispatcher (claims, run records, the pending count), so the
    dispatcher's writes never queue a webhook behind them."""

    def __init__(self, dsn: str, connect_timeout_s: int = CONNECT_TIMEOUT_S,
                 statement_timeout_ms: int = STATEMENT_TIMEOUT_MS) -> None:
        register_secret(dsn)
        self._conninfo = make_conninfo(**conninfo_parts(dsn, WHERE))  # a malformed DSN: ConfigError, no value
        self._connect_timeout_s = connect_timeout_s
        self._statement_timeout_ms = statement_timeout_ms
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self._known = KnownKeys()
        wait_s = statement_timeout_ms / 1000
        self._dispatch = _Pool("dispatcher", DISPATCH_CONNECTIONS, self._connect, wait_s)
        try:
            self._requests = _Pool("request", REQUEST_CONNECTIONS, self._connect, wait_s)
            with self._session(self._dispatch) as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key("schema"),))  # replicas starting
                conn.execute(SCHEMA)  # together
        except BaseException:
            self.close()
            raise
        self._pending = (0, time.monotonic())  # the shared count and when it was taken (see refresh_pending)
        self.refresh_pending()

    def close(self) -> None:
        for pool in (getattr(self, "_requests", None), self._dispatch):
            if pool is not None:
                pool.close()

    # -------------------------------------------------------------- connections

    def _connect(self) -> psycopg.Connection[DictRow]:
        started = time.monotonic()
        try:
            return psycopg.connect(
                self._conninfo, autocommit=True, row_factory=dict_row,
                connect_timeout=max(1, math.ceil(self._connect_timeout_s)), application_name=APPLICATION_NAME,
                # synchronous_commit=on whatever the server's default: an acknowledged alert survives a crash
                options=(f"-c synchronous_commit=on -c statement_timeout={self._statement_timeout_ms} "
                         f"-c lock_timeout={self._statement_timeout_ms} "
                         f"-c idle_in_transaction_session_timeout={self._statement_timeout_ms * 2}"),
                keepalives=1, keepalives_idle=5, tcp_user_timeout=self._connect_timeout_s * 1000,
            )
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"intake state database unreachable: {_first_line(exc)} after "
                                   f"{time.monotonic() - started:.1f} s") from None

    @contextmanager
    def _session(self, pool: _Pool) -> Iterator[psycopg.Connection[DictRow]]:
        """A connection of ``pool`` for one call; psycopg errors leave as StoreUnavailable."""
        with pool.connection() as conn:
            try:
                yield conn
            except psycopg.Error as exc:
                raise StoreUnavailable(f"intake state database: {_first_line(exc)}") from None

    # -------------------------------------------------------------- writes

    @contextmanager
    def deciding(self, procedures: Collection[str]) -> Iterator[Decider]:
        """The decision transaction. BEGIN and the procedures' locks go in one round trip (one simple-protocol
        query; the lock keys are integers computed here), then the policy's reads, the insert and COMMIT: four
        round trips for a webhook with new occurrences instead of five. On a busy machine each one waits for two
        processes to be scheduled."""
        keys = sorted({_lock_key(f"procedure\0{p}") for p in procedures})
        begin = "BEGIN" + "".join(f"; SELECT pg_advisory_xact_lock({int(k)})" for k in keys)
        with self._session(self._requests) as conn:
            try:
                conn.execute(begin)
                tx = _PgDecider(conn)
                yield tx
            except BaseException:
                _rollback(conn)
                raise
            conn.execute("COMMIT")
        self._known.add(tx.keys)

    def accept(self, rows: list[tuple[RunRequest, str, str]]) -> list[bool]:
        """Insert (request, status, reason) rows in one transaction; False where the key was already known."""
        with self.deciding({req.procedure for req, _, _ in rows}) as tx:
            return tx.accept(rows)

    def claim(self, limit: int = 200) -> list[Occurrence]:
        now = time.time()
        with self._session(self._dispatch) as conn:
            rows = conn.execute(
                f"""UPDATE {TABLE} SET status = 'dispatching', claimed_at = %s, claimed_by = %s
                     WHERE key IN (SELECT key FROM {TABLE}
                                    WHERE status = 'pending' OR (status = 'dispatching' AND claimed_at < %s)
                                    ORDER BY received_at LIMIT %s FOR UPDATE SKIP LOCKED)
                 RETURNING *""", (now, self.replica, now - CLAIM_LEASE_S, limit)).fetchall()
        return sorted((to_occurrence(r) for r in rows), key=lambda o: o.received_at)

    def release(self, key: str) -> None:
        with self._session(self._dispatch) as conn:
            conn.execute(f"UPDATE {TABLE} SET status = 'pending', claimed_at = NULL, claimed_by = NULL "
                         "WHERE key = %s AND status = 'dispatching' AND claimed_by = %s", (key, self.replica))

    def mark_created(self, key: str, flow_run_id: str) -> float | None:
        """Record the run; the resolve's time when the alert resolved while it was being created. The row is
        locked before it is read (``FOR UPDATE``), so a concurrent resolve either committed first and is seen here,
        or waits and then finds the run recorded."""
        with self._session(self._dispatch) as conn:
            row = conn.execute(
                f"""WITH o AS (SELECT key, resolved_at FROM {TABLE} WHERE key = %s FOR UPDATE)
                    UPDATE {TABLE} n SET status = 'created', flow_run_id = %s, created_at = %s
                      FROM o WHERE n.key = o.key RETURNING o.resolved_at""",
                (key, flow_run_id, time.time())).fetchone()
        return row["resolved_at"] if row is not None else None

    def mark(self, key: str, status: str, reason: str = "") -> None:
        with self._session(self._dispatch) as conn:
            conn.execute(f"UPDATE {TABLE} SET status = %s, reason = %s WHERE key = %s", (status, reason, key))

    def mark_resolved(self, key: str) -> Resolved | None:
        """Record the resolve (once); a still-pending occurrence is cancelled before it ever becomes a run. The
        row is locked before its status is read, and the new values are computed from the row being updated (a
        self-join's row would be the statement's snapshot, stale after waiting for a dispatcher's write)."""
        with self._session(self._requests) as conn:
            row = conn.execute(
                f"""WITH o AS (SELECT key, status FROM {TABLE} WHERE key = %s AND resolved_at IS NULL FOR UPDATE)
                    UPDATE {TABLE} n SET resolved_at = %s,
                           status = CASE WHEN n.status = 'pending' THEN 'cancelled' ELSE n.status END,
                           reason = CASE WHEN n.status = 'pending' THEN 'resolved before dispatch'
                                         ELSE n.reason END
                      FROM o WHERE n.key = o.key
                 RETURNING o.status AS was, n.*""", (key, time.time())).fetchone()
            if row is None:  # never stored, or resolved before (a resend)
                row = conn.execute(f"SELECT *, '' AS was FROM {TABLE} WHERE key = %s", (key,)).fetchone()
        if row is None:
            return None
        return Resolved(to_occurrence(row), row["was"])

    def refresh_pending(self) -> None:
        """Count the occurrences waiting for their run, every replica's: the dispatcher calls this after each claim
        (so at least every sweep, SWEEP_S), and /healthz reports the count with its age without a query."""
        with self._session(self._dispatch) as conn:
            row = conn.execute(f"SELECT count(*) AS n FROM {TABLE} WHERE status IN ('pending', 'dispatching')"
                               ).fetchone()
        self._pending = (int(row["n"]) if row else 0, time.monotonic())

    # -------------------------------------------------------------- reads

    def pending_count(self) -> int:
        """Occurrences waiting for their run across all replicas, as of ``pending_age_s()`` ago (no query: /healthz
        is unauthenticated)."""
        return self._pending[0]

    def pending_age_s(self) -> float:
        return time.monotonic() - self._pending[1]

    def known(self, key: str) -> bool:
        with self._session(self._requests) as conn:
            return conn.execute(f"SELECT 1 FROM {TABLE} WHERE key = %s", (key,)).fetchone() is not None

    def known_keys(self, keys: Collection[str]) -> set[str]:
        """Which of ``keys`` are stored: those this process has seen stored without a query (KnownKeys), the
        others in one."""
        known, ask = self._known.split(keys)
        if ask:
            with self._session(self._requests) as conn:
                found = _pg_known(conn, ask)
            self._known.add(found)
            known |= found
        return known

    def pending(self, limit: int = 200) -> list[Occurrence]:
        """Occurrences waiting for their run (claimed or not), oldest first."""
        with self._session(self._dispatch) as conn:
            rows = conn.execute(f"SELECT * FROM {TABLE} WHERE status IN ('pending', 'dispatching') "
                                "ORDER BY received_at LIMIT %s", (limit,)).fetchall()
        return [to_occurrence(r) for r in rows]

    def find(self, fingerprint: str, route: str | None = None) -> list[Occurrence]:
        """Every occurrence of one alert (by fingerprint), on one route or all."""
        with self._session(self._requests) as conn:
            rows = conn.execute(f"SELECT * FROM {TABLE} WHERE fingerprint = %s AND (%s::text IS NULL OR route = %s) "
                                "ORDER BY received_at", (fingerprint, route, route)).fetchall()
        return [to_occurrence(r) for r in rows]

    def get(self, key: str) -> Occurrence | None:
        with self._session(self._requests) as conn:
            row = conn.execute(f"SELECT * FROM {TABLE} WHERE key = %s", (key,)).fetchone()
        return to_occurrence(row) if row else None


class _PgDecider:
    """The policy's reads and the batch's inserts, inside the transaction that holds the procedures' locks."""

    def __init__(self, conn: psycopg.Connection[DictRow]) -> None:
        self._conn = conn
        self.keys: list[str] = []  # stored once committed (new or already there)

    def known_keys(self, keys: Collection[str]) -> set[str]:
        return _pg_known(self._conn, keys)

    def ran_for_target(self, target: str, since: float) -> bool:
        return self._conn.execute(
            f"""SELECT 1 FROM {TABLE} WHERE target = %s AND status IN ('pending', 'dispatching', 'created')
                 AND received_at >= %s LIMIT 1""", (target, since)).fetchone() is not None

    def applying_runs(self, route: str, since: float) -> int:
        row = self._conn.execute(
            f"""SELECT count(*) AS n FROM {TABLE} WHERE route = %s AND mode IN ('auto', 'approve')
                 AND status IN ('pending', 'dispatching', 'created') AND received_at >= %s""",
            (route, since)).fetchone()
        return int(row["n"]) if row else 0

    def accept(self, rows: list[tuple[RunRequest, str, str]]) -> list[bool]:
        if not rows:
            return []
        now = time.time()
        one = f"({', '.join(['%s'] * len(INSERT_COLUMNS))})"
        inserted: set[str] = set()
        for start in range(0, len(rows), INSERT_CHUNK):  # PostgreSQL takes at most 65,535 parameters
            chunk = rows[start:start + INSERT_CHUNK]
            values = [v for req, status, reason in chunk for v in insert_values(req, status, reason, now)]
            inserted |= {r["key"] for r in self._conn.execute(
                f"INSERT INTO {TABLE} ({', '.join(INSERT_COLUMNS)}) VALUES {', '.join([one] * len(chunk))} "
                "ON CONFLICT (key) DO NOTHING RETURNING key", values).fetchall()}
        self.keys += [req.key for req, _, _ in rows]
        out: list[bool] = []
        for req, _, _ in rows:  # a key twice in one batch: only its first row is new
            out.append(req.key in inserted)
            inserted.discard(req.key)
        return out


def _pg_known(conn: psycopg.Connection[DictRow], keys: Collection[str]) -> set[str]:
    if not keys:
        return set()
    return {r["key"] for r in conn.execute(f"SELECT key FROM {TABLE} WHERE key = ANY(%s)", (list(keys),))}


def _rollback(conn: psycopg.Connection[DictRow]) -> None:
    """End a transaction left open (an error mid-decision); a broken connection is reopened when next taken."""
    if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
        with contextlib.suppress(psycopg.Error):
            conn.execute("ROLLBACK")


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return redact(lines[0] if lines else type(exc).__name__)[:300]
