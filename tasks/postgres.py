"""PostgreSQL diagnostics: the runbook's "Database Performance Issues" queries, made safe to run against production.

Every query runs with the playbook's statement timeout on a connection tagged ``application_name=runbook``.
Statement text gathered from the server is only ever EXPLAINed: plain EXPLAIN of a generic plan for parametrised
statements and anything that writes; EXPLAIN ANALYZE only for a parameter-free SELECT, inside a READ ONLY
transaction that is rolled back, with its own statement_timeout.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import psycopg
from psycopg.rows import class_row, tuple_row

from runbook.engine.clients import postgres
from runbook.engine.config import Environment
from runbook.engine.steps import step

# The backends a diagnostic or remediation may look at: client sessions of the configured database, never ours.
_SESSIONS = """
    SELECT a.pid, a.usename, a.application_name, host(a.client_addr) AS client_addr, a.state,
           a.wait_event_type, a.wait_event, a.backend_start, a.xact_start, a.query_start, a.state_change,
           extract(epoch FROM now() - a.query_start)::float8 AS query_age_s,
           extract(epoch FROM now() - a.state_change)::float8 AS state_age_s,
           extract(epoch FROM now() - a.xact_start)::float8 AS xact_age_s,
           pg_blocking_pids(a.pid) AS blocked_by,
           coalesce(r.rolsuper, false) AS superuser,
           left(a.query, 2000) AS query
      FROM pg_stat_activity a
      LEFT JOIN pg_roles r ON r.oid = a.usesysid
     WHERE a.datname = current_database()
       AND a.backend_type = 'client backend'
       AND a.pid <> pg_backend_pid()
