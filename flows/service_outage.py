"""Procedure: Emergency Response, Service Outage (the runbook's immediate actions, communication and recovery).

Diagnose: the service's health endpoint (``services.<service>.health_url``, else ``http_checks.<service>-health``),
every project container's state, restarts and exit code, Prometheus `up` when configured, recent deployments
(containers created or images built in the last ``deploy_hours``), host resources over SSH, and the service's recent
ERROR log lines; the service's connection pools (its ``pool_status_command``) beside each playbook database's
server-side connection counts.
Remediate (dry run unless dry_run=False): roll back a bad deployment (rollback-service: replicas created from
another image within ``deploy_hours`` while the service is down, crash-looping or unhealthy are recreated from the
last known good image, one at a time); start the service's stopped containers; verify they run and the health
endpoint answers.
Last known good: when the service is seen healthy (every replica running on one image for ``lkg_min_uptime_s``,
the health endpoint answering), its replicas' image and configuration are recorded (tasks.last_known_good). That
happens on a dry run too: it is the engine's memory of what it saw, not a change to the platform, and a rollback
can only ever go back to a state a run saw healthy.
Communicate: when the run finds the outage (a critical finding) and the environment has an ``incident_webhook``, it
posts a summary there (the runbook's "Post in incident channel") after the remediation step, saying plainly whether
anything was changed. That happens on a dry run too: a post is communication, not a change to the platform, and an
alert that runs this procedure under a dry-run policy is exactly when people must hear of the outage. Pass
``notify=False`` to look without telling anyone (e.g. an operator re-running the diagnosis by hand).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from assessments.hosts import host_findings
from assessments.pools import pool_finding
from runbook.engine.config import Environment, HttpCheckConfig
from runbook.engine.errors import BadInput, TargetUnreachable
from runbook.engine.findings import Finding, Report, Severity, TableBlock
from runbook.engine.notify import incident_detail, post_json, slack_escape
from runbook.engine.params import EnvName, ServiceName
from runbook.engine.procedure import current_run, procedure, unreachable_as_finding
from runbook.engine.redact import redact
from runbook.engine.steps import step
from tasks.container_remediations import StartServiceContainers
from tasks.container_rollback import RollbackService, unhealthy_replicas
from tasks.containers import (
    ContainerInfo,
    ContainerLogs,
    RecentChange,
    get_container_logs,
    get_recent_changes,
    list_project_containers,
)
from tasks.hosts import collect_host_snapshots
from tasks.http_checks import check_http
from tasks.last_known_good import (
    LastKnownGood,
    healthy_reason,
    image_exists,
    load_last_known_good,
    record_last_known_good,
    short_id,
)
from tasks.metrics import PromQLError, instant_query
from tasks.pool_status import PoolStatus, get_pool_status
from tasks.postgres import get_connection_totals
from tasks.probes import HttpCheckRow


@procedure("service-outage", remediations=(RollbackService, StartServiceContainers), tags=('containers',),
           summary="Service Outage: health, container states, up, deployments, hosts, errors; roll back, start; "
                   "notify")
def service_outage(
    env: EnvName,
    service: ServiceName = "backend",
    dry_run: bool = True,
    deploy_hours: Annotated[float, Field(gt=0, le=24 * 30, description="'recent deployments' look-back")] = 24,
    notify: Annotated[bool, Field(description="post the summary to incident_webhook when an outage is found")] = True,
    lkg_min_uptime_s: Annotated[float, Field(ge=0, le=86400, description="replicas up at least this long (and "
                                             "healthy) are recorded as the last known good")] = 30,
) -> None:
    """Health, container states, `up`, recent deployments, hosts and errors; roll back or start; notify."""
    run = current_run()
    report, environment = run.report, run.env
    if service not in environment.services:
        known = ", ".join(sorted(environment.services)) or "none"
        raise BadInput(f"service {service!r} is not in environments.{env}.services (known: {known})")
    hosts_f = collect_host_snapshots.submit(environment) if environment.ssh_hosts else None
    health = environment.http_checks.get(f"{service}-health")
    health_url = environment.services[service].health_url or (health.url if health else None)
    health_f = check_service_health.submit(service, health_url) if health_url else None
    pools_f = (get_pool_status.submit(environment, service)
               if environment.docker is not None and environment.services[service].pool_status_command else None)

    mine: list[ContainerInfo] | None = None
    changes: list[RecentChange] = []
    with unreachable_as_finding(report):
        if environment.docker is None:
            report.notes.append("no docker section in the playbook: containers not checked")
        else:
            containers = list_project_containers(environment)
            mine = [c for c in containers if c.service == service]
            logs_f = {c.name: get_container_logs.submit(environment, c.id) for c in mine}
            changes_f = get_recent_changes.submit(environment, containers, deploy_hours)
            assess_containers(report, service, containers)
            assess_error_logs(report, service, {n: f.result() for n, f in logs_f.items()})
            changes = changes_f.result()
            assess_recent_changes(report, changes, deploy_hours)
    health_row = health_f.result() if health_f is not None else None
    if health_row is not None:
        assess_health(report, service, health_row)
    else:
        report.notes.append(f"neither services.{service}.health_url nor http_checks.{service}-health is set: "
                            "no health check")
    if pools_f is not None:
        with unreachable_as_finding(report):
            report_pools(report, environment, pools_f.result())
    if environment.prometheus_url:
        with unreachable_as_finding(report):
            prometheus_up(report, environment)
    if hosts_f is not None:
        with unreachable_as_finding(report):
            for finding in host_findings(hosts_f.result(), environment.thresholds):
                report.add(finding)
    roll_back: frozenset[str] = frozenset()
    if mine is not None:
        with unreachable_as_finding(report):
            roll_back = last_known_good(report, environment, service, mine, health_row, changes,
                                        lkg_min_uptime_s)
    if roll_back:
        run.offer(RollbackService(environment, service, deploy_hours))
    if environment.docker is not None:
        run.offer(StartServiceContainers(environment, service, leave=roll_back))
    if environment.incident_webhook is not None and notify:
        run.on_finish(lambda r: post_incident(r, environment, service))
    elif environment.incident_webhook is not None:
        report.notes.append("incident webhook: not notified (notify=False)")


def post_incident(report: Report, environment: Environment, service: str) -> None:
    """After the remediation step: tell the incident channel when the outage was found, saying what changed."""
    if report.worst is not Severity.CRITICAL:
        report.notes.append("incident webhook: not notified (no outage found)")
        return
    error = notify_incident(environment, incident_summary(report, service))
    report.notes.append(f"incident webhook: {'notified' if not error else 'NOT notified: ' + error}")


def last_known_good(report: Report, environment: Environment, service: str, mine: list[ContainerInfo],
                    health: HttpCheckRow | None, changes: list[RecentChange], min_uptime_s: float) -> frozenset[str]:
    """Record the last known good when the service is healthy; when it is not and replicas run a recently deployed
    image other than the last known good, say so and return their ids (rollback-service is offered for them)."""
    health_ok = None if health is None else health.ok
    reason = healthy_reason(mine, health_ok, min_uptime_s)
    if not reason:
        _, note = record_last_known_good(environment, service, mine, health_ok, min_uptime_s)
        report.notes.append(note)
        return frozenset()
    report.notes.append(f"last known good of {service} not recorded: {reason}")
    if health_ok is not False and not unhealthy_replicas(mine):
        return frozenset()  # healthy but young, or mid-rollout: nothing to roll back either
    recent = {c.name for c in changes}
    lkg = get_last_known_good(environment.name, service)
    deployed = [c for c in mine if c.name in recent and (lkg is None or c.image_id != lkg.image_id)]
    if not deployed:
        return frozenset()
    images = ", ".join(sorted({f"{c.image} ({short_id(c.image_id)})" for c in deployed}))
    if lkg is None:
        report.add(Finding(
            title=f"{service}: no last known good recorded: the recent deployment ({images}) cannot be rolled back",
            severity=Severity.WARNING, subject=f"service {service}",
            details={"replicas": ", ".join(c.name for c in deployed),
                     "why": "no run has seen this service healthy yet; nothing is planned"},
            aggregation_key=f"last-known-good:{service}"))
        return frozenset()
    if not image_exists(environment, lkg.image_id):
        report.add(Finding(
            title=(f"{service}: the last known good image {lkg.image} ({short_id(lkg.image_id)}) is no longer on "
                   f"the host: the recent deployment ({images}) cannot be rolled back"),
            severity=Severity.WARNING, subject=f"service {service}",
            details={"recorded at": lkg.recorded_at.strftime("%Y-%m-%d %H:%M:%S UTC")},
            aggregation_key=f"last-known-good:{service}"))
        return frozenset()
    report.add(Finding(
        title=(f"{service}: {len(deployed)} replica(s) deployed recently from {images} and the service is down or "
               f"unhealthy; last known good: {lkg.image} ({short_id(lkg.image_id)})"),
        severity=Severity.WARNING, subject=f"service {service}",
        details={"replicas": ", ".join(c.name for c in deployed), "last known good image": lkg.image,
                 "last known good id": short_id(lkg.image_id),
                 "recorded at": lkg.recorded_at.strftime("%Y-%m-%d %H:%M:%S UTC")},
        aggregation_key=f"last-known-good:{service}"))
    return frozenset(c.id for c in deployed)


def report_pools(report: Report, environment: Environment, pools: list[PoolStatus]) -> None:
    """The pools beside every playbook database's server-side counts (an unreachable database is a row, not a
    second outage finding: this procedure is about the service)."""
    totals, errors = [], []
    futures = {db: get_connection_totals.submit(environment, db) for db in environment.databases}
    for db, future in futures.items():
        try:
            totals.append(future.result())
        except TargetUnreachable as exc:
            errors.append(f"{db}: {exc.reason}")
    finding = pool_finding(pools, totals, errors)
    if finding is not None:
        report.add(finding)


@step
def get_last_known_good(env: str, service: str) -> LastKnownGood | None:
    """The service's last known good record (a Prefect Secret block), None when none was recorded."""
    return load_last_known_good(env, service)


