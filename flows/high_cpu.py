"""Procedure: High CPU Usage (the runbook's `docker stats --no-stream`, `top -p ...`, long-running queries, ERROR logs,
"scale if needed").

Diagnose: every container of the compose project ranked by CPU % from two samples (correct on Docker Engine and
Podman), the hot containers' processes and recent ERROR log lines, each SSH host's load and top processes, active
queries running longer than ``long_query_s`` (the runbook's pg_stat_activity check), and the runbook's Prometheus CPU
query when ``prometheus_url`` is configured.
Remediate (dry run unless dry_run=False): scale the hot service (or the one named) to ``replicas`` (default: the
playbook's max_replicas) by creating containers with the same image, config, labels and network. If N or more run, it
changes nothing.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from assessments.hosts import host_findings
from assessments.postgres import assess_long_queries
from runbook.engine.config import Environment, ServiceConfig
from runbook.engine.findings import Block, Finding, Report, Severity, TableBlock
from runbook.engine.params import DbName, EnvName, ServiceName
from runbook.engine.procedure import current_run, procedure, unreachable_as_finding
from tasks.container_remediations import ScaleService
from tasks.containers import (
    ContainerLogs,
    ContainerStats,
    get_container_logs,
    get_container_processes,
    human_bytes,
    list_project_containers,
    sample_container_stats,
)
from tasks.hosts import collect_host_snapshots
from tasks.metrics import SYSTEM_QUERIES, PromQLError, instant_query, render
from tasks.postgres import get_activity_snapshot

MAX_HOT = 3  # hot containers whose processes and logs are read
_ANY = ServiceConfig.model_validate({})  # every setting at its default


@procedure("high-cpu", remediations=(ScaleService,), tags=('containers',),
           summary="High CPU Usage: containers and host processes by CPU, long queries, ERROR logs; scale")
def high_cpu(
    env: EnvName,
    dry_run: bool = True,
    service: Annotated[ServiceName | None, Field(description="scale this service (default: the hottest one)")] = None,
    replicas: Annotated[int | None, Field(ge=1, le=100, description="scale to N (default: max_replicas)")] = None,
    sample_interval_s: Annotated[float, Field(ge=0.2, le=30, description="between the two CPU samples")] = 1.0,
    database: DbName = "main",
    prometheus_window: Annotated[str, Field(pattern=r"^\d{1,4}[smh]$", description="the [5m] of the CPU query")] = "5m",
) -> None:
    """Rank containers and host processes by CPU, correlate with long queries and ERROR logs; scale if allowed."""
    run = current_run()
    report, environment = run.report, run.env
    threshold = environment.thresholds.cpu_percent
    if service is not None and environment.docker is not None:  # bad input fails before minutes of diagnosis
        ScaleService(environment, service, replicas or environment.services.get(service, _ANY).max_replicas)
    hosts_f = collect_host_snapshots.submit(environment) if environment.ssh_hosts else None
    db_f = get_activity_snapshot.submit(environment, database) if database in environment.databases else None

    stats: list[ContainerStats] = []
    with unreachable_as_finding(report):
        if environment.docker is None:
            report.notes.append("no docker section in the playbook: containers not checked")
        else:
            stats = sample_container_stats(environment, list_project_containers(environment), sample_interval_s)
            assess_container_cpu(report, stats, threshold)
            hot = [s for s in stats if s.cpu_percent >= threshold][:MAX_HOT]
            procs_f = [get_container_processes.submit(environment, s.id) for s in hot]
            logs_f = [get_container_logs.submit(environment, s.id) for s in stats[:MAX_HOT]]
            assess_hot_containers(report, hot, [f.result() for f in procs_f], {
                s.name: f.result() for s, f in zip(stats[:MAX_HOT], logs_f, strict=True)})
    if hosts_f is not None:
        with unreachable_as_finding(report):
            for finding in host_findings(hosts_f.result(), environment.thresholds):
                report.add(finding)
    if db_f is not None:
        with unreachable_as_finding(report):
            before = len(report.findings)
            assess_long_queries(report, db_f.result().sessions, environment.thresholds.long_query_s)
            if len(report.findings) == before:
                report.notes.append(f"no active query in {database} older than "
                                    f"{environment.thresholds.long_query_s:g} s")
    if environment.prometheus_url:
        with unreachable_as_finding(report):
            prometheus_cpu(report, environment, prometheus_window, threshold)

    target = service or next((s.service for s in stats if s.cpu_percent >= threshold and s.service), None)
    if target is None:
        report.notes.append(f"no container at or above {threshold:g} % CPU: nothing to scale")
    elif target not in environment.services:
        report.notes.append(f"hot service {target!r} is not in the playbook's services: not scaled")
    elif environment.docker is not None:
        n = replicas or environment.services[target].max_replicas
        run.offer(ScaleService(environment, target, n))


# ------------------------------------------------------------------ assessments (pure: data in, findings out)


def assess_container_cpu(report: Report, stats: list[ContainerStats], threshold: float) -> None:
    """One table of every container by CPU (the `docker stats --no-stream` view), severity from the hottest."""
    if not stats:
        report.notes.append("no running container in the compose project")
        return
    worst = stats[0]
    severity = Severity.WARNING if worst.cpu_percent >= threshold else Severity.INFO
    report.add(Finding(
        title=f"top CPU: {worst.name} at {worst.cpu_percent:.0f} % (threshold {threshold:g} % of one core)",
        severity=severity, subject=f"container {worst.name}",
        blocks=[TableBlock(title="containers by CPU (two samples; 100 % = one core)",
                           columns=["container", "service", "cpu %", "memory", "mem %"],
                           rows=[[s.name, s.service, s.cpu_percent, human_bytes(s.mem_usage), s.mem_percent]
                                 for s in stats])],
        aggregation_key="containers-cpu",
    ))


def assess_hot_containers(report: Report, hot: list[ContainerStats], processes: list[list[dict[str, str]]],
                          logs: dict[str, ContainerLogs]) -> None:
    """Per hot container: its processes and its recent ERROR lines (the runbook's `logs backend | grep ERROR`).

    ``logs`` is by container name, and may hold containers that are not hot (their ERROR lines become notes)."""
    for s, procs in zip(hot, processes, strict=True):
        log = logs.get(s.name, ContainerLogs())
        titles = list(procs[0]) if procs else []
        blocks: list[Block] = [TableBlock(title="processes", columns=titles, rows=[list(p.values()) for p in procs])]
        if log.errors:
            blocks.append(TableBlock(title="last ERROR lines", columns=["line"], rows=[[e] for e in log.errors]))
        report.add(Finding(
            title=f"{s.name} ({s.service}) uses {s.cpu_percent:.0f} % CPU; "
                  f"{log.error_count} ERROR line(s) in its last {log.lines} log lines",
            severity=Severity.WARNING, subject=f"container {s.name}",
            details={"service": s.service, "memory": human_bytes(s.mem_usage)},
            blocks=blocks, aggregation_key=f"hot-container:{s.name}",
        ))
    hot_names = {s.name for s in hot}
    for name, log in logs.items():
        if log.error_count and name not in hot_names:
            report.notes.append(f"container {name}: {log.error_count} ERROR line(s) in its recent logs")


def prometheus_cpu(report: Report, environment: Environment, window: str, threshold: float) -> None:
    """The runbook's CPU Usage query (tasks.metrics), as a finding when Prometheus is configured."""

    promql = render(SYSTEM_QUERIES["cpu_percent"], window)
    try:
        rows = instant_query(environment, promql)
    except PromQLError as exc:
        report.notes.append(str(exc))
        return
    if not rows:
        report.notes.append(f"Prometheus has no data for {promql}")
        return
    value = rows[0].value
    report.add(Finding(
        title=f"Prometheus CPU usage (node_exporter, {window}): {value:.0f} %",
        severity=Severity.WARNING if value >= threshold else Severity.INFO, subject="prometheus",
        details={"promql": promql}, aggregation_key="prometheus-cpu",
    ))