"""


@dataclass(frozen=True)
class Session:
    """One client backend of the database, as pg_stat_activity shows it (ages in seconds, None when not set)."""

    pid: int
    usename: str | None
    application_name: str | None
    client_addr: str | None
    state: str | None
    wait_event_type: str | None
    wait_event: str | None
    backend_start: datetime | None
    xact_start: datetime | None
    query_start: datetime | None
    state_change: datetime | None
    query_age_s: float | None
    state_age_s: float | None
    xact_age_s: float | None
    blocked_by: list[int] | None
    superuser: bool
    query: str | None


@dataclass(frozen=True)
class ConnectionTotals:
    """The database's connections against the server's limits."""

    database: str
    numbackends: int | None
    total_clients: int
    max_connections: int
    reserved: int
    server_version: str


@dataclass(frozen=True)
class ActivitySnapshot:
    totals: ConnectionTotals
    sessions: list[Session]


@dataclass(frozen=True)
class BlockedBy:
    """A backend and the pids it waits on (``pg_blocking_pids``)."""

    pid: int
    blocked_by: list[int] | None


class _Waiting(Protocol):
    @property
    def pid(self) -> int: ...
    @property
    def blocked_by(self) -> list[int] | None: ...


def blocking_tree(sessions: Iterable[_Waiting]) -> dict[int, list[int]]:
    """Root blocker pid -> every pid waiting on it, directly or through a chain."""
    blocked_by = {s.pid: list(s.blocked_by or []) for s in sessions}
    roots: dict[int, list[int]] = {}
    for pid, blockers in blocked_by.items():
        stack, seen = list(blockers), set()
        while stack:
            b = stack.pop()
            if b in seen:
                continue
            seen.add(b)
            upstream = blocked_by.get(b, [])
            if upstream:
                stack.extend(upstream)
            else:
                roots.setdefault(b, []).append(pid)
    return {root: sorted(set(waiters)) for root, waiters in roots.items()}


_TOTALS = """SELECT current_database() AS database,
                     (SELECT numbackends FROM pg_stat_database WHERE datname = current_database()) AS numbackends,
                     (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend') AS total_clients,
                     current_setting('max_connections')::int AS max_connections,
                     current_setting('superuser_reserved_connections')::int AS reserved,
                     current_setting('server_version') AS server_version"""


@step(retries=0)
def get_connection_totals(env: Environment, database: str) -> ConnectionTotals:
    """The database's connections against the server's limits (one statement; the server-side side of a pool)."""
    with postgres(env, database) as conn:
        totals = conn.cursor(row_factory=class_row(ConnectionTotals)).execute(_TOTALS).fetchone()
    assert totals is not None  # a SELECT without FROM returns its one row
    return totals


@step(retries=0)
def get_activity_snapshot(env: Environment, database: str) -> ActivitySnapshot:
    """Connections against max_connections, and every client session of the database, in one consistent read."""
    with postgres(env, database) as conn:
        totals = conn.cursor(row_factory=class_row(ConnectionTotals)).execute(_TOTALS).fetchone()
        sessions = conn.cursor(row_factory=class_row(Session)).execute(
            _SESSIONS + " ORDER BY a.query_start NULLS LAST").fetchall()
    assert totals is not None  # a SELECT without FROM returns its one row
    return ActivitySnapshot(totals, sessions)


@dataclass(frozen=True)
class Statement:
    """One pg_stat_statements entry (times in ms)."""

    queryid: int
    query: str
    calls: int
    mean_exec_time: float
    total_exec_time: float
    rows: int
    username: str | None


@step
def get_top_statements(env: Environment, database: str, limit: int = 10) -> list[Statement]:
    """pg_stat_statements ordered by mean time (PG 13+ column names), the engine's own statements left out."""
    with postgres(env, database) as conn:
        present = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'").fetchone()
        if not present:
            return []
        return conn.cursor(row_factory=class_row(Statement)).execute(
            """SELECT s.queryid, s.query, s.calls, s.mean_exec_time, s.total_exec_time, s.rows,
                      r.rolname AS username
                 FROM pg_stat_statements s
                 JOIN pg_database d ON d.oid = s.dbid AND d.datname = current_database()
                 LEFT JOIN pg_roles r ON r.oid = s.userid
                WHERE s.userid <> (SELECT oid FROM pg_roles WHERE rolname = current_user)
                  AND s.query !~* '^\\s*(explain|prepare|deallocate|begin|commit|rollback|set|reset)\\b'
                  AND s.query !~* 'pg_stat_statements_reset'
                ORDER BY s.mean_exec_time DESC
                LIMIT %s""",
            (limit,),
        ).fetchall()


_PARAM = re.compile(r"\$(\d+)")
_EXPLAINABLE = re.compile(r"^\s*(select|with|insert|update|delete|values)\b", re.IGNORECASE)
_READ_ONLY = re.compile(r"^\s*select\b", re.IGNORECASE)
_LOCKING = re.compile(r"\bfor\s+(update|share|no\s+key\s+update|key\s+share)\b", re.IGNORECASE)


def explain_mode(query: str) -> tuple[str, str]:
    """Decide how a statement may be explained: ('analyze'|'generic'|'plain'|'skip', why)."""
    text = query.strip().rstrip(";").strip()
    if ";" in text:
        return "skip", "more than one statement"
    if not _EXPLAINABLE.match(text):
        return "skip", "not a query EXPLAIN accepts"
    if _PARAM.search(text):
        return "generic", "parametrised: generic plan, not executed"
    if _READ_ONLY.match(text) and not _LOCKING.search(text):
        return "analyze", "read-only SELECT: EXPLAIN ANALYZE in a read-only transaction, rolled back"
    return "plain", "writes or locks: plain EXPLAIN, not executed"


@dataclass(frozen=True)
class Explained:
    """How one statement was explained (``explain_mode``) and its JSON plan, or why there is none."""

    query: str
    mode: str
    why: str
    plan: Any = None
    error: str = ""


@step
def explain_statements(env: Environment, database: str, queries: list[str],
                       analyze_timeout_ms: int = 3000) -> list[Explained]:
    """EXPLAIN each statement safely (see ``explain_mode``); a statement that cannot be explained says why."""
    results: list[Explained] = []
    with postgres(env, database) as conn:
        for query in queries:
            mode, why = explain_mode(query)
            plan: Any = None
            error = ""
            if mode != "skip":
                try:
                    plan = _explain(conn, query.strip().rstrip(";"), mode, analyze_timeout_ms)
                except psycopg.Error as exc:
                    error = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                finally:
                    conn.execute("ROLLBACK")
                    conn.execute("DEALLOCATE ALL")  # PREPARE is not transactional
            results.append(Explained(query, mode, why, plan, error))
    return results


def _explain(conn: psycopg.Connection[Any], query: str, mode: str, timeout_ms: int) -> Any:
    cur = conn.cursor(row_factory=tuple_row)
    cur.execute("BEGIN READ ONLY")
    cur.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
    if mode == "generic":
        n = max(int(m) for m in _PARAM.findall(query))
        cur.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        # The statement text comes from the server's own statistics, never from an alert or the CLI.
        cur.execute(b"PREPARE runbook_explain AS " + query.encode(), prepare=False)
        cur.execute(
            "EXPLAIN (FORMAT JSON) EXECUTE runbook_explain(" + ", ".join(["NULL"] * n) + ")", prepare=False
        )
    elif mode == "analyze":
        cur.execute(b"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query.encode(), prepare=False)
    else:
        cur.execute(b"EXPLAIN (FORMAT JSON) " + query.encode(), prepare=False)
    row = cur.fetchone()
    return row[0][0] if row else None


_FILTER_COLUMN = re.compile(r"\(?\b([a-z_][a-z0-9_]*)\s*(?:=|<>|<=|>=|<|>|~~\*?|!~~)\s", re.IGNORECASE)


def seq_scan_filters(plan: Any) -> list[tuple[str, str, list[str]]]:
    """(schema, table, filter columns) of every Seq Scan with a filter in a JSON plan: index candidates."""
    found: list[tuple[str, str, list[str]]] = []

    def walk(node: dict[str, Any]) -> None:
        if node.get("Node Type") == "Seq Scan" and node.get("Filter") and node.get("Relation Name"):
            cols = sorted({c for c in _FILTER_COLUMN.findall(node["Filter"]) if c.lower() not in {"and", "or", "not"}})
            if cols:
                found.append((node.get("Schema", "public"), node["Relation Name"], cols))
        for child in node.get("Plans", []):
            walk(child)

    if isinstance(plan, dict) and "Plan" in plan:
        walk(plan["Plan"])
    return found


@dataclass(frozen=True)
class TableScans:
    schemaname: str
    relname: str
    seq_scan: int
    seq_tup_read: int
    idx_scan: int
    n_live_tup: int


@dataclass(frozen=True)
class ColumnStats:
    attname: str
    n_distinct: float
    correlation: float | None


@dataclass(frozen=True)
class IndexAnalysis:
    """A hot table: its scans, the pg_stats of its filter columns, and the indexes that would serve them."""

    scans: TableScans
    filter_columns: list[str]
    column_stats: list[ColumnStats]
    indexed_leading_columns: list[str]
    missing_index_on: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)


@step
def analyze_indexes(env: Environment, database: str, tables: list[str],
                    filter_columns: dict[str, list[str]]) -> list[IndexAnalysis]:
    """Per hot table: seq vs index scans, the runbook's pg_stats query for filter columns, and missing indexes."""
    out: list[IndexAnalysis] = []
    with postgres(env, database) as conn:
        hot = conn.cursor(row_factory=tuple_row).execute(
            """SELECT relname FROM pg_stat_user_tables
                WHERE seq_scan > 0 ORDER BY seq_tup_read DESC LIMIT 5"""
        ).fetchall()
        names = list(dict.fromkeys([*tables, *filter_columns, *(r[0] for r in hot)]))
        for table in names:
            stats = conn.cursor(row_factory=class_row(TableScans)).execute(
                """SELECT schemaname, relname, seq_scan, seq_tup_read, coalesce(idx_scan, 0) AS idx_scan,
                          n_live_tup
                     FROM pg_stat_user_tables WHERE relname = %s""",
                (table,),
            ).fetchone()
            if not stats:
                continue
            columns = filter_columns.get(table, [])
            col_stats = conn.cursor(row_factory=class_row(ColumnStats)).execute(
                """SELECT attname, n_distinct, correlation FROM pg_stats
                    WHERE schemaname = %s AND tablename = %s AND attname = ANY(%s)""",
                (stats.schemaname, table, columns),
            ).fetchall()
            leading = {
                r[0]
                for r in conn.cursor(row_factory=tuple_row).execute(
                    """SELECT a.attname FROM pg_index i
                         JOIN pg_class c ON c.oid = i.indrelid
                         JOIN pg_namespace n ON n.oid = c.relnamespace
                         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0]
                        WHERE n.nspname = %s AND c.relname = %s AND i.indisvalid""",
                    (stats.schemaname, table),
                ).fetchall()
            }
            missing = [c for c in columns if c not in leading]
            out.append(IndexAnalysis(
                scans=stats, filter_columns=columns, column_stats=col_stats,
                indexed_leading_columns=sorted(leading), missing_index_on=missing,
                suggestions=[f"CREATE INDEX CONCURRENTLY ON {stats.schemaname}.{table} ({c});" for c in missing],
            ))
    return out
