"""What every procedure flow shares: loading its environment, collecting the report, remediating, publishing.

Flows stay a readable list of diagnostics and remediations; this module holds the plumbing so that each one
handles an unreachable target, dry runs, artifacts and the JSON return value the same way.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NONE
from prefect.context import FlowRunContext
from prefect.input import RunInput
from pydantic import TypeAdapter, ValidationError

from runbook.config import Environment, load_playbooks
from runbook.errors import BadInput, TargetUnreachable
from runbook.findings import ActionResult, Finding, Report, Severity, publish_artifacts, report_to_json
from runbook.redact import install_log_redaction, redact
from runbook.remediation import Remediation, run_remediation


@dataclass(frozen=True)
class ProcedureInfo:
    """One entry of ``runbook list``: the CLI name and where its flow lives."""

    name: str
    flow_path: str  # "module:function"
    summary: str

    def load_flow(self) -> Any:
        module, _, attr = self.flow_path.partition(":")
        return getattr(importlib.import_module(module), attr)

    def parameters(self) -> list[inspect.Parameter]:
        return list(_signature(self.flow_path).values())

    def parameter_names(self) -> set[str]:
        return set(_signature(self.flow_path))


@functools.cache
def _signature(flow_path: str) -> dict[str, inspect.Parameter]:
    module, _, attr = flow_path.partition(":")
    fn = getattr(importlib.import_module(module), attr).fn
    return {p.name: p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "env"}


@functools.cache
def _adapter(flow_path: str, name: str) -> TypeAdapter[Any]:
    return TypeAdapter(_signature(flow_path)[name].annotation)


PROCEDURES: dict[str, ProcedureInfo] = {
    p.name: p
    for p in [
        ProcedureInfo("db-slowness", "flows.db_slowness:db_slowness",
                      "Database Performance Issues: connections, long queries, lock tree, slow statements, indexes"),
        ProcedureInfo("backup", "flows.backup:backup",
                      "Backup: pg_dump | gzip streamed to the backup location with checksum and manifest"),
        ProcedureInfo("backup-verification", "flows.backup_verification:backup_verification",
                      "Backup and Recovery Monitoring: age vs RPO, size, gzip, checksum, log, test restore (RTO)"),
        ProcedureInfo("data-corruption", "flows.data_corruption:data_corruption",
                      "Data Corruption: assess vs backup, then with approval stop writers, restore, swap, restart"),
        ProcedureInfo("network-checks", "flows.network_checks:network_checks",
                      "Network Issues: TCP matrix from host and containers, HTTPS endpoints with TLS days, DNS"),
        ProcedureInfo("cache-api", "flows.cache_api:cache_api",
                      "Application Optimization: Redis hit ratio/evictions, API timing breakdown, runbook PromQL"),
        ProcedureInfo("log-analysis", "flows.log_analysis:log_analysis",
                      "Log Analysis: the four Kibana queries with counts, top messages and a histogram"),
        ProcedureInfo("high-cpu", "flows.high_cpu:high_cpu",
                      "High CPU Usage: containers and host processes by CPU, long queries, ERROR logs; scale"),
        ProcedureInfo("memory-leak", "flows.memory_leak:memory_leak",
                      "Memory Leaks: memory growth per container, time to limit, heap hook; rolling restart"),
        ProcedureInfo("service-outage", "flows.service_outage:service_outage",
                      "Service Outage: health, container states, up, deployments, hosts, errors; start; notify"),
    ]
}


RESERVED_PARAMS = frozenset({"env", "dry_run"})


def validate_params(procedure: str, params: dict[str, Any], label: str = "") -> dict[str, Any]:
    """Validate parameters against the flow's own signature; BadInput names the parameter and what was wrong.

    ``env`` and ``dry_run`` are never taken from here: the caller (CLI flags, alert policy) decides them.
    """
    if procedure not in PROCEDURES:
        raise BadInput(f"unknown procedure {procedure!r}; known: {', '.join(PROCEDURES)}")
    flow_path = PROCEDURES[procedure].flow_path
    sig = _signature(flow_path)
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key in RESERVED_PARAMS:
            raise BadInput(f"{label}{key}: set by the caller, not a parameter")
        if key not in sig:
            raise BadInput(f"{label}{key}: {procedure} has no such parameter (known: {', '.join(sig) or 'none'})")
        try:
            out[key] = _adapter(flow_path, key).validate_python(value)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            raise BadInput(f"{label}{key}={value!r}: {first['msg']}") from None
    return out


def start_report(procedure: str, env_name: str, dry_run: bool) -> tuple[Report, Environment]:
    """Load the environment a flow runs against and open its report. Config errors propagate (exit 2)."""
    install_log_redaction()
    env = load_playbooks().environment(env_name)
    report = Report(procedure=procedure, env=env_name, dry_run=dry_run)
    ctx = FlowRunContext.get()
    if ctx and ctx.flow_run:
        report.flow_run_id = str(ctx.flow_run.id)
    return report, env


@contextmanager
def unreachable_as_finding(report: Report) -> Iterator[None]:
    """Turn a TargetUnreachable raised inside the block into a critical finding; the flow carries on."""
    try:
        yield
    except TargetUnreachable as exc:
        report.add(Finding(
            title=redact(str(exc)), severity=Severity.CRITICAL, subject=exc.target,
            details={"reason": redact(exc.reason)}, aggregation_key=f"unreachable:{exc.target}",
        ))


MODE_PREFIX = "mode:"
TIMEOUT_PREFIX = "approval-timeout-s:"
DEFAULT_APPROVAL_TIMEOUT_S = 1800.0
_APPROVED: dict[str, str] = {}  # flow run id -> approver, set only by remediate_all after an approval


def run_mode() -> str:
    """The alert policy's mode for this run (from its tags); 'manual' for CLI and UI runs."""
    ctx = FlowRunContext.get()
    tags = (ctx.flow_run.tags if ctx and ctx.flow_run else None) or []
    for tag in tags:
        if tag.startswith(MODE_PREFIX):
            return tag.removeprefix(MODE_PREFIX)
    return "manual"


