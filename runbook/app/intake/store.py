"""The intake's durable memory: every accepted alert occurrence, before it is acknowledged.

An occurrence is written (and fsynced) before Alertmanager gets its 200, so an intake crash never loses one: the
dispatcher picks up whatever is still pending when it starts. The occurrence key is the primary key, so a resend
is recognised even after a restart; cooldown and circuit-breaker decisions read the same table.

Two implementations of one ``Store`` protocol:
- ``SqliteStore`` (stdlib, the single-node default): the intake needs no other server to be safe.
- ``PostgresStore`` (pgstore.py, when a state DSN is configured): one state for every replica behind a load
  balancer, so dedup, cooldowns, the breaker's count and dispatch claims hold across them.
Both decide a webhook's batch inside one transaction that holds a lock per procedure (``deciding``): what the
policy reads and what it writes cannot interleave with another replica's decision for the same procedure.
A store that cannot be read is an error naming it, never silently replaced by an empty one (history lost).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from runbook.app.intake.routing import RunRequest
from runbook.engine.errors import ConfigError, RunbookError

# a claimed occurrence whose dispatcher has not recorded its run by then (it died) is claimed again; well above
# the dispatcher's HTTP timeout, and Prefect's idempotency key makes a second creation return the same run
CLAIM_LEASE_S = 60.0
WAITING = ("pending", "dispatching")  # accepted, no run yet
KNOWN_KEYS_CACHED = 100_000  # occurrence keys a store remembers having seen stored (about 10 MB)

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
    status TEXT NOT NULL,          -- pending | dispatching | created | suppressed | cancelled | failed
    reason TEXT NOT NULL DEFAULT '',
    flow_run_id TEXT,
    received_at REAL NOT NULL,
    created_at REAL,
    resolved_at REAL,
    claimed_at REAL
);
CREATE INDEX IF NOT EXISTS occ_status ON occurrences(status);
CREATE INDEX IF NOT EXISTS occ_target ON occurrences(target, received_at);
CREATE INDEX IF NOT EXISTS occ_route ON occurrences(route, mode, received_at);
"""

INSERT_COLUMNS = ("key", "route", "procedure", "env", "target", "params", "mode", "tags", "fingerprint",
                  "starts_at", "alertname", "summary", "status", "reason", "received_at")


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
    fingerprint: str = ""
    resolved_at: float | None = None  # when the alert's resolve was recorded (epoch seconds)


@dataclass(frozen=True)
class Resolved:
    """What recording a resolve found: the occurrence after it, and its status when this resolve was recorded
    (``was``: "" when an earlier resolve had already been recorded, e.g. Alertmanager sending it again)."""

    occurrence: Occurrence
    was: str


class StoreUnavailable(RunbookError):
    """The state database cannot be reached or answered in time: the webhook gets a 503 (Alertmanager retries)."""


class Decider(Protocol):
    """Reads and writes inside one decision transaction (see ``Store.deciding``)."""

    def known_keys(self, keys: Collection[str]) -> set[str]: ...

    def ran_for_target(self, target: str, since: float) -> bool: ...

    def applying_runs(self, route: str, since: float) -> int: ...

    def accept(self, rows: list[tuple[RunRequest, str, str]]) -> list[bool]: ...


class Store(Protocol):
    """What the intake and its dispatcher need from durable state, whichever database holds it."""

    def close(self) -> None: ...

    def deciding(self, procedures: Collection[str]) -> AbstractContextManager[Decider]:
        """A transaction holding the lock of each procedure: decide, accept, commit on exit."""
        ...

    def accept(self, rows: list[tuple[RunRequest, str, str]]) -> list[bool]: ...

    def claim(self, limit: int = 200) -> list[Occurrence]:
        """Occurrences waiting for their run, now this dispatcher's alone (until it records or releases them)."""
        ...

    def release(self, key: str) -> None: ...

    def mark_created(self, key: str, flow_run_id: str) -> float | None:
        """Record the occurrence's run; when its alert resolved while the run was being created (the resolve found
        no run to cancel), the time of that resolve: the caller cancels the run it just created."""
        ...

    def mark(self, key: str, status: str, reason: str = "") -> None: ...

    def mark_resolved(self, key: str) -> Resolved | None:
        """Record the resolve (once); a still-pending occurrence is cancelled before it ever becomes a run. None
        for an occurrence never stored."""
        ...

    def pending_count(self) -> int:
        """Occurrences waiting for their run (pending or being dispatched), without a query: /healthz's figure."""
        ...

    def pending_age_s(self) -> float:
        """How old ``pending_count()`` is: 0 for a count kept live, else the time since ``refresh_pending``."""
        ...

    def refresh_pending(self) -> None:
        """Recount what ``pending_count()`` reports (the dispatcher's loop calls it; never the request path)."""
        ...

    def known(self, key: str) -> bool: ...

    def known_keys(self, keys: Collection[str]) -> set[str]:
        """Which of ``keys`` are stored: one query for a webhook's resends, not one per alert."""
        ...

    def pending(self, limit: int = 200) -> list[Occurrence]: ...

    def find(self, fingerprint: str, route: str | None = None) -> list[Occurrence]: ...

    def get(self, key: str) -> Occurrence | None: ...


