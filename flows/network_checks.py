"""Procedure: Network Issues (the runbook's "check connectivity" and "check DNS resolution").

Diagnose: a connectivity matrix (TCP connect with latency) from the host and from inside each service container to
the playbook's targets (e.g. backend to db:5432 and redis:6379); the playbook's HTTP(S) endpoints (the payment
provider, the API health URL) with status, a curl-style timing breakdown and TLS certificate days left; DNS
resolution on the host and in containers with timing. Every finding names source, destination, result and error.
Remediate: nothing. Network faults are fixed outside the runbook's reach; the report says so.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from runbook.engine.config import HttpCheckConfig, NetworkConfig, Thresholds
from runbook.engine.findings import Finding, Report, Severity, TableBlock
from runbook.engine.params import EnvName
from runbook.engine.procedure import current_run, procedure, unreachable_as_finding
from tasks.http_checks import breakdown_table, http_rows
from tasks.network import check_connectivity
from tasks.probes import CheckRow, HttpCheckRow

NOTHING_TO_REMEDIATE = "network-checks diagnoses only: there is nothing to remediate (dry_run changes nothing here)"


@procedure("network-checks", tags=('network',),
           summary="Network Issues: TCP matrix from host and containers, HTTPS endpoints with TLS days, DNS")
def network_checks(
    env: EnvName,
    dry_run: bool = True,
    include_http: Annotated[bool, Field(description="also check the playbook's HTTP(S) endpoints")] = True,
) -> None:
    """Connectivity matrix, HTTP(S) endpoints with TLS days left, and DNS, from the host and inside containers."""
    run = current_run()
    report, environment = run.report, run.env
    cfg = environment.network or NetworkConfig.model_validate({})
    if not cfg.targets and not cfg.dns_names and not (include_http and environment.http_checks):
        report.notes.append("no network targets, DNS names or HTTP checks are configured for this environment")
    with unreachable_as_finding(report):
        result = check_connectivity(environment, cfg, include_http)
        assess_network(report, result.rows, environment.thresholds, environment.http_checks)
        report.notes.extend(result.notes)
    report.notes.append(NOTHING_TO_REMEDIATE)


# ------------------------------------------------------------------ assessments (pure: rows in, findings out)


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def assess_network(report: Report, rows: list[CheckRow], thresholds: Thresholds,
                   http_checks: dict[str, HttpCheckConfig]) -> None:
    """One finding per failed, slow or expiring check (naming source and destination), plus the matrix itself."""
    if not rows:
        return
    for r in rows:
        details = {"source": r.source, "destination": r.destination, "result": r.result,
                   "error": r.error, "latency_ms": r.latency_ms}
        key = f"net:{r.kind}:{r.source}:{r.destination}"
        if not r.ok:
            report.add(Finding(
                title=f"{r.kind.upper()} {r.source} → {r.destination}: {r.result}"
                      + (f" ({r.error})" if r.error else ""),
                severity=Severity.CRITICAL, subject=r.destination, details=details, aggregation_key=key))
            continue
        # from a container the time includes the exec round trip through the engine: not a connect latency
        from_host = not r.source.startswith("container ")
        if r.kind == "tcp" and from_host and (r.latency_ms or 0) > thresholds.tcp_slow_ms:
            report.add(Finding(
                title=f"slow TCP connect {r.source} → {r.destination}: {r.latency_ms or 0:.0f} ms "
                      f"(threshold {thresholds.tcp_slow_ms:g} ms)",
                severity=Severity.WARNING, subject=r.destination, details=details, aggregation_key=key))
        if isinstance(r, HttpCheckRow):
            assess_http_row(report, r, thresholds, http_checks.get(r.name))
    report.add(Finding(
        title=f"connectivity: {sum(r.ok for r in rows)} of {len(rows)} checks passed",
        severity=Severity.INFO, subject="network matrix",
        blocks=[TableBlock(title="checks", columns=["source", "destination", "kind", "result", "ms", "error"],
                           rows=[[r.source, r.destination, r.kind, r.result, _ms(r.latency_ms), r.error]
                                 for r in rows]),
                *([breakdown_table(rows)] if http_rows(rows) else [])],
        aggregation_key="net-matrix"))


def assess_http_row(report: Report, r: HttpCheckRow, thresholds: Thresholds, cfg: HttpCheckConfig | None) -> None:
    """Slow endpoint and TLS expiry findings for one passing HTTP check."""
    slow_s = (cfg.slow_s if cfg and cfg.slow_s else None) or thresholds.http_slow_s
    details = {"source": r.source, "destination": r.destination, "result": r.result, "error": r.error,
               "dns_ms": r.dns_ms, "connect_ms": r.connect_ms, "tls_ms": r.tls_ms, "ttfb_ms": r.ttfb_ms,
               "total_ms": r.total_ms}
    if (r.total_ms or 0) > slow_s * 1000:
        report.add(Finding(
            title=f"slow endpoint {r.source} → {r.destination}: {(r.total_ms or 0) / 1000:.2f} s "
                  f"(budget {slow_s:g} s, first byte after {_ms(r.ttfb_ms)} ms)",
            severity=Severity.WARNING, subject=r.destination, details=details,
            aggregation_key=f"http-slow:{r.destination}"))
    days = r.cert_days_left
    if days is not None and days < thresholds.cert_days_warning:
        report.add(Finding(
            title=f"TLS certificate of {r.destination} expires in {days:g} days ({r.cert_expires})",
            severity=Severity.CRITICAL if days < 0 else Severity.WARNING, subject=r.destination,
            details={**details, "cert_days_left": days, "threshold_days": thresholds.cert_days_warning},
            aggregation_key=f"tls-expiry:{r.destination}"))
