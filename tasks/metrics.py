"""Prometheus: the runbook's "Key Metrics to Monitor" as PromQL instant and range queries over the HTTP API.

Every flow that wants metrics calls these. Requests go through httpx with a timeout (the environment's
``prometheus_timeout_s`` unless given); a Prometheus that does not answer raises TargetUnreachable
(runbook.engine.clients), which flows turn into a finding. A query Prometheus rejects raises PromQLError
with Prometheus' own message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from runbook.engine.clients import prometheus
from runbook.engine.config import Environment
from runbook.engine.errors import RunbookError
from runbook.engine.steps import step


class PromQLError(RunbookError):
    """Prometheus answered, but rejected the query or returned an error status."""


@dataclass(frozen=True)
class RunbookQuery:
    title: str
    promql: str  # with {window} where the runbook says [5m]
    unit: str = ""


# The runbook's queries, verbatim except that the [5m] window is a parameter (a sandbox has seconds of data).
APP_QUERIES: dict[str, RunbookQuery] = {
    "request_rate": RunbookQuery("Request Rate", "rate(http_requests_total[{window}])", "req/s"),
    "p95_latency": RunbookQuery(
        "Response Time (p95)", "histogram_quantile(0.95, rate(http_request_duration_seconds_bucket[{window}]))", "s"),
    "error_rate": RunbookQuery("Error Rate", 'rate(http_requests_total{{status=~"5.."}}[{window}])', "req/s"),
    "active_users": RunbookQuery("Active Users", "active_sessions_total"),
}
SYSTEM_QUERIES: dict[str, RunbookQuery] = {
    "cpu_percent": RunbookQuery("CPU Usage", '100 - (avg(rate(node_cpu_seconds_total{{mode="idle"}}[{window}])) * 100)',
                                "%"),
    "memory_percent": RunbookQuery(
        "Memory Usage", "(1 - (node_memory_MemAvailable_bytes / node_memory_MemTotal_bytes)) * 100", "%"),
    "disk_percent": RunbookQuery(
        "Disk Usage", "100 - ((node_filesystem_avail_bytes * 100) / node_filesystem_size_bytes)", "%"),
    "network_rx": RunbookQuery("Network I/O", "rate(node_network_receive_bytes_total[{window}])", "B/s"),
}


def render(query: RunbookQuery, window: str = "5m") -> str:
    """The PromQL text for a runbook query with its range window (validated duration, e.g. 5m, 30s)."""
    if not window or not window[:-1].isdigit() or window[-1] not in "smhd":
        raise ValueError(f"window {window!r}: expected a Prometheus duration such as 30s or 5m")
    return query.promql.format(window=window)


def _value(raw: str) -> float:
    return float(raw)  # Prometheus sends numbers as strings, including "NaN" and "+Inf"


def _check(body: dict[str, Any], promql: str) -> dict[str, Any]:
    if body.get("status") != "success":
        raise PromQLError(f"prometheus rejected {promql!r}: {body.get('errorType', '')} {body.get('error', '')}")
    data: dict[str, Any] = body["data"]
    return data


@dataclass(frozen=True)
class Sample:
    """One series of an instant query: its labels (none for a scalar) and its value."""

    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Series:
    """One series of a range query: its labels and its (time, value) points."""

    labels: dict[str, str]
    values: list[tuple[datetime, float]]


def instant_query(env: Environment, promql: str, *, at: datetime | None = None,
                  timeout_s: float | None = None) -> list[Sample]:
    """``/api/v1/query``: one sample per series (a scalar has no labels)."""
    timeout_s = timeout_s or env.prometheus_timeout_s
    params: dict[str, str | float] = {"query": promql, "timeout": f"{max(1, int(timeout_s * 1000))}ms"}
    if at is not None:
        params["time"] = at.timestamp()
    with prometheus(env, timeout_s) as http:
        res = http.get("/api/v1/query", params=params)
    if res.status_code >= 500 and not res.headers.get("content-type", "").startswith("application/json"):
        raise PromQLError(f"prometheus answered HTTP {res.status_code} to {promql!r}")
    data = _check(res.json(), promql)
    if data["resultType"] in ("scalar", "string"):
        return [Sample({}, _value(data["result"][1]))]
    return [Sample(r["metric"], _value(r["value"][1])) for r in data["result"]]


def range_query(env: Environment, promql: str, *, start: datetime, end: datetime, step_s: float,
                timeout_s: float | None = None) -> list[Series]:
    """``/api/v1/query_range``: one series of (time, value) points per label set."""
    timeout_s = timeout_s or env.prometheus_timeout_s
    params: dict[str, str | float] = {"query": promql, "start": start.timestamp(), "end": end.timestamp(),
                                      "step": step_s, "timeout": f"{max(1, int(timeout_s * 1000))}ms"}
    with prometheus(env, timeout_s) as http:
        res = http.get("/api/v1/query_range", params=params)
    data = _check(res.json(), promql)
    return [Series(r["metric"], [(datetime.fromtimestamp(float(t), UTC), _value(v)) for t, v in r["values"]])
            for r in data["result"]]


@dataclass(frozen=True)
class MetricResult:
    """One runbook query as run: its series (NaN left out), or the error Prometheus gave for it."""

    title: str
    promql: str
    unit: str
    series: list[Sample] = field(default_factory=list)
    error: str = ""


@step
def get_app_metrics(env: Environment, window: str = "5m",
                    timeout_s: float | None = None) -> dict[str, MetricResult]:
    """The runbook's four application metrics by name.

    A rejected query is recorded in ``error`` and the others still run; an unreachable Prometheus raises.
    ``timeout_s`` defaults to the environment's ``prometheus_timeout_s``.
    """
    timeout_s = timeout_s or env.prometheus_timeout_s
    out: dict[str, MetricResult] = {}
    for name, q in APP_QUERIES.items():
        promql = render(q, window)
        try:
            series = [s for s in instant_query(env, promql, timeout_s=timeout_s) if not math.isnan(s.value)]
        except PromQLError as exc:
            out[name] = MetricResult(q.title, promql, q.unit, error=str(exc))
            continue
        out[name] = MetricResult(q.title, promql, q.unit, series)
    return out