class KnownKeys:
    """Occurrence keys this process has seen stored. A store never forgets a key (occurrences are only added), so
    a key found here is a resend without asking the database: most of a storm's webhooks are resends of the same
    group, and with the state in PostgreSQL each lookup was a round trip that, on a busy machine, waited for two
    processes to be scheduled (up to 120 ms). Bounded, the oldest forgotten first (then looked up again)."""

    def __init__(self, limit: int = KNOWN_KEYS_CACHED) -> None:
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def split(self, keys: Collection[str]) -> tuple[set[str], list[str]]:
        """The keys known here, and the others (to look up)."""
        with self._lock:
            known = {k for k in keys if k in self._keys}
        return known, [k for k in set(keys) if k not in known]

    def add(self, keys: Iterable[str]) -> None:
        """Keys the database has just shown stored (a lookup found them, or a committed decision wrote them)."""
        with self._lock:
            for k in keys:
                self._keys[k] = None
            while len(self._keys) > self._limit:
                self._keys.popitem(last=False)


def insert_values(req: RunRequest, status: str, reason: str, now: float) -> tuple[Any, ...]:
    """One row's values in ``INSERT_COLUMNS`` order."""
    return (req.key, req.route, req.procedure, req.env, req.target, json.dumps(req.params, default=str),
            req.mode, json.dumps(req.tags), req.fingerprint, req.starts_at, req.alertname, req.summary,
            status, reason, now)


def to_occurrence(row: Mapping[str, Any]) -> Occurrence:
    return Occurrence(
        key=row["key"], route=row["route"], procedure=row["procedure"], env=row["env"],
        params=json.loads(row["params"]), mode=row["mode"], tags=json.loads(row["tags"]),
        status=row["status"], flow_run_id=row["flow_run_id"],
        alertname=row["alertname"], summary=row["summary"], received_at=row["received_at"], reason=row["reason"],
        fingerprint=row["fingerprint"], resolved_at=row["resolved_at"],
    )


