"""The one way a procedure runs: the engine, not each flow, owns dry run, policy, approval, audit and announcements.

A flow module declares a procedure with ``@procedure``: its body gathers evidence, adds findings and *offers*
remediations (``run.offer(rem)``). When the body returns, the runner takes over, the same way for every procedure:

    plan -> policy -> (approval) -> apply -> verify -> announce -> publish

- plan: every offered remediation's check + plan (changes nothing);
- policy: ``diagnose`` plans nothing; a dry run (the default, or a route's ``dry_run``, or a tripped breaker) stops
  at the plan; ``auto`` and an operator's ``--apply`` apply; ``approve`` (a route) or ``approval: required`` (the
  procedure's default, or the environment's ``approvals:``) asks a person first, showing the findings and the plan;
- apply: exactly the plan that was shown, each change re-checked against the identity it was planned for
  (runbook.engine.runner); partial results survive a failure;
- announce: Grafana annotations for every change, the alert route's notifications (waiting, finished);
  delivery failures land in the report, never fail the run;
- publish: the report stored with the run, every decision as a run-log line, and a final state named for the
  outcome (``Remediated``, ``Needs attention``, ``Not applied``, ``Completed``); the report's two UI artifacts are
  written the moment that state is accepted (a flow hook), before the run's process lets go of it.

Flows cannot apply anything themselves: ``Remediation.apply`` refuses any caller but runbook.engine.runner, which flows
and tasks may not import (import contract).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import logging
import re
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args, get_origin
from uuid import UUID

import httpx
from prefect import Flow, flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, State
from prefect.context import FlowRunContext
from prefect.events.worker import EventsWorker
from prefect.exceptions import ObjectAlreadyExists, PrefectHTTPStatusError
from prefect.futures import PrefectFuture
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_UI_URL, temporary_settings
from prefect.states import Completed
from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from runbook.engine import approval, decisions
from runbook.engine.clients import release_sessions, run_sessions
from runbook.engine.config import Environment, Route, load_playbooks
from runbook.engine.errors import BadInput, ConfigError, TargetUnreachable
from runbook.engine.findings import (
    ActionResult,
    Change,
    Finding,
    Report,
    Severity,
    kv_text,
    report_to_json,
    report_to_markdown,
)
from runbook.engine.notify import (
    MAX_CHANGES,
    annotate_grafana,
    findings_lines,
    incident_detail,
    notify_route,
    one_line,
)
from runbook.engine.progress import run_logger
from runbook.engine.redact import install_log_redaction, masked_exceptions, redact
from runbook.engine.remediation import Remediation, StateT
from runbook.engine.run_inputs import REPORT_INPUT_KEY
from runbook.engine.runner import _UNSET, apply_plan, plan_remediation
from runbook.engine.status_updates import StatusPageDriver
from runbook.engine.statuspage import subject_of
from runbook.engine.steps import recording_steps, step

log = logging.getLogger(__name__)

Approval = Literal["required", "optional"]
OUTCOME_OK, OUTCOME_REMEDIATED, OUTCOME_ATTENTION, OUTCOME_NOT_APPLIED = (
    "Completed", "Remediated", "Needs attention", "Not applied")
MODE_PREFIX = "mode:"
TIMEOUT_PREFIX = "approval-timeout-s:"
ROUTE_PREFIX = "route:"
ALERT_PREFIX = "alert:"  # the alert's name, on runs the intake creates
RESERVED_PARAMS = frozenset({"env", "dry_run"})


# ------------------------------------------------------------------ the catalog: @procedure registers a flow


@dataclass(frozen=True)
class ProcedureSpec:
    """One procedure: its name (CLI, routes, deployment), summary, remediations offered and approval default."""

    name: str
    summary: str
    flow: Flow[..., Any]
    remediations: tuple[type[Remediation[Any]], ...] = ()
    approval: Approval = "optional"
    tags: tuple[str, ...] = ()

    @property
    def deployment_name(self) -> str:
        """What the Prefect UI lists: the runbook section the procedure automates (its summary's title), as a slug,
        e.g. ``database-performance-issues``. Clients find a deployment by its flow (the procedure's name)."""
        title = self.summary.split(":", 1)[0]
        return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or self.name

    @property
    def flow_path(self) -> str:
        fn = self.flow.fn
        return f"{fn.__module__}:{fn.__name__}"

    def load_flow(self) -> Flow[..., Any]:
        return self.flow

    def parameters(self) -> list[inspect.Parameter]:
        """The form's parameters (the body's signature without env and dry_run, which the caller decides)."""
        return list(self._signature().values())

    def parameter_names(self) -> set[str]:
        return set(self._signature())

    def validate_params(self, params: dict[str, Any], label: str = "") -> dict[str, Any]:
        """Validate parameters against the flow's own signature; BadInput names the parameter and what was wrong.

        ``env`` and ``dry_run`` are never taken from here: the caller (CLI flags, alert policy) decides them.
        """
        sig = self._signature()
        out: dict[str, Any] = {}
        for key, value in params.items():
            if key in RESERVED_PARAMS:
                raise BadInput(f"{label}{key}: set by the caller, not a parameter")
            if key not in sig:
                raise BadInput(f"{label}{key}: {self.name} has no such parameter (known: {', '.join(sig) or 'none'})")
            try:
                out[key] = _adapter(self, key).validate_python(value)
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                raise BadInput(f"{label}{key}={value!r}: {first['msg']}") from None
        return out

    def form_schema(self, environments: Sequence[str] = ()) -> dict[str, Any]:
        """The deployment's parameter schema as the Prefect UI shows it: Prefect's schema of the flow, plus each
        parameter's description (Prefect reads them from docstrings only, not from ``Field(description=...)``),
        ``env`` as a choice of the playbooks' environments, and no parameter the flow does not take (a run that
        claims, e.g., an approval is refused by the server)."""
        schema: dict[str, Any] = self.flow.parameters.model_dump(mode="json")
        props: dict[str, Any] = schema.get("properties", {})
        fn = inspect.unwrap(self.flow.fn)
        for param in inspect.signature(fn, eval_str=True).parameters.values():
            text = _description(param.annotation)
            if text and param.name in props:
                props[param.name]["description"] = text
        if "dry_run" in props:
            props["dry_run"]["description"] = "plan only, change nothing (untick to apply: approval rules still hold)"
        if environments and "env" in props:
            props["env"]["enum"] = sorted(environments)
            props["env"]["description"] = "environment from the playbooks"
        return {**schema, "additionalProperties": False}

    def _signature(self) -> dict[str, inspect.Parameter]:
        return _signature(self)

    def approval_for(self, env: Environment) -> Approval:
        """The environment's ``approvals:`` entry for this procedure, else the procedure's own default."""
        return env.approvals.get(self.name, self.approval)


_REGISTRY: dict[str, ProcedureSpec] = {}


def declared_procedures() -> Mapping[str, ProcedureSpec]:
    """Every procedure declared so far (the application's catalog imports the flow modules that declare them)."""
    return types.MappingProxyType(_REGISTRY)


@functools.cache
def _signature(spec: ProcedureSpec) -> dict[str, inspect.Parameter]:
    fn = inspect.unwrap(spec.flow.fn)
    return {p.name: p for p in inspect.signature(fn, eval_str=True).parameters.values()
            if p.name not in RESERVED_PARAMS}


def _description(annotation: Any) -> str | None:
    """The ``Field(description=...)`` of an annotation, looking inside Annotated and unions (``X | None``)."""
    if get_origin(annotation) is Annotated:
        base, *meta = get_args(annotation)
        for m in meta:
            if isinstance(m, FieldInfo) and m.description:
                return m.description
        return _description(base)
    for arg in get_args(annotation):
        found = _description(arg)
        if found:
            return found
    return None


@functools.cache
def _adapter(spec: ProcedureSpec, param: str) -> TypeAdapter[Any]:
    return TypeAdapter(_signature(spec)[param].annotation)


def procedure(
    name: str, *, summary: str, remediations: tuple[type[Remediation[Any]], ...] = (),
    approval: Approval = "optional", tags: tuple[str, ...] = (),
) -> Callable[[Callable[..., None]], Flow[..., Any]]:
    """Declare a procedure. The body's signature is the deployment's form (it must take ``env`` and ``dry_run``);
    the body diagnoses and offers remediations; the runner does the rest."""

    def deco(body: Callable[..., None]) -> Flow[..., Any]:
        params = inspect.signature(body).parameters
        if "env" not in params or "dry_run" not in params:
            raise TypeError(f"procedure {name}: the body must take env and dry_run")
        if name in _REGISTRY:
            raise ValueError(f"procedure {name!r} declared twice")
        spec_box: list[ProcedureSpec] = []

        def _bind(fn: Callable[..., None], box: list[ProcedureSpec], execute: Callable[..., Any]) -> Callable[..., Any]:
            def procedure_flow(*args: Any, **kwargs: Any) -> Any:  # only closure names: its globals are replaced
                return execute(box[0], fn, args, kwargs)
            return procedure_flow

        raw = _bind(body, spec_box, _execute)
        # rebuilt with the flow module's globals: Prefect and pydantic resolve the (string) annotations there
        wrapper = types.FunctionType(raw.__code__, body.__globals__, body.__name__, None, raw.__closure__)
        functools.update_wrapper(wrapper, body)
        prefect_flow = flow(name=name, log_prints=False, description=summary,
                            on_completion=[publish_after_final_state], on_failure=[publish_after_final_state],
                            on_crashed=[publish_after_final_state],
                            on_cancellation=[publish_after_final_state])(wrapper)
        spec = ProcedureSpec(name, summary, prefect_flow, tuple(remediations), approval, tags)
        spec_box.append(spec)
        _REGISTRY[name] = spec
        return prefect_flow

    return deco


def publish_artifacts(report: Report) -> list[Callable[[], object]]:
    """What publishes the report to the Prefect UI: one markdown artifact plus a table of the findings (each a
    call, so the caller can send them side by side)."""

    key = report.procedure.replace("_", "-")
    table = [{"severity": f.severity.value, "title": redact(f.title), "subject": redact(f.subject)}
             for f in report.findings] or [{"severity": "", "title": "no findings", "subject": ""}]
    return [
        functools.partial(create_markdown_artifact, markdown=report_to_markdown(report), key=f"{key}-report",
                          description=f"{report.procedure} report"),
        functools.partial(create_table_artifact, table=table, key=f"{key}-findings",
                          description=f"{report.procedure} findings"),
    ]


# The report's UI artifacts of runs whose flow function has returned, by flow run id, until the final state is set.
_AFTER_FINAL_STATE: dict[UUID, list[Callable[[], object]]] = {}


def publish_after_final_state(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:  # noqa: ARG001
    """Flow hook (any final state): write the report's artifacts once the run's final state is accepted (a run
    whose report was ready may still be cancelled or fail at the last moment: its report is published anyway).

    A person waiting on `runbook run` needs the final state and the stored report, not the UI's two artifacts;
    written before the final state, they made it wait for three requests to a server that is busiest right then
    (60-80 ms of the run's own time measured, bench_operator's Prefect floor). Hooks run in the run's own thread
    and context before its process lets go of the run (the executor's thread, an in-process run's call), so the
    artifacts are still written by the process that ran it, a few milliseconds after the state, as Prefect's own
    batched log lines are."""
    calls = _AFTER_FINAL_STATE.pop(flow_run.id, None)
    if calls:
        _send_together(calls)


def _send_together(calls: list[Callable[[], object]]) -> None:
    """Make the run's publishing calls (its artifacts) at once instead of one after the other: each is a round
    trip to the Prefect server (30-150 ms here). Each runs in a copy of this context, so it finds the run and its
    API client; the first error is raised."""
    with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="publish") as pool:
        futures = [pool.submit(contextvars.copy_context().run, _published, call) for call in calls]
    for future in futures:
        future.result()


PUBLISH_ATTEMPTS = 4


def _published(call: Callable[[], object]) -> None:
    """One closing call, retried on a server error or a lost connection (a busy or restarting API replica answers
    500 on a database timeout; Prefect's client retries only 429/502/503). When the server still fails, the run
    keeps its outcome and says in its log that the UI lacks this record: a remediation that was applied must not
    be reported as a failed run because its artifact could not be stored."""
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        try:
            call()
            return
        except (PrefectHTTPStatusError, httpx.TransportError) as exc:
            status = exc.response.status_code if isinstance(exc, PrefectHTTPStatusError) else None
            if status is not None and status < 500:
                raise
            if attempt == PUBLISH_ATTEMPTS:
                run_logger().warning("could not publish to the Prefect UI after %d attempts (the run state keeps "
                                     "its outcome and summary): %s", attempt, redact(str(exc))[:200])
                return
            time.sleep(0.5 * attempt)


# ------------------------------------------------------------------ the run a body works with


@dataclass
class _Offer:
    rem: Remediation[Any]
    after: Callable[[Report, ActionResult], None] | None
    state: Any
    plan: PrefectFuture[ActionResult] | None = None  # started when offered, unless the policy plans nothing


@dataclass
class Run:
    """What a procedure body sees: its environment, its report, and ``offer`` for remediations."""

    spec: ProcedureSpec
    env: Environment
    report: Report
    dry_run: bool
    mode: str
    route: str | None
    route_config: Route | None
    approval_timeout_s: float
    offers: list[_Offer] = field(default_factory=list)
    finishers: list[Callable[[Report], None]] = field(default_factory=list)
    status_page: StatusPageDriver | None = None

    def offer(self, rem: Remediation[StateT], *, after: Callable[[Report, ActionResult], None] | None = None,
              state: StateT = _UNSET) -> None:
        """Hand a remediation to the runner; ``after`` sees its result; ``state`` reuses a check already made."""
        if not isinstance(rem, self.spec.remediations or ()):
            raise TypeError(f"{self.spec.name} offers {rem.name!r}, which its @procedure does not declare")
        # planned from now, beside the rest of the diagnosis: a plan only reads (applying waits for the runner,
        # the policy and any approval, and re-checks each change), so a plan need not wait for the body's last
        # step (db-slowness's two plans ran after the application's pool check; now during it)
        self.offers.append(_Offer(rem, after, state, plan_step.submit(rem, state) if self.plans else None))

    @property
    def plans(self) -> bool:
        """Whether the policy plans what the body offers (a diagnose-only policy plans nothing)."""
        return self.mode != "diagnose"

    def on_finish(self, fn: Callable[[Report], None]) -> None:
        """Run ``fn(report)`` after remediation, before publishing (e.g. the incident channel message)."""
        self.finishers.append(fn)

    def decide(self, line: str) -> None:
        """One audit line: in the report's Decisions and in the run's log (the UI's log tab tells the story)."""
        self.report.audit.append(line)
        run_logger().info("%s", redact(line))


_CURRENT: ContextVar[Run | None] = ContextVar("runbook_current_run", default=None)


def current_run() -> Run:
    """The run of the procedure body executing now."""
    run = _CURRENT.get()
    if run is None:
        raise RuntimeError("current_run() is only available inside a @procedure body")
    return run


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


# ------------------------------------------------------------------ the pipeline


def _execute(spec: ProcedureSpec, body: Callable[..., None], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> State[Any]:
    """The flow run: the pipeline, with any exception leaving it masked (Prefect makes the flow run's state
    message and its "Encountered exception" log line from it)."""
    install_log_redaction()
    with masked_exceptions():
        return _pipeline(spec, body, args, kwargs)


def _pipeline(spec: ProcedureSpec, body: Callable[..., None], args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> State[Any]:
    bound = inspect.signature(body).bind(*args, **kwargs)
    bound.apply_defaults()
    env_name, dry_run = bound.arguments["env"], bool(bound.arguments["dry_run"])
    playbooks = load_playbooks()
    environment = playbooks.environment(env_name)
    report = Report(procedure=spec.name, env=env_name, dry_run=dry_run)
    tags = _run_tags()
    ctx = FlowRunContext.get()
    if ctx and ctx.flow_run:
        report.flow_run_id = str(ctx.flow_run.id)
    route = _tag(tags, ROUTE_PREFIX)
    run = Run(spec, environment, report, dry_run, _tag(tags, MODE_PREFIX) or "manual", route,
              next((r for r in playbooks.routes if r.name == route), None) if route else None, _timeout(tags))
    run.status_page = StatusPageDriver.for_run(
        environment, report, run.route_config, tags, ctx.flow_run.id if ctx and ctx.flow_run else None,
        subject_of(bound.arguments, env_name), run.decide)
    with run_sessions(), recording_steps() as steps:  # one PostgreSQL session passed from step to step
        token = _CURRENT.set(run)
        try:
            body(*bound.args, **bound.kwargs)
        finally:
            _CURRENT.reset(token)
        run.status_page.diagnosed()
        _remediate(run)
        report.steps = list({st.task_run_id or str(i): st for i, st in enumerate(steps)}.values())  # last attempt
    for fn in run.finishers:
        fn(report)
    report.finish()
    report.outcome = outcome(report)
    run.decide(f"outcome: {report.outcome}")
    if ctx:
        _announce_finished(run)  # first: its delivery errors belong in the published report
    doc = report_to_json(report)
    if ctx and ctx.flow_run:
        _AFTER_FINAL_STATE[ctx.flow_run.id] = publish_artifacts(report)  # see publish_after_final_state
        _store_report(ctx.flow_run.id, doc)  # before the final state: `runbook run` reads it once the run ends
    return Completed(name=report.outcome, message=_summary(report), data=doc)


def _store_report(run_id: UUID, doc: dict[str, Any]) -> None:
    """Keep the report with the run (run input ``runbook-report``): `runbook run` on the warm path reads it back,
    since a flow's return value is not kept on the server. Retried like the artifacts; best effort: the run's
    outcome does not depend on it."""
    try:
        _published(functools.partial(_write_report_input, run_id, json.dumps(doc)))
    except Exception as exc:  # noqa: BLE001 - a storage hiccup must not turn a finished run into a failed one
        run_logger().warning("could not store the report with the run: %s", redact(str(exc))[:200])


def _write_report_input(run_id: UUID, text: str) -> None:
    client = get_client(sync_client=True)
    try:
        client.create_flow_run_input(run_id, REPORT_INPUT_KEY, text)
    except ObjectAlreadyExists:  # a retried run (its executor died) replaces its first attempt's report
        client.delete_flow_run_input(run_id, REPORT_INPUT_KEY)
        client.create_flow_run_input(run_id, REPORT_INPUT_KEY, text)


def _remediate(run: Run) -> None:
    report, spec = run.report, run.spec
    if not run.offers:
        if spec.remediations:
            run.decide("no remediation offered: the diagnosis found nothing this procedure can fix")
        return
    applying = not run.dry_run and run.mode not in ("diagnose", "dry_run")
    needs_approval = applying and (run.mode == "approve" or spec.approval_for(run.env) == "required")
    run.decide(f"policy: mode {run.mode}" + (f" (route {run.route})" if run.route else "")
               + ("; dry run: plan only" if not applying else "; apply")
               + ("; approval required" if needs_approval else ""))
    if not run.plans:
        for o in run.offers:
            report.actions.append(ActionResult(name=o.rem.name, target=o.rem.target, dry_run=True,
                                               skipped_reason="diagnose-only policy: remediations not planned"))
        run.decide("diagnose-only policy: no remediation planned")
        return
    # planned side by side, each from when it was offered (Run.offer): each reads live state and changes nothing
    # (applying stays one change at a time), and one plan never waits on another's task bookkeeping and query
    plans = [(o.plan if o.plan is not None else plan_step.submit(o.rem, o.state)).result() for o in run.offers]
    planned = [p for p in plans if p.planned and not p.error]
    for p in plans:
        run.decide(f"planned {p.name} on {p.target}: " + (p.error or f"{len(p.planned)} change(s)"))
    if run.status_page is not None:
        run.status_page.planned(sum(len(p.planned) for p in planned))
    if not applying or not planned:
        _finish_actions(run, plans)
        return
    if needs_approval:
        release_sessions()  # no session held open while a person decides
        decision = _ask(run, planned)
        if not decision.approved:
            for p in planned:
                p.skipped_reason = f"not applied: {decision.reason or 'not approved'}"
            _finish_actions(run, plans)
            return
        report.notes.append(f"approved by {decision.approver} ({decision.how})"
                            + (f": {decision.reason}" if decision.reason else ""))
        if decision.approved_changes is not None:  # resumed after approval: only what the approver saw
            for offer, p in zip(run.offers, plans, strict=True):
                if p in planned:
                    _keep_approved(run, offer, p, set(decision.approved_changes))
    release_sessions()  # applying starts from nothing of ours connected (a restore renames the database)
    taken_over = _taken_over()
    if taken_over:
        for p in planned:
            p.skipped_reason = f"not applied: {taken_over}"
        run.decide(f"not applied: {taken_over}")
        _finish_actions(run, plans)
        return
    results = []
    for offer, p in zip(run.offers, plans, strict=True):
        if p.planned and not p.error:
            r = apply_step(offer.rem, p)
            run.decide(f"applied {r.name}: {len(r.applied)} of {len(r.planned)} change(s) made"
                       + (f", verified: {r.verified}" if r.applied else "") + (f"; ERROR {r.error}" if r.error else ""))
            for s in r.skipped:
                run.decide(f"skipped {r.name}: {s}")
            results.append(r)
        else:
            results.append(p)
    changed = [r for r in results if r.changed]
    if run.status_page is not None:
        run.status_page.applied(bool(changed), all(r.verified for r in changed))
    _finish_actions(run, results)


def _taken_over() -> str | None:
    """Why this run must not apply, if its flow run is no longer Running on the server: a reconciler that took this
    executor for dead (silent past its heartbeat deadline: a long stall, a partition) marked it Crashed and may
    have rescheduled it elsewhere, or somebody cancelled it. One read, only before applying: the fence that keeps a
    remediation from running twice at once. Unreadable state is no reason to stop (the server's own orchestration
    still refuses a finished run)."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None
    try:
        state = get_client(sync_client=True).read_flow_run(ctx.flow_run.id).state
    except Exception as exc:  # noqa: BLE001 - see the docstring
        run_logger().warning("could not re-read this run's state before applying: %s", redact(str(exc))[:200])
        return None
    if state is None or state.is_running():
        return None
    return f"this run is {state.name} on the server ({redact(state.message or '')[:200]}): another executor may hold it"


def _approval_identity(plan: ActionResult, change: Change) -> str:
    """What a change acts on, independent of display text: its machine key (pid + start time, container id ...),
    else its action and typed target (the backup file to restore ...), else its action."""
    what = change.key or (f"{change.action}:{json.dumps(change.target, sort_keys=True)}" if change.target
                          else change.action)
    return f"{plan.name}|{plan.target}|{what}"


def _keep_approved(run: Run, offer: _Offer, plan: ActionResult, approved: set[str]) -> None:
    """A run resumed after approval re-planned: keep only the changes the approver saw (all or none of a
    ``whole_plan`` remediation's)."""
    extra = [c for c in plan.planned if _approval_identity(plan, c) not in approved]
    if not extra:
        return
    if type(offer.rem).whole_plan:
        plan.skipped += [f"{c.subject}: the plan changed while the run waited for approval" for c in plan.planned]
        plan.planned = []
        run.decide(f"{plan.name}: its plan changed while the run waited for approval: nothing of it applied")
        return
    plan.planned = [c for c in plan.planned if _approval_identity(plan, c) in approved]
    plan.skipped += [f"{c.subject}: not in the plan that was approved (found while the run waited)" for c in extra]
    run.decide(f"{plan.name}: {len(extra)} change(s) not in the approved plan left alone")


def _finish_actions(run: Run, results: list[ActionResult]) -> None:
    for offer, result in zip(run.offers, results, strict=True):
        run.report.actions.append(result)
        if offer.after is not None:
            offer.after(run.report, result)


@step(task_run_name="plan-{rem.name}")
def plan_step(rem: Remediation[Any], state: Any = _UNSET) -> ActionResult:
    """check + plan (a task, so the UI shows each remediation's plan as its own step)."""
    return plan_remediation(rem, state)


@step(task_run_name="apply-{rem.name}")
def apply_step(rem: Remediation[Any], planned: ActionResult) -> ActionResult:
    """Apply exactly the shown plan, re-checked change by change, then verify."""
    return apply_plan(rem, planned)


def _ask(run: Run, planned: list[ActionResult]) -> decisions.Decision:
    report = run.report
    view = decisions.PlanView(
        procedure=report.procedure, env=report.env, route=run.route or "",
        targets=[p.target for p in planned],
        findings=[f"{f.severity.value}: {redact(f.title)}" for f in report.findings if f.severity.rank > 0][:10],
        changes=[f"{p.name}: {c.action} {redact(c.subject)}" + (f" ({redact(kv_text(c.before))})" if c.before else "")
                 for p in planned for c in p.planned],
        identities=[_approval_identity(p, c) for p in planned for c in p.planned],
    )
    run.decide(f"approval asked: {len(view.changes)} change(s); waiting up to {run.approval_timeout_s:g} s")

    def waiting(v: decisions.PlanView) -> None:
        _notify(run, "waiting", f"{report.procedure} on {report.env} is WAITING FOR APPROVAL "
                f"(up to {run.approval_timeout_s:g} s): " + "; ".join(v.changes[:10]),
                {"changes": len(v.changes)},
                "\n".join(["Findings (worst first):", *findings_lines(report), "Plan (waiting for approval):",
                           *[f"- {one_line(c)}" for c in v.changes[:MAX_CHANGES]]]))

    decision = approval.ask(view, run.approval_timeout_s, waiting)
    if decision.approved:
        run.decide(f"approval granted by {decision.approver} ({decision.how})")
    else:
        who = f" by {decision.approver}" if decision.approver else ""
        run.decide(f"approval not given{who}: {decision.reason or 'rejected'}")
    return decision


def outcome(report: Report) -> str:
    """Remediated: something changed and verified, nothing failed. Needs attention: a failure, or a critical
    finding left as it was. Not applied: changes were wanted but policy or a person held them back."""
    if any(a.error for a in report.actions):
        return OUTCOME_ATTENTION
    changed = [a for a in report.actions if a.changed]
    if changed and all(a.verified for a in changed):
        return OUTCOME_REMEDIATED
    if any(a.skipped_reason.startswith("not applied") for a in report.actions):
        return OUTCOME_NOT_APPLIED
    if report.has_critical:
        return OUTCOME_ATTENTION
    return OUTCOME_OK


def _summary(report: Report) -> str:
    changed = sum(len(a.applied) for a in report.actions)
    return (f"{report.outcome}: worst {report.worst.value}, {len(report.findings)} finding(s), "
            f"{changed} change(s) made" + (" (dry run)" if report.dry_run else ""))


# ------------------------------------------------------------------ announcements (never fail a run)


def _announce_finished(run: Run) -> None:
    report = run.report
    for a in report.actions:
        if a.applied:
            subjects = ", ".join(c.subject for c in a.applied)
            try:
                error = annotate_grafana(run.env, f"{report.procedure}: {a.name} on {a.target}: {subjects}",
                                         [report.procedure, run.env.name, a.name])
            except ConfigError as exc:
                error = str(exc)
            if error:
                report.notes.append(f"Grafana annotation failed: {redact(error)}")
    _notify(run, "finished", f"{report.procedure} on {report.env} finished: {_summary(report)}",
            {"worst": report.worst.value, "outcome": report.outcome})


def _notify(run: Run, event: str, text: str, fields: dict[str, Any], detail: str | None = None) -> None:
    route = run.route_config
    if route is None or not route.notify:
        return
    try:
        alert = _tag(_run_tags(), ALERT_PREFIX)
        detail = incident_detail(run.report) if detail is None else detail
        errors = notify_route(route, run.env, event, text, fields, _run_link(run.report),
                              f"Alert: {one_line(alert)}\n{detail}" if alert else detail)
    except ConfigError as exc:
        errors = [str(exc)]
    for error in errors:
        run.report.notes.append(f"notification ({event}) failed: {redact(error)}")
    run.decide(f"notified route {route.name}: {event}" + (f" ({len(errors)} failed)" if errors else ""))


def _run_link(report: Report) -> str | None:
    ui = PREFECT_UI_URL.value()
    return f"{ui}/runs/flow-run/{report.flow_run_id}" if ui and report.flow_run_id else None


# ------------------------------------------------------------------ run context helpers


def _run_tags() -> list[str]:
    ctx = FlowRunContext.get()
    return list((ctx.flow_run.tags if ctx and ctx.flow_run else None) or [])


def _tag(tags: list[str], prefix: str) -> str | None:
    return next((t.removeprefix(prefix) for t in tags if t.startswith(prefix)), None)


def _timeout(tags: list[str]) -> float:
    raw = _tag(tags, TIMEOUT_PREFIX)
    try:
        return max(1.0, float(raw)) if raw else decisions.DEFAULT_APPROVAL_TIMEOUT_S
    except ValueError:
        return decisions.DEFAULT_APPROVAL_TIMEOUT_S


@contextmanager
def attended_run() -> Iterator[None]:
    """Settings for a flow run in a process an operator is watching (CLI, demo, tests).

    Prefect's flow-run heartbeat thread sleeps in 1 s steps and is joined when the run ends, adding up to a
    second to every run. Heartbeats let automations spot crashed runs of unattended workers; an attended
    run reports its own crash, so it runs without them. Deployments run by workers keep them.
    """

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def flush_run_records(timeout_s: float = 5.0) -> None:
    """Send queued logs and events to the Prefect API now, before a server we started goes away.

    Otherwise Prefect's background workers retry against a dead server when the interpreter exits.
    """

    APILogWorker.drain_all(timeout=timeout_s)
    EventsWorker.drain_all(timeout=timeout_s)