@step
def check_service_health(service: str, url: str, timeout_s: float = 5.0) -> HttpCheckRow:
    """GET the service's health URL (tasks.http_checks: timings, no proxies, its own timeout)."""
    cfg = HttpCheckConfig.model_validate({"url": url, "expect_status": 200, "timeout_s": timeout_s})
    return check_http(f"{service}-health", cfg)


@step
def notify_incident(environment: Environment, payload: dict[str, Any]) -> str:
    """POST the summary to the incident webhook; '' when delivered, else a secret-free reason."""
    assert environment.incident_webhook is not None
    url = environment.resolve_secret(environment.incident_webhook.url, "incident_webhook.url")
    return post_json(url, payload, environment.incident_webhook.timeout_s)


# ------------------------------------------------------------------ assessments


def assess_health(report: Report, service: str, check: HttpCheckRow) -> None:
    ok = check.ok
    report.add(Finding(
        title=(f"{service} health endpoint answers HTTP {check.status}" if ok else
               f"{service} health endpoint fails: {check.error or check.result}"),
        severity=Severity.INFO if ok else Severity.CRITICAL, subject=f"service {service}",
        details={"url": check.url, "status": check.status, "total_ms": check.total_ms},
        aggregation_key=f"health:{service}",
    ))


def assess_containers(report: Report, service: str, containers: list[ContainerInfo]) -> None:
    """State per container (a table a person can scan) and a critical finding when the service has none running."""
    mine = [c for c in containers if c.service == service]
    running = [c for c in mine if c.running]
    down = [c for c in mine if not c.running]
    restarted = [c for c in containers if c.restart_count or c.oom_killed]
    if not mine:
        severity, title = Severity.CRITICAL, f"no container of {service} exists"
    elif not running:
        severity, title = Severity.CRITICAL, f"{service}: none of its {len(mine)} container(s) is running"
    elif down:
        severity, title = Severity.WARNING, f"{service}: {len(down)} of {len(mine)} container(s) not running"
    else:
        severity, title = Severity.INFO, f"{service}: all {len(mine)} container(s) running"
    report.add(Finding(
        title=title, severity=severity, subject=f"service {service}",
        details={"restarted or OOM-killed": ", ".join(c.name for c in restarted) or "none"},
        blocks=[TableBlock(title="containers of the project",
                           columns=["container", "service", "state", "exit", "restarts", "started", "image"],
                           rows=[[c.name, c.service, c.state + (" (OOM)" if c.oom_killed else ""),
                                  c.exit_code, c.restart_count,
                                  c.started_at.strftime("%Y-%m-%d %H:%M:%S") if c.started_at else "-",
                                  c.image] for c in containers])],
        aggregation_key=f"containers:{service}",
    ))