class SqliteStore:
    """One intake's store: a SQLite file, one connection guarded by a lock (each call is a few hundred
    microseconds). ``BEGIN IMMEDIATE`` makes a decision transaction exclusive, which is the per-procedure lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = _open_checked(path)
        self._lock = threading.Lock()
        self._known = KnownKeys()
        # a claim left by a process that died: this is the only process using the file, so it is stale
        self._db.execute("UPDATE occurrences SET status = 'pending', claimed_at = NULL WHERE status = 'dispatching'")
        # kept up to date by every write below, so /healthz (unauthenticated) costs no query at all
        self._pending = int(self._db.execute("SELECT count(*) FROM occurrences WHERE status = 'pending'"
                                             ).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -------------------------------------------------------------- writes

    @contextmanager
    def deciding(self, procedures: Collection[str]) -> Iterator[Decider]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            tx = _SqliteDecider(self._db)
            try:
                yield tx
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._pending += tx.added
        self._known.add(tx.keys)

    def accept(self, rows: list[tuple[RunRequest, str, str]]) -> list[bool]:
        """Insert (request, status, reason) rows in one transaction; False where the key was already known."""
        with self.deciding({req.procedure for req, _, _ in rows}) as tx:
            return tx.accept(rows)

    def claim(self, limit: int = 200) -> list[Occurrence]:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    """SELECT * FROM occurrences WHERE status = 'pending'
                           OR (status = 'dispatching' AND claimed_at < ?) ORDER BY received_at LIMIT ?""",
                    (now - CLAIM_LEASE_S, limit)).fetchall()
                self._db.executemany("UPDATE occurrences SET status = 'dispatching', claimed_at = ? WHERE key = ?",
                                     [(now, r["key"]) for r in rows])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [to_occurrence(r) for r in rows]

    def release(self, key: str) -> None:
        with self._lock:
            self._db.execute("UPDATE occurrences SET status = 'pending', claimed_at = NULL "
                             "WHERE key = ? AND status = 'dispatching'", (key,))

    def mark_created(self, key: str, flow_run_id: str) -> float | None:
        """Record an occurrence's run without an fsync of its own (synchronous=NORMAL for this commit): a record
        lost to a power cut only sends the occurrence to dispatch again, and Prefect's idempotency key gives back
        the same run. The next webhook's commit (FULL) makes it durable anyway. One fsync per created run held the
        store's lock, and every webhook behind it, for the whole storm.
        The resolve's time when the alert resolved meanwhile (read in the same transaction as the write, so a
        resolve is either seen here or finds the run recorded)."""
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                with _immediate(self._db):
                    row = self._db.execute("SELECT status, resolved_at FROM occurrences WHERE key = ?",
                                           (key,)).fetchone()
                    self._db.execute(
                        "UPDATE occurrences SET status = 'created', flow_run_id = ?, created_at = ? WHERE key = ?",
                        (flow_run_id, time.time(), key),
                    )
            finally:
                self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged alert survives a power cut
            if row is not None and row["status"] in WAITING:
                self._pending -= 1
        return row["resolved_at"] if row is not None else None

    def mark(self, key: str, status: str, reason: str = "") -> None:
        with self._lock:
            if status not in WAITING:
                self._leaves_pending(key)
            self._db.execute("UPDATE occurrences SET status = ?, reason = ? WHERE key = ?", (status, reason, key))

    def mark_resolved(self, key: str) -> Resolved | None:
        """Record the resolve (once); a still-pending occurrence is cancelled before it ever becomes a run. One
        transaction, so a dispatcher recording its run (mark_created) sees the resolve or is seen by it."""
        with self._lock:
            with _immediate(self._db):
                row = self._db.execute("SELECT * FROM occurrences WHERE key = ?", (key,)).fetchone()
                if row is None:
                    return None
                was = ""
                if row["resolved_at"] is None:
                    was = row["status"]
                    self._db.execute(
                        """UPDATE occurrences SET resolved_at = ?,
                                  status = CASE WHEN status = 'pending' THEN 'cancelled' ELSE status END,
                                  reason = CASE WHEN status = 'pending' THEN 'resolved before dispatch'
                                                ELSE reason END
                            WHERE key = ?""", (time.time(), key))
                    row = self._db.execute("SELECT * FROM occurrences WHERE key = ?", (key,)).fetchone()
            if was == "pending":
                self._pending -= 1
        return Resolved(to_occurrence(row), was)

    def _leaves_pending(self, key: str) -> None:
        """Count an occurrence out of the waiting ones (called under the lock, before its status changes)."""
        row = self._db.execute("SELECT status FROM occurrences WHERE key = ?", (key,)).fetchone()
        if row is not None and row[0] in WAITING:
            self._pending -= 1

    # -------------------------------------------------------------- reads

    def pending_count(self) -> int:
        """Occurrences waiting for their run, without a query (see __init__)."""
        return self._pending

    def pending_age_s(self) -> float:
        return 0.0  # kept live by this process's own writes: the only writer of its file

    def refresh_pending(self) -> None:
        pass

    def known(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM occurrences WHERE key = ?", (key,)).fetchone() is not None

    def known_keys(self, keys: Collection[str]) -> set[str]:
        known, ask = self._known.split(keys)
        if ask:
            with self._lock:
                found = _sqlite_known(self._db, ask)
            self._known.add(found)
            known |= found
        return known

    def pending(self, limit: int = 200) -> list[Occurrence]:
        """Occurrences waiting for their run (claimed or not), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM occurrences WHERE status IN ('pending', 'dispatching') ORDER BY received_at LIMIT ?",
                (limit,)).fetchall()
        return [to_occurrence(r) for r in rows]

    def find(self, fingerprint: str, route: str | None = None) -> list[Occurrence]:
        """Every occurrence of one alert (by fingerprint), on one route or all."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM occurrences WHERE fingerprint = ? AND (? IS NULL OR route = ?) ORDER BY received_at",
                (fingerprint, route, route)).fetchall()
        return [to_occurrence(r) for r in rows]

    def get(self, key: str) -> Occurrence | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM occurrences WHERE key = ?", (key,)).fetchone()
        return to_occurrence(row) if row else None


class _SqliteDecider:
    """The policy's reads and the batch's inserts, on the connection inside ``BEGIN IMMEDIATE``."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.added = 0
        self.keys: list[str] = []  # stored once committed (new or already there)

    def known_keys(self, keys: Collection[str]) -> set[str]:
        return _sqlite_known(self._db, keys)

    def ran_for_target(self, target: str, since: float) -> bool:
        return self._db.execute(
            """SELECT 1 FROM occurrences WHERE target = ? AND status IN ('pending', 'dispatching', 'created')
                AND received_at >= ? LIMIT 1""", (target, since)).fetchone() is not None

    def applying_runs(self, route: str, since: float) -> int:
        return int(self._db.execute(
            """SELECT count(*) FROM occurrences WHERE route = ? AND mode IN ('auto', 'approve')
                AND status IN ('pending', 'dispatching', 'created') AND received_at >= ?""",
            (route, since)).fetchone()[0])

    def accept(self, rows: list[tuple[RunRequest, str, str]]) -> list[bool]:
        now = time.time()
        out: list[bool] = []
        sql = (f"INSERT INTO occurrences ({', '.join(INSERT_COLUMNS)}) "
               f"VALUES ({', '.join('?' * len(INSERT_COLUMNS))}) ON CONFLICT (key) DO NOTHING")
        for req, status, reason in rows:
            new = self._db.execute(sql, insert_values(req, status, reason, now)).rowcount == 1
            out.append(new)
            self.added += new and status == "pending"
            self.keys.append(req.key)
        return out


@contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction (BEGIN IMMEDIATE: other connections to the file wait), committed on exit."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _sqlite_known(db: sqlite3.Connection, keys: Collection[str]) -> set[str]:
    found: set[str] = set()
    unique = list(set(keys))
    for start in range(0, len(unique), 500):  # SQLite's bound on parameters
        chunk = unique[start:start + 500]
        found |= {r[0] for r in db.execute(
            f"SELECT key FROM occurrences WHERE key IN ({', '.join('?' * len(chunk))})", chunk)}
    return found


def _open_checked(path: Path) -> sqlite3.Connection:
    """The store's connection, after SQLite's own integrity check: a file that is not a database, or a damaged
    one, stops the intake with an error naming it (never replaced by an empty store: its history would be lost)."""
    db: sqlite3.Connection | None = None
    try:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        db.row_factory = sqlite3.Row
        problems = [line.strip() for r in db.execute("PRAGMA quick_check").fetchall()
                    for line in str(r[0]).splitlines() if line.strip()]
        if problems != ["ok"]:
            raise ConfigError(f"intake store {path}: SQLite's integrity check failed ({'; '.join(problems)[:300]})"
                              f"; {_LEFT_ALONE}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # an acknowledged alert survives a power cut
        db.executescript(SCHEMA)
        columns = {r[1] for r in db.execute("PRAGMA table_info(occurrences)")}
        if "claimed_at" not in columns:  # a store written before dispatch claims
            db.execute("ALTER TABLE occurrences ADD COLUMN claimed_at REAL")
    except sqlite3.DatabaseError as exc:
        if db is not None:
            db.close()
        raise ConfigError(f"intake store {path}: not a usable SQLite database ({exc}); {_LEFT_ALONE}") from None
    except ConfigError:
        if db is not None:
            db.close()
        raise
    return db


_LEFT_ALONE = ("the intake does not start on it and leaves it as it is: restore it from a backup, or move it "
               "aside to start with an empty store (its dedup, cooldown and breaker history is then lost)")
