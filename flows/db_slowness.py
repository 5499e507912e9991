"""Procedure: Database Performance Issues (the runbook's "check slow queries / check locks / analyze query plans").

Diagnose: connections against max_connections and the DatabaseConnectionHigh threshold, beside the application's
connection pools (each service's ``pool_status_command``, the runbook's "Database Optimization"); long-running active
queries; lock waits as a blocking tree naming the root blocker; the slowest statements from pg_stat_statements;
their plans; index analysis of hot tables with a suggested index where a filter column has none.
Remediate (dry run unless dry_run=False): cancel queries running past ``long_query_s``; terminate root blockers
idle in transaction past ``idle_in_transaction_s``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from assessments.pools import pool_finding
from assessments.postgres import assess_long_queries
from runbook.engine.findings import Finding, Report, Severity, TableBlock
from runbook.engine.params import DbName, EnvName
from runbook.engine.procedure import current_run, procedure, unreachable_as_finding
from tasks.pool_status import get_pool_status
from tasks.postgres import (
    ConnectionTotals,
    Explained,
    IndexAnalysis,
    Session,
    Statement,
    analyze_indexes,
    blocking_tree,
    explain_statements,
    get_activity_snapshot,
    get_top_statements,
    seq_scan_filters,
)
from tasks.postgres_remediations import CancelLongQueries, TerminateIdleBlockers


@procedure("db-slowness", remediations=(CancelLongQueries, TerminateIdleBlockers), tags=("database",),
           summary="Database Performance Issues: connections, long queries, lock tree, slow statements, indexes")
def db_slowness(
    env: EnvName,
    database: DbName = "main",
    dry_run: bool = True,
    long_query_s: Annotated[float | None, Field(gt=0, description="cancel active queries older (s)")] = None,
    idle_in_transaction_s: Annotated[float | None, Field(gt=0, description="terminate idle blockers older (s)")] = None,
    top: Annotated[int, Field(ge=1, le=50, description="how many statements to rank and explain")] = 10,
) -> None:
    """Diagnose a slow database and, unless dry_run, cancel runaway queries and terminate idle root blockers."""
    run = current_run()
    report, environment = run.report, run.env
    long_s = long_query_s or environment.thresholds.long_query_s
    idle_s = idle_in_transaction_s or environment.thresholds.idle_in_transaction_s
    pools_f = ([get_pool_status.submit(environment, s) for s, c in environment.services.items()
                if c.pool_status_command] if environment.docker is not None else [])
    totals: list[ConnectionTotals] = []
    with unreachable_as_finding(report):
        snapshot_f = get_activity_snapshot.submit(environment, database)
        top_f = get_top_statements.submit(environment, database, top)
        snapshot, statements = snapshot_f.result(), top_f.result()
        totals.append(snapshot.totals)
        assess_connections(report, snapshot.totals, environment.thresholds.db_connections)
        assess_long_queries(report, snapshot.sessions, long_s)
        assess_locks(report, snapshot.sessions, idle_s)
        plans = explain_statements(environment, database, [s.query for s in statements[:3]])
        assess_statements(report, statements, plans)
        filters = _filter_columns(plans)
        indexes = analyze_indexes(environment, database, list(filters), filters)
        assess_indexes(report, indexes)
        run.offer(CancelLongQueries(environment, database, long_s))
        run.offer(TerminateIdleBlockers(environment, database, idle_s))
    with unreachable_as_finding(report):
        pools = pool_finding([p for f in pools_f for p in f.result()], totals)
        if pools is not None:
            report.add(pools)


# ------------------------------------------------------------------ assessments (pure: data in, findings out)


def assess_connections(report: Report, totals: ConnectionTotals, threshold: int) -> None:
    used, limit = int(totals.total_clients), int(totals.max_connections) - int(totals.reserved)
    numbackends = int(totals.numbackends or 0)
    severity = Severity.INFO
    if numbackends > threshold or used >= 0.9 * limit:
        severity = Severity.CRITICAL
    elif used >= 0.75 * limit:
        severity = Severity.WARNING
    report.add(Finding(
        title=f"{numbackends} connections to {totals.database} ({used} of {limit} usable server-wide)",
        severity=severity, subject=f"database {totals.database}",
        details={"numbackends": numbackends, "alert_threshold": threshold, "server_clients": used,
                 "max_connections": totals.max_connections, "server_version": totals.server_version},
        aggregation_key="db-connections",
    ))


def assess_locks(report: Report, sessions: list[Session], idle_threshold_s: float) -> None:
    by_pid = {s.pid: s for s in sessions}
    for root, waiters in sorted(blocking_tree(sessions).items()):
        r = by_pid.get(root)  # a root outside the database's client sessions (another database, a worker)
        state = (r.state if r else None) or "unknown"
        age = (r.state_age_s if r else None) or 0.0
        critical = state.startswith("idle in transaction") and age > idle_threshold_s
        rows = [_waiter_row(w, by_pid.get(w)) for w in waiters]
        report.add(Finding(
            title=f"root blocker pid {root} ({state} for {age:.0f} s) blocks {len(waiters)} session(s)",
            severity=Severity.CRITICAL if critical or len(waiters) > 1 else Severity.WARNING,
            subject=f"pid {root}",
            details={"user": r.usename if r else None, "state": state,
                     "application": r.application_name if r else None, "client": r.client_addr if r else None,
                     "last_query": ((r.query if r else None) or "")[:300],
                     "transaction_age_s": round((r.xact_age_s if r else None) or 0, 1)},
            blocks=[TableBlock(title="waiting on it", columns=["pid", "user", "waiting s", "query"], rows=rows)],
            aggregation_key=f"db-lock-root:{root}",
        ))


def _waiter_row(pid: int, s: Session | None) -> list[object]:
    if s is None:
        return [pid, "?", 0, ""]
    return [pid, s.usename, round(s.query_age_s or 0, 1), (s.query or "")[:160]]


def assess_statements(report: Report, statements: list[Statement], plans: list[Explained]) -> None:
    if not statements:
        report.notes.append("pg_stat_statements has no completed statements (or the extension is missing)")
        return
    worst = statements[0]
    report.add(Finding(
        title=f"slowest statement: mean {worst.mean_exec_time:.1f} ms over {worst.calls} calls",
        severity=Severity.WARNING if worst.mean_exec_time > 1000 else Severity.INFO,
        subject=f"queryid {worst.queryid}",
        details={"query": worst.query[:300]},
        blocks=[TableBlock(title="top statements by mean time",
                           columns=["mean ms", "calls", "total ms", "user", "query"],
                           rows=[[round(s.mean_exec_time, 1), s.calls, round(s.total_exec_time, 1),
                                  s.username, s.query[:160]] for s in statements])],
        aggregation_key="db-top-statements",
    ))
    for p in plans:
        plan = p.plan or {}
        root = plan.get("Plan", {})
        summary = (f"{root.get('Node Type', '?')} cost {root.get('Total Cost', '?')}"
                   + (f", {plan.get('Execution Time', 0):.1f} ms measured" if "Execution Time" in plan else ""))
        report.add(Finding(
            title=f"plan ({p.mode}): {summary if p.plan else p.error or p.why}",
            severity=Severity.INFO, subject=p.query[:80],
            details={"how": p.why, **({"error": p.error} if p.error else {})},
            aggregation_key="db-plan",
        ))


def _filter_columns(plans: list[Explained]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in plans:
        for _schema, table, cols in seq_scan_filters(p.plan):
            out[table] = sorted(set(out.get(table, [])) | set(cols))
    return out


def assess_indexes(report: Report, indexes: list[IndexAnalysis]) -> None:
    for t in indexes:
        if not t.missing_index_on:
            continue
        scans = t.scans
        report.add(Finding(
            title=f"{scans.relname}: sequential scans filter on {', '.join(t.missing_index_on)} with no index",
            severity=Severity.WARNING, subject=f"table {scans.schemaname}.{scans.relname}",
            details={"seq_scan": scans.seq_scan, "seq_tup_read": scans.seq_tup_read, "idx_scan": scans.idx_scan,
                     "live_rows": scans.n_live_tup, "suggested": " ".join(t.suggestions)},
            blocks=[TableBlock(title="pg_stats of filter columns", columns=["column", "n_distinct", "correlation"],
                               rows=[[c.attname, c.n_distinct, c.correlation] for c in t.column_stats])],
            aggregation_key=f"db-missing-index:{scans.relname}",
        ))