def _run_id() -> str:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else ""


@task(cache_policy=NONE, task_run_name="remediate-{rem.name}")
def remediate(rem: Remediation[Any], dry_run: bool = True) -> ActionResult:
    """Run one remediation through the single runner; as a task so the UI shows it as its own step.

    The run's policy can only narrow: 'diagnose' plans nothing, 'approve' applies only after remediate_all
    recorded an approval for this very run.
    """
    mode = run_mode()
    if mode == "diagnose":
        return ActionResult(name=rem.name, target=rem.target, dry_run=True,
                            skipped_reason="diagnose-only policy: remediations not planned")
    allowed = None
    if mode == "approve" and _run_id() not in _APPROVED:
        def allowed() -> str | None:
            return "approval required and not given"
    return run_remediation(rem, dry_run=dry_run, allowed=allowed)


class ApprovalInput(RunInput):
    """The form an approver fills in (Prefect UI, or `runbook approve`)."""

    approve: bool = False
    approver: str = ""
    reason: str = ""


def remediate_all(report: Report, rems: list[Remediation[Any]], dry_run: bool) -> None:
    """Run the flow's remediations; under the 'approve' policy, plan them, pause for a person, then apply.

    No approval, a rejection, a timeout or the alert resolving while waiting changes nothing.
    """
    if run_mode() == "approve" and not dry_run:
        previews = [remediate(rem, dry_run=True) for rem in rems]
        if not any(p.planned for p in previews):
            report.actions.extend(previews)
            return
        decision = request_approval(report, previews)
        if not decision.approve:
            for p in previews:
                p.skipped_reason = f"not applied: {decision.reason or 'not approved'}"
            report.actions.extend(previews)
            report.notes.append(f"approval: rejected by {decision.approver or 'nobody'}: {decision.reason}")
            return
        _APPROVED[_run_id()] = decision.approver
        report.notes.append(f"approved by {decision.approver or 'unknown'}: {decision.reason}")
    try:
        report.actions.extend(remediate(rem, dry_run=dry_run) for rem in rems)
    finally:
        _APPROVED.pop(_run_id(), None)


