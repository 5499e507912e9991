"""Procedure: Application Optimization and Key Metrics (the runbook's cache hit rates and API response times).

Diagnose: Redis hit ratio, evictions, memory and connected clients from INFO; a response-time breakdown per
configured HTTP endpoint (DNS, connect, TLS, time to first byte, total, like ``curl -w``); the runbook's PromQL for
request rate, p95 latency, error rate and active users, compared with the playbook's thresholds (HighErrorRate,
HighResponseTime). The three sources are read concurrently; one that does not answer is a finding, the rest go on.
Remediate: nothing automatic (cache sizing and API fixes are changes to the application); the report says so.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from runbook.engine.config import HttpCheckConfig, Thresholds
from runbook.engine.findings import Finding, Report, Severity, TableBlock
from runbook.engine.params import EnvName
from runbook.engine.procedure import current_run, procedure, unreachable_as_finding
from tasks.cache import CacheStats, get_cache_stats
from tasks.http_checks import breakdown_table, check_http_endpoints
from tasks.metrics import MetricResult, get_app_metrics
from tasks.probes import HttpCheckRow

NOTHING_TO_REMEDIATE = "cache-api diagnoses only: there is nothing to remediate (dry_run changes nothing here)"


@procedure("cache-api", tags=('application',),
           summary="Application Optimization: Redis hit ratio/evictions, API timing breakdown, runbook PromQL")
def cache_api(
    env: EnvName,
    dry_run: bool = True,
    window: Annotated[str, Field(pattern=r"^[1-9][0-9]{0,3}[smh]$", description="PromQL rate window")] = "5m",
    sample_s: Annotated[float, Field(ge=0, le=300, description="also measure the hit ratio over this window")] = 0.0,
) -> None:
    """Redis cache statistics, API timing breakdown and the runbook's application metrics against thresholds."""
    run = current_run()
    report, environment = run.report, run.env
    cache_f = get_cache_stats.submit(environment, sample_s) if environment.redis else None
    http_f = check_http_endpoints.submit(environment) if environment.http_checks else None
    prom_f = get_app_metrics.submit(environment, window) if environment.prometheus_url else None
    for missing, what in ((cache_f, "redis"), (http_f, "http_checks"), (prom_f, "prometheus_url")):
        if missing is None:
            report.notes.append(f"{what} is not configured for this environment: that part was skipped")
    if cache_f is not None:
        with unreachable_as_finding(report):
            assess_cache(report, cache_f.result(), environment.thresholds.cache_hit_ratio)
    if http_f is not None:
        with unreachable_as_finding(report):
            assess_api_timings(report, http_f.result(), environment.thresholds, environment.http_checks)
    if prom_f is not None:
        with unreachable_as_finding(report):
            assess_app_metrics(report, prom_f.result(), environment.thresholds)
    report.notes.append(NOTHING_TO_REMEDIATE)


# ------------------------------------------------------------------ assessments (pure: data in, findings out)


def _bytes(n: int | None) -> str:
    if not n:
        return "0 B" if n == 0 else "unlimited"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def assess_cache(report: Report, stats: CacheStats, min_ratio: float) -> None:
    ratio = stats.window_hit_ratio if stats.window_s else stats.hit_ratio
    hits = stats.window_hits if stats.window_s else stats.keyspace_hits
    misses = stats.window_misses if stats.window_s else stats.keyspace_misses
    evictions = stats.window_evictions if stats.window_s else stats.evicted_keys
    scope = f"over {stats.window_s:g} s" if stats.window_s else "since start/reset"
    details = {"hit_ratio": None if ratio is None else round(ratio, 4), "hits": hits, "misses": misses,
               "evicted_keys": evictions, "used_memory": _bytes(stats.used_memory),
               "maxmemory": _bytes(stats.maxmemory), "maxmemory_policy": stats.maxmemory_policy,
               "connected_clients": stats.connected_clients, "blocked_clients": stats.blocked_clients,
               "rejected_connections": stats.rejected_connections, "redis_version": stats.redis_version}
    if ratio is None:
        title, severity = f"redis: no cache lookups {scope}", Severity.INFO
    else:
        low = ratio < min_ratio
        title = f"redis hit ratio {ratio:.1%} {scope} ({hits} hits, {misses} misses; threshold {min_ratio:.0%})"
        severity = Severity.WARNING if low else Severity.INFO
    report.add(Finding(title=title, severity=severity, subject="redis", details=details,
                       aggregation_key="cache-hit-ratio"))
    if evictions:
        report.add(Finding(title=f"redis evicted {evictions} keys {scope} (policy {stats.maxmemory_policy})",
                           severity=Severity.WARNING, subject="redis", details=details,
                           aggregation_key="cache-evictions"))
    if stats.maxmemory and (stats.used_memory or 0) > 0.9 * stats.maxmemory:
        report.add(Finding(title=f"redis memory {_bytes(stats.used_memory)} of {_bytes(stats.maxmemory)}",
                           severity=Severity.WARNING, subject="redis", details=details,
                           aggregation_key="cache-memory"))


