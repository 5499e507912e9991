"""Procedure: Memory Leaks (the runbook's `docker stats` over time, heap dumps, "restart services if needed").

Diagnose: sample every running container's memory ``samples`` times ``interval_s`` apart, fit the growth rate by
least squares, project the time to the container's limit and name as leakers the containers that grow steadily
(rate at least ``min_growth_mib_per_min``, a line explaining the samples with r² >= 0.9, and at least 1 MiB grown over
the window, so a one-off step in a tiny container is not a leak). Optional heap-profile hook:
the service's ``heap_profile_command`` from the playbook (an argument list, no shell) runs in each leaker and its
output is attached. With Prometheus configured, the runbook's host Memory Usage query over the window as well.
Remediate (dry run unless dry_run=False): restart the leakers one at a time, each only if it has not restarted
since the alert began (``since``; default: when this run started), waiting for each to run again; verify memory
dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

from pydantic import Field

from runbook.engine.config import Environment
from runbook.engine.errors import BadInput
from runbook.engine.findings import CodeBlock, Finding, Report, Severity, TableBlock
from runbook.engine.params import EnvName, ServiceName
from runbook.engine.procedure import current_run, procedure, unreachable_as_finding
from tasks.container_remediations import RestartLeakers
from tasks.containers import (
    ContainerInfo,
    MemorySeries,
    fit_growth,
    human_bytes,
    list_project_containers,
    run_in_container,
    sample_memory_series,
    sparkline,
)
from tasks.metrics import SYSTEM_QUERIES, PromQLError, range_query, render

MIB = 2**20
MIN_R2 = 0.9
MIN_GROWTH_BYTES = MIB  # a step of a few hundred KiB in a tiny container is not a leak, whatever its rate


@procedure("memory-leak", remediations=(RestartLeakers,), tags=('containers',),
           summary="Memory Leaks: memory growth per container, time to limit, heap hook; rolling restart")
def memory_leak(
    env: EnvName,
    dry_run: bool = True,
    service: Annotated[ServiceName | None, Field(description="only this compose service's containers")] = None,
    samples: Annotated[int, Field(ge=3, le=120, description="memory samples per container")] = 5,
    interval_s: Annotated[float, Field(ge=0.2, le=300, description="seconds between samples")] = 2.0,
    min_growth_mib_per_min: Annotated[float, Field(gt=0, description="slower growth is not a leak")] = 1.0,
    since: Annotated[datetime | None, Field(description="when the alert began: containers (re)started after it "
                                                        "are not restarted again (default: this run's start)")] = None,
    heap_profile: Annotated[bool, Field(description="run the service's heap_profile_command in leakers")] = False,
) -> None:
    """Find containers whose memory grows steadily, project time to their limit; restart them one at a time."""
    run = current_run()
    report, environment = run.report, run.env
    if service is not None and service not in environment.services:
        known = ", ".join(sorted(environment.services)) or "none"
        raise BadInput(f"service {service!r} is not in environments.{env}.services (known: {known})")
    alert_began = since or report.started
    leakers: list[Growth] = []
    with unreachable_as_finding(report):
        if environment.docker is None:
            report.notes.append("no docker section in the playbook: containers not checked")
        else:
            containers = list_project_containers(environment, service)
            series = sample_memory_series(environment, containers, samples, interval_s)
            rows = fit_all(containers, series)
            leakers = assess_growth(report, rows, min_growth_mib_per_min * MIB / 60)
            if heap_profile:
                attach_heap_profiles(report, environment, leakers)
    if environment.prometheus_url:
        with unreachable_as_finding(report):
            prometheus_memory(report, environment, samples * interval_s)
    if leakers:
        rem = RestartLeakers(environment, [r.container.id for r in leakers], alert_began)
        run.offer(rem)
    elif environment.docker is not None:
        report.notes.append("no leaking container: nothing to restart")


# ------------------------------------------------------------------ assessments


@dataclass(frozen=True)
class Growth:
    """A container's memory over the window: first and last usage (bytes), fitted rate (bytes/s), r², limit,
    seconds until the limit at that rate (None when not growing or already there) and a sparkline."""

    container: ContainerInfo
    first: int
    last: int
    limit: int
    rate_bps: float
    r2: float
    to_limit_s: float | None
    trend: str


def fit_all(containers: list[ContainerInfo], series: dict[str, MemorySeries]) -> list[Growth]:
    """Per container: first/last usage, fitted rate, r², time to limit, trend; fastest growth first."""
    rows = []
    for c in containers:
        s = series.get(c.id)
        if not s or len(s.usage) < 2:
            continue
        fit = fit_growth(s.t, s.usage)
        last, limit = s.usage[-1], s.limit
        rate = fit["rate_bps"]
        rows.append(Growth(c, first=s.usage[0], last=last, limit=limit, rate_bps=rate, r2=fit["r2"],
                           to_limit_s=(limit - last) / rate if rate > 0 and limit > last else None,
                           trend=sparkline(s.usage)))
    return sorted(rows, key=lambda r: -r.rate_bps)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return str(timedelta(seconds=int(seconds)))


def assess_growth(report: Report, rows: list[Growth], min_rate_bps: float) -> list[Growth]:
    """One table of memory growth for every container; a finding per leaker. Returns the leakers."""
    if not rows:
        report.notes.append("no running container to sample")
        return []
    leakers = [r for r in rows if r.rate_bps >= min_rate_bps and r.r2 >= MIN_R2
               and r.last - r.first >= MIN_GROWTH_BYTES]
    report.add(Finding(
        title=f"memory growth of {len(rows)} container(s): {len(leakers)} leaking",
        severity=Severity.WARNING if leakers else Severity.INFO, subject="containers",
        blocks=[TableBlock(
            title=f"memory over the window (leak: >= {min_rate_bps * 60 / MIB:g} MiB/min, r² >= {MIN_R2}, "
                  f"grown >= {human_bytes(MIN_GROWTH_BYTES)})",
            columns=["container", "service", "trend", "first", "last", "MiB/min", "r²", "limit", "time to limit",
                     "leak"],
            rows=[[r.container.name, r.container.service, r.trend, human_bytes(r.first), human_bytes(r.last),
                   round(r.rate_bps * 60 / MIB, 2), round(r.r2, 2), human_bytes(r.limit),
                   _eta(r.to_limit_s), "yes" if r in leakers else ""] for r in rows])],
        aggregation_key="memory-growth",
    ))
    for r in leakers:
        c, eta = r.container, r.to_limit_s
        severity = Severity.CRITICAL if eta is not None and eta < 3600 else Severity.WARNING
        report.add(Finding(
            title=f"{c.name} leaks {r.rate_bps * 60 / MIB:.1f} MiB/min; limit reached in {_eta(eta)}",
            severity=severity, subject=f"container {c.name}",
            details={"service": c.service, "usage": human_bytes(r.last), "limit": human_bytes(r.limit),
                     "r2": round(r.r2, 3), "trend": r.trend, "started_at": c.started_at},
            aggregation_key=f"leak:{c.name}",
        ))
    return leakers


def attach_heap_profiles(report: Report, environment: Environment, leakers: list[Growth]) -> None:
    """Run the service's heap_profile_command (from the playbook, an argument list) in each leaker; attach output."""
    for c in (r.container for r in leakers):
        cfg = environment.services.get(c.service)
        command = cfg.heap_profile_command if cfg else None
        if not command:
            report.notes.append(f"{c.service}: no heap_profile_command in the playbook; no profile taken")
            continue
        result = run_in_container(environment, c.id, list(command))
        report.add(Finding(
            title=f"heap profile of {c.name} (exit {result.exit_code})", severity=Severity.INFO,
            subject=f"container {c.name}", details={"command": " ".join(command)},
            blocks=[CodeBlock(title="output (tail)", text=result.output[-4000:])],
            aggregation_key=f"heap-profile:{c.name}",
        ))


def prometheus_memory(report: Report, environment: Environment, window_s: float) -> None:
    """The runbook's host Memory Usage query over the sampling window, with its growth (tasks.metrics)."""

    promql = render(SYSTEM_QUERIES["memory_percent"])
    end = datetime.now(UTC)
    start = end - timedelta(seconds=max(window_s, 60))
    try:
        series = range_query(environment, promql, start=start, end=end, step_s=max(1.0, window_s / 30))
    except PromQLError as exc:
        report.notes.append(str(exc))
        return
    for s in series[:5]:
        values = [v for _, v in s.values]
        if len(values) < 2:
            continue
        t = [(ts - s.values[0][0]).total_seconds() for ts, _ in s.values]
        fit = fit_growth(t, values)
        instance = s.labels.get("instance", "host")
        report.add(Finding(
            title=f"Prometheus memory usage on {instance}: {values[-1]:.1f} % "
                  f"({fit['rate_bps'] * 60:+.2f} points/min) {sparkline(values)}",
            severity=Severity.WARNING if values[-1] >= environment.thresholds.memory_percent else Severity.INFO,
            subject=f"host {instance}", details={"promql": promql}, aggregation_key=f"prometheus-memory:{instance}",
        ))
