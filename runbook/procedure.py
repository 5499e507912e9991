"""What every procedure flow shares: loading its environment, collecting the report, remediating, publishing.

Flows stay a readable list of diagnostics and remediations; this module holds the plumbing so that each one
handles an unreachable target, dry runs, artifacts and the JSON return value the same way.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NONE
from prefect.context import FlowRunContext

from runbook.config import Environment, load_playbooks
from runbook.errors import TargetUnreachable
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
        fn = self.load_flow().fn
        return [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name not in {"env"}]


PROCEDURES: dict[str, ProcedureInfo] = {
    p.name: p
    for p in [
        ProcedureInfo("db-slowness", "flows.db_slowness:db_slowness",
                      "Database Performance Issues: connections, long queries, lock tree, slow statements, indexes"),
    ]
}


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


@task(cache_policy=NONE, task_run_name="remediate-{rem.name}")
def remediate(rem: Remediation[Any], dry_run: bool = True) -> ActionResult:
    """Run one remediation through the single runner; as a task so the UI shows it as its own step."""
    return run_remediation(rem, dry_run=dry_run)


def finish_report(report: Report, render: Callable[[Report], None] | None = None) -> dict[str, Any]:
    """Close the report, publish it to the UI when running under Prefect, and return its JSON form."""
    report.finish()
    if render:
        render(report)
    if FlowRunContext.get():
        publish_artifacts(report)
    return report_to_json(report)


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