def assess_api_timings(report: Report, rows: list[HttpCheckRow], thresholds: Thresholds,
                       checks: dict[str, HttpCheckConfig]) -> None:
    for r in rows:
        cfg = checks.get(r.name)
        budget = (cfg.slow_s if cfg and cfg.slow_s else None) or thresholds.http_slow_s
        details = {"source": r.source, "destination": r.destination, "status": r.status,
                   "error": r.error, "ttfb_ms": r.ttfb_ms, "total_ms": r.total_ms, "budget_s": budget}
        if not r.ok:
            report.add(Finding(title=f"API {r.destination}: {r.result}" + (f" ({r.error})" if r.error else ""),
                               severity=Severity.CRITICAL, subject=r.destination, details=details,
                               aggregation_key=f"api-fail:{r.destination}"))
        elif (r.total_ms or 0) > budget * 1000:
            report.add(Finding(title=f"slow API endpoint {r.destination}: {(r.total_ms or 0) / 1000:.2f} s "
                                     f"(budget {budget:g} s)",
                               severity=Severity.WARNING, subject=r.destination, details=details,
                               aggregation_key=f"api-slow:{r.destination}"))
    report.add(Finding(title=f"API response times: {len(rows)} endpoint(s) from {rows[0].source}" if rows
                       else "API response times: no endpoints", severity=Severity.INFO, subject="api",
                       blocks=[breakdown_table(rows)], aggregation_key="api-breakdown"))


def _series_label(labels: dict[str, str]) -> str:
    keep = [f"{k}={v}" for k, v in labels.items() if k in ("job", "handler", "status", "instance", "service")]
    return ", ".join(keep) or "(all)"


def assess_app_metrics(report: Report, metrics: dict[str, MetricResult], thresholds: Thresholds) -> None:
    limits = {"error_rate": (thresholds.error_rate_per_s, Severity.CRITICAL, "HighErrorRate"),
              "p95_latency": (thresholds.p95_latency_s, Severity.WARNING, "HighResponseTime")}
    rows = []
    for name, m in metrics.items():
        if m.error:
            report.add(Finding(title=f"PromQL {m.title} failed: {m.error}", severity=Severity.WARNING,
                               subject="prometheus", details={"promql": m.promql},
                               aggregation_key=f"promql-error:{name}"))
            continue
        rows += [[m.title, _series_label(s.labels), f"{s.value:.4g} {m.unit}".strip(), m.promql] for s in m.series]
        if not m.series:
            rows.append([m.title, _series_label({}), "no data", m.promql])
        if name in limits:
            limit, severity, alert = limits[name]
            over = [s for s in m.series if s.value > limit]
            for s in over:
                series = _series_label(s.labels)
                report.add(Finding(
                    title=f"{alert}: {m.title} {s.value:.3g} {m.unit} > {limit:g} ({series})",
                    severity=severity, subject=series,
                    details={"promql": m.promql, "value": s.value, "threshold": limit},
                    aggregation_key=f"{alert}:{_series_label(s.labels)}"))
    report.add(Finding(title="application metrics (Prometheus)", severity=Severity.INFO, subject="prometheus",
                       blocks=[TableBlock(columns=["metric", "series", "value", "promql"], rows=rows)],
                       aggregation_key="app-metrics"))
