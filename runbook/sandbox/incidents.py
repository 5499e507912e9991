"""Incident injectors for the sandbox: real sessions that make the real database slow, for tests and the demo.

Each injector holds its own connections (as the application role ``pafar_app``) in threads, and ``stop()`` closes
them all, so an incident never outlives the test or demo that made it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psycopg

SLOW_QUERY = "SELECT * FROM bookings WHERE user_id = %s"
LONG_QUERY = "SELECT pg_sleep(600) /* runaway report */"
WAITER_UPDATE = "UPDATE payments SET status = %s WHERE id = %s"


@dataclass
class DbIncident:
    """A root blocker idle in transaction, ``waiters`` sessions queued behind it, a runaway query, a slow filter."""

    app_dsn: str
    waiters: int = 2
    slow_runs: int = 5
    runaway: bool = True
    _conns: list[psycopg.Connection] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    waiter_results: list[str] = field(default_factory=list)
    blocker_pid: int = 0
    waiter_pids: list[int] = field(default_factory=list)
    runaway_pid: int = 0

    def _connect(self, name: str, autocommit: bool = True) -> psycopg.Connection:
        conn = psycopg.connect(self.app_dsn, autocommit=autocommit, connect_timeout=5, application_name=name)
        self._conns.append(conn)
        return conn

    def start(self) -> DbIncident:
        slow = self._connect("pafar-backend")
        for _ in range(self.slow_runs):
            user_id = slow.execute("SELECT id FROM users ORDER BY random() LIMIT 1").fetchone()[0]
            slow.execute(SLOW_QUERY, (user_id,)).fetchall()
        blocker = self._connect("pafar-backend", autocommit=False)
        blocker.execute("UPDATE payments SET status = status WHERE id = 1")  # now idle in transaction, row locked
        self.blocker_pid = blocker.info.backend_pid
        for i in range(self.waiters):
            conn = self._connect(f"pafar-celery-{i}")
            self.waiter_pids.append(conn.info.backend_pid)
            self._spawn(self._wait_on_lock, conn, f"settled-{i}")
        if self.runaway:
            conn = self._connect("pafar-reports")
            self.runaway_pid = conn.info.backend_pid
            self._spawn(self._run_quietly, conn, LONG_QUERY)
        self._wait_for_waiters()
        return self

    def _spawn(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def _wait_on_lock(self, conn: psycopg.Connection, status: str) -> None:
        try:
            conn.execute(WAITER_UPDATE, (status, 1))
            self.waiter_results.append("done")
        except psycopg.Error as exc:
            self.waiter_results.append(f"error: {type(exc).__name__}")

    @staticmethod
    def _run_quietly(conn: psycopg.Connection, sql: str) -> None:
        try:
            conn.execute(sql)
        except psycopg.Error:
            pass  # cancelled or terminated by the remediation under test: that is the point

    def _wait_for_waiters(self, timeout_s: float = 5.0) -> None:
        """Return once every waiter is really queued on the lock (and the runaway is running)."""
        admin = self._connect("pafar-probe")
        deadline = time.monotonic() + timeout_s
        want = set(self.waiter_pids)
        while time.monotonic() < deadline:
            rows = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid = ANY(%s)",
                (list(want),),
            ).fetchall()
            if {r[0] for r in rows} == want:
                return
            time.sleep(0.05)
        raise TimeoutError(f"waiters {sorted(want)} did not queue on the lock within {timeout_s} s")

    def stop(self) -> None:
        for conn in self._conns:
            try:
                conn.cancel_safe(timeout=2) if not conn.closed else None
            except (psycopg.Error, AttributeError):
                pass
            conn.close()
        for t in self._threads:
            t.join(timeout=5)
        self._conns.clear()
        self._threads.clear()
