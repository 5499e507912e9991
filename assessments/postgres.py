"""Assessments of PostgreSQL evidence (pg_stat_activity rows from tasks.postgres) shared by db-slowness and high-cpu."""

from __future__ import annotations

from collections.abc import Sequence

from runbook.engine.findings import Finding, Report, Severity, TableBlock
from tasks.postgres import Session


def assess_long_queries(report: Report, sessions: Sequence[Session], threshold_s: float) -> None:
    long = [s for s in sessions if s.state == "active" and (s.query_age_s or 0) > threshold_s
            and s.wait_event_type != "Lock"]
    if not long:
        return
    report.add(Finding(
        title=f"{len(long)} active quer{'y' if len(long) == 1 else 'ies'} running longer than {threshold_s:g} s",
        severity=Severity.WARNING, subject="long-running queries",
        blocks=[TableBlock(columns=["pid", "user", "age s", "wait", "query"], rows=[
            [s.pid, s.usename, round(s.query_age_s or 0, 1), s.wait_event or "", (s.query or "")[:200]]
            for s in long])],
        aggregation_key="db-long-queries",
    ))