def assess_error_logs(report: Report, service: str, logs: dict[str, ContainerLogs]) -> None:
    total = sum(v.error_count for v in logs.values())
    rows = [[name, v.lines, v.error_count, v.errors[-1] if v.errors else ""] for name, v in logs.items()]
    report.add(Finding(
        title=f"{service}: {total} ERROR line(s) in recent logs", subject=f"service {service}",
        severity=Severity.WARNING if total else Severity.INFO,
        blocks=[TableBlock(title="recent logs (last hour, last 200 lines)",
                           columns=["container", "lines", "ERROR", "last ERROR"], rows=rows)],
        aggregation_key=f"error-logs:{service}",
    ))


def assess_recent_changes(report: Report, changes: list[RecentChange], hours: float) -> None:
    if not changes:
        report.notes.append(f"no container created or image built in the last {hours:g} h")
        return
    report.add(Finding(
        title=f"{len(changes)} change(s) in the last {hours:g} h (recent deployments)", severity=Severity.INFO,
        subject="deployments",
        blocks=[TableBlock(title="recent deployments", columns=["when", "what", "container", "image"],
                           rows=[[c.when.strftime("%Y-%m-%d %H:%M:%S"), c.what, c.name, c.image]
                                 for c in changes[:20]])],
        aggregation_key="recent-deployments",
    ))


