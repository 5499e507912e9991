"""PostgreSQL remediations: cancel runaway queries, terminate idle-in-transaction root blockers.

Both follow the check/plan/apply/verify contract (runbook.engine.remediation). Who may be touched is decided in SQL,
once: client backends of the configured database only; never the engine's own sessions, superusers, replication or
other databases. Each planned change carries the backend's identity (pid + backend_start + query_start or
state_change); ``apply`` signals only a backend that still matches it, so a reused pid or a query that finished
in the meantime is left alone and a second apply finds nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import ClassVar

from psycopg.rows import class_row, tuple_row
from pydantic import BaseModel

from runbook.engine.clients import APPLICATION_NAME, postgres
from runbook.engine.config import Environment
from runbook.engine.findings import Change
from runbook.engine.polling import wait_until
from runbook.engine.remediation import Remediation, register
from tasks.postgres import BlockedBy, blocking_tree

_ELIGIBLE = f"""
      FROM pg_stat_activity a
      JOIN pg_roles r ON r.oid = a.usesysid
     WHERE a.datname = current_database()
       AND a.backend_type = 'client backend'
       AND a.pid <> pg_backend_pid()
       AND NOT r.rolsuper
       AND a.application_name <> '{APPLICATION_NAME}'
"""


@dataclass(frozen=True)
class Backend:
    """A backend a remediation may signal, as ``check`` reads it (``since``: query_start or state_change)."""

    pid: int
    usename: str | None
    state: str
    backend_start: datetime
    since: datetime
    query: str | None
    age_s: float
    waiters: list[int] = field(default_factory=list)


class BackendTarget(BaseModel, frozen=True):
    """What a planned signal acts on: a pid only while it is the same backend in the same query or state."""

    pid: int
    backend_start: datetime
    since: datetime
    waiters: list[int] = []


def _snapshot_change(action: str, row: Backend, **extra: object) -> Change:
    return Change(
        action=action,
        subject=f"pid {row.pid}",
        key=f"{action}:pid={row.pid}:start={row.backend_start.isoformat()}:since={row.since.isoformat()}",
        before={
            "user": row.usename,
            "state": row.state,
            "age_s": round(row.age_s, 1),
            "query": (row.query or "")[:500],
            "backend_start": row.backend_start.isoformat(),
            "since": row.since.isoformat(),
            **extra,
        },
        after={"state": "cancelled" if action == "cancel" else "terminated"},
        target=Change.target_of(BackendTarget(pid=row.pid, backend_start=row.backend_start, since=row.since,
                                              waiters=row.waiters)),
    )


class _SignalBackends(Remediation[list[Backend]]):
    """What both share: a threshold from the playbook, and signalling a backend only while it is still the one
    planned (``signal_sql`` takes pid, backend_start and the planned query_start/state_change)."""

    threshold_key: ClassVar[str]
    signal_sql: ClassVar[str]

    def __init__(self, env: Environment, database: str = "main", threshold_s: float | None = None,
                 verify_timeout_s: float = 5.0) -> None:
        self.env, self.database = env, database
        self.threshold_s = threshold_s if threshold_s is not None else getattr(env.thresholds, self.threshold_key)
        self.verify_timeout_s = verify_timeout_s

    def apply(self, plan: list[Change]) -> list[Change]:
        done: list[Change] = []
        with postgres(self.env, self.database) as conn:
            for change in plan:
                t = change.target_as(BackendTarget)
                row = conn.cursor(row_factory=tuple_row).execute(
                    self.signal_sql, (t.pid, t.backend_start, t.since)).fetchone()
                if row and row[0]:
                    done.append(change)
        return done


@register
class CancelLongQueries(_SignalBackends):
    """pg_cancel_backend for active queries older than the threshold (lock waiters excluded: they are victims)."""

    name = "cancel-long-queries"
    threshold_key = "long_query_s"
    signal_sql = ("SELECT pg_cancel_backend(a.pid) AS ok" + _ELIGIBLE +
                  " AND a.pid = %s AND a.backend_start = %s AND a.query_start = %s AND a.state = 'active'")

    @property
    def target(self) -> str:
        return f"{self.env.name}/{self.database} (active > {self.threshold_s:g} s)"

    def check(self) -> list[Backend]:
        with postgres(self.env, self.database) as conn:
            return conn.cursor(row_factory=class_row(Backend)).execute(
                "SELECT a.pid, a.usename, a.state, a.backend_start, a.query_start AS since,"
                " left(a.query, 500) AS query,"
                " extract(epoch FROM now() - a.query_start)::float8 AS age_s" + _ELIGIBLE +
                " AND a.state = 'active' AND coalesce(a.wait_event_type, '') <> 'Lock'"
                " AND now() - a.query_start > make_interval(secs => %s) ORDER BY a.query_start",
                (self.threshold_s,),
            ).fetchall()

    def plan(self, state: list[Backend]) -> list[Change]:
        return [_snapshot_change("cancel", row) for row in state]

    def verify(self, applied: list[Change]) -> tuple[bool, str]:
        targets = [c.target_as(BackendTarget) for c in applied]

        def gone() -> bool:
            with postgres(self.env, self.database) as conn:
                for t in targets:
                    still = conn.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND query_start = %s AND state = 'active'",
                        (t.pid, t.since),
                    ).fetchone()
                    if still:
                        return False
            return True

        ok = wait_until(gone, self.verify_timeout_s)
        pids = ", ".join(c.subject for c in applied)
        return ok, (f"queries of {pids} no longer running" if ok else f"still running after "
                    f"{self.verify_timeout_s:g} s: {pids}")


@register
class TerminateIdleBlockers(_SignalBackends):
    """pg_terminate_backend for root blockers idle in transaction past the threshold; their waiters then proceed."""

    name = "terminate-idle-blockers"
    threshold_key = "idle_in_transaction_s"
    signal_sql = ("SELECT pg_terminate_backend(a.pid, 3000) AS ok" + _ELIGIBLE +
                  " AND a.pid = %s AND a.backend_start = %s AND a.state_change = %s"
                  " AND a.state IN ('idle in transaction', 'idle in transaction (aborted)')")

    @property
    def target(self) -> str:
        return f"{self.env.name}/{self.database} (idle in transaction > {self.threshold_s:g} s, blocking others)"

    def check(self) -> list[Backend]:
        with postgres(self.env, self.database) as conn:
            idle = conn.cursor(row_factory=class_row(Backend)).execute(
                "SELECT a.pid, a.usename, a.state, a.backend_start, a.state_change AS since,"
                " left(a.query, 500) AS query, extract(epoch FROM now() - a.state_change)::float8 AS age_s"
                + _ELIGIBLE
                + " AND a.state IN ('idle in transaction', 'idle in transaction (aborted)')"
                " AND now() - a.state_change > make_interval(secs => %s) ORDER BY a.state_change",
                (self.threshold_s,),
            ).fetchall()
            waits = conn.cursor(row_factory=class_row(BlockedBy)).execute(
                "SELECT pid, pg_blocking_pids(pid) AS blocked_by FROM pg_stat_activity"
                " WHERE datname = current_database()"
            ).fetchall()
        tree = blocking_tree(waits)  # root -> every waiter, through chains
        return [replace(row, waiters=tree[row.pid]) for row in idle if row.pid in tree]

    def plan(self, state: list[Backend]) -> list[Change]:
        return [_snapshot_change("terminate", row, waiters=row.waiters) for row in state]

    def verify(self, applied: list[Change]) -> tuple[bool, str]:
        targets = [c.target_as(BackendTarget) for c in applied]
        pids = [t.pid for t in targets]
        waiters = sorted({w for t in targets for w in t.waiters})

        def settled() -> bool:
            with postgres(self.env, self.database) as conn:
                alive = conn.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchall()
                still_blocked = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s) AND pg_blocking_pids(pid) && %s::int[]",
                    (waiters, pids),
                ).fetchall()
            return not alive and not still_blocked

        ok = wait_until(settled, self.verify_timeout_s)
        if ok:
            terminated = ", ".join(map(str, pids))
            return True, f"terminated {terminated}; waiters {waiters or 'none'} no longer blocked by them"
        return False, f"after {self.verify_timeout_s:g} s, {pids} still alive or still blocking {waiters}"