def request_approval(report: Report, previews: list[ActionResult]) -> ApprovalInput:
    """Pause this run with a typed form showing the plan, and wait for a decision.

    Written on Prefect's pause pieces rather than ``pause_flow_run`` because that one only notices a resume:
    a run cancelled while paused (its alert resolved) would sit out the whole timeout.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import Abort
    from prefect.input import keyset_from_paused_state
    from prefect.input.run_input import run_input_subclass_from_type
    from prefect.states import Paused
    from prefect.utilities.engine import propose_state_sync

    ctx = FlowRunContext.get()
    if not ctx or not ctx.flow_run:
        return ApprovalInput(approve=False, reason="approval needs a Prefect flow run")
    timeout = _approval_timeout(ctx.flow_run.tags or [])
    plan = _plan_markdown(report, previews)
    form = run_input_subclass_from_type(ApprovalInput).with_initial_data(description=plan, approve=False)
    # the server's own pause expiry comes a little after ours, so this loop always decides first
    state = Paused(timeout_seconds=int(timeout) + 60, reschedule=False, pause_key="approval")
    keyset = keyset_from_paused_state(state)
    state.state_details.run_input_keyset = keyset
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        try:
            new = propose_state_sync(client=client, state=state, flow_run_id=ctx.flow_run.id)
        except Abort as exc:
            return ApprovalInput(approve=False, reason=f"could not pause for approval: {exc}")
        if not new.is_paused():
            return ApprovalInput(approve=False, reason=f"could not pause for approval: state is {new.type.value}")
        form.save(keyset)
        while time.monotonic() < deadline:
            time.sleep(1.0)
            current = client.read_flow_run(ctx.flow_run.id).state
            if current is None:
                continue
            if current.is_running():
                return ApprovalInput.model_validate(form.load(keyset).model_dump())
            if current.is_final() or current.name == "Cancelling":
                return ApprovalInput(approve=False, reason=f"run {current.name.lower()} while waiting for approval")
        # Nobody decided: take the run out of PAUSED ourselves (forced: the server would otherwise fail a paused run
        # that completes), so it finishes with a report saying nothing was applied.
        from prefect.states import Running

        client.set_flow_run_state(ctx.flow_run.id, Running(message="approval timed out"), force=True)
    return ApprovalInput(approve=False, reason=f"no approval within {timeout:g} s (timeout counts as rejection)")


def _approval_timeout(tags: list[str]) -> float:
    for tag in tags:
        if tag.startswith(TIMEOUT_PREFIX):
            try:
                return max(1.0, float(tag.removeprefix(TIMEOUT_PREFIX)))
            except ValueError:
                break
    return DEFAULT_APPROVAL_TIMEOUT_S


def _plan_markdown(report: Report, previews: list[ActionResult]) -> str:
    serious = [f for f in report.findings if f.severity.rank > 0][:8]
    lines = [f"## Approve remediation: {report.procedure} on `{report.env}`", "", "What was found:"]
    lines += [f"- {f.severity.value}: {redact(f.title)}" for f in serious] or ["- nothing above info"]
    lines += ["", "The plan (nothing has been changed yet):"]
    for p in previews:
        for c in p.planned:
            before = ", ".join(f"{k}={str(v)[:80]}" for k, v in c.before.items())
            lines.append(f"- **{p.name}**: {c.action} `{redact(c.subject)}` ({redact(before)})")
    lines += ["", "Set **approve** and submit to apply; leave it unset (or reject) and nothing changes."]
    return "\n".join(lines)


def finish_report(report: Report, env: Environment | None = None) -> dict[str, Any]:
    """Close the report; under Prefect publish it, annotate applied remediations and notify the alert's route."""
    report.finish()
    if FlowRunContext.get():
        if env is not None:
            _announce(report, env)  # first: its delivery errors belong in the published report
        publish_artifacts(report)
    return report_to_json(report)


def _announce(report: Report, env: Environment) -> None:
    from prefect.settings import PREFECT_UI_URL

    from tasks.notify import annotate_grafana, notify_route

    for a in report.actions:
        if a.changed:
            subjects = ", ".join(c.subject for c in a.planned)
            error = annotate_grafana(env, f"{report.procedure}: {a.name} on {a.target}: {subjects}",
                                     [report.procedure, env.name, a.name])
            if error:
                report.notes.append(f"Grafana annotation failed: {error}")
    ctx = FlowRunContext.get()
    route_name = next((t.removeprefix("route:") for t in (ctx.flow_run.tags or []) if t.startswith("route:")), None) \
        if ctx and ctx.flow_run else None
    if not route_name:
        return
    route = next((r for r in load_playbooks().routes if r.name == route_name), None)
    if route is None or not route.notify:
        return
    ui = PREFECT_UI_URL.value()
    link = f"{ui}/runs/flow-run/{report.flow_run_id}" if ui and report.flow_run_id else None
    changed = sum(a.changed for a in report.actions)
    text = (f"{report.procedure} on {env.name} finished: worst severity {report.worst.value}, "
            f"{len(report.findings)} findings, {changed} remediation(s) changed something"
            + (" (dry run)" if report.dry_run else ""))
    for error in notify_route(route, env, "finished", text, {"worst": report.worst.value}, link):
        report.notes.append(f"notification failed: {error}")


@contextmanager
def attended_run() -> Iterator[None]:
    """Settings for a flow run in a process an operator is watching (CLI, demo, tests).

    Prefect's flow-run heartbeat thread sleeps in 1 s steps and is joined when the run ends, adding up to a
    second to every run. Heartbeats let automations spot crashed runs of unattended workers; an attended
    run reports its own crash, so it runs without them. Deployments run by workers keep them.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def flush_run_records(timeout_s: float = 5.0) -> None:
    """Send queued logs and events to the Prefect API now, before a server we started goes away.

    Otherwise Prefect's background workers retry against a dead server when the interpreter exits.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout_s)
    EventsWorker.drain_all(timeout=timeout_s)