def prometheus_up(report: Report, environment: Environment) -> None:
    """Prometheus `up` for every target (tasks.metrics): a target at 0 is critical."""

    try:
        rows = instant_query(environment, "up")
    except PromQLError as exc:
        report.notes.append(str(exc))
        return
    down = [r for r in rows if r.value == 0]
    report.add(Finding(
        title=f"Prometheus up: {len(rows) - len(down)} of {len(rows)} targets up",
        severity=Severity.CRITICAL if down else Severity.INFO, subject="prometheus",
        blocks=[TableBlock(title="up", columns=["job", "instance", "up"],
                           rows=[[r.labels.get("job", ""), r.labels.get("instance", ""), int(r.value)]
                                 for r in rows])],
        aggregation_key="prometheus-up",
    ))


def incident_summary(report: Report, service: str) -> dict[str, Any]:
    """The incident-channel message: Slack-compatible ``text`` plus structured fields for other receivers."""
    critical = [f for f in report.findings if f.severity is Severity.CRITICAL]
    acted = [f"{c.action} {c.subject}" for a in report.actions for c in a.planned]
    if report.dry_run:
        action = f"DRY RUN, nothing changed; would: {', '.join(acted) or 'nothing'}"
    else:
        done = [f"{c.action} {c.subject}" for a in report.actions for c in a.applied]
        failed = [a.error for a in report.actions if a.error]
        action = (f"applied: {', '.join(done) or 'nothing'}"
                  + (f"; verified: {all(a.verified for a in report.actions if a.changed)}" if done else "")
                  + (f"; FAILED: {'; '.join(failed)}" if failed else ""))
    lines = [f"[runbook] service outage: {service} on {report.env}", action, incident_detail(report)]
    if report.flow_run_id:
        lines.append(f"flow run {report.flow_run_id}")
    return redact_payload({
        "text": slack_escape("\n".join(lines)), "source": "runbook", "procedure": report.procedure, "env": report.env,
        "service": service, "dry_run": report.dry_run, "severity": report.worst.value,
        "critical": [f.title for f in critical], "actions": acted, "flow_run_id": report.flow_run_id,
    })


def redact_payload(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: redact(v) if isinstance(v, str) else [redact(x) for x in v] if isinstance(v, list) else v
            for k, v in payload.items()}
