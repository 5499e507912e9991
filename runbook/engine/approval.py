"""Approval: a human act on a shown plan, never a parameter.

The runner asks here when a run would apply changes under the ``approve`` policy, or when the procedure needs
approval (``approval: required``, data-corruption by default). Two ways to ask, chosen by where the run is:

- a local approver the CLI installs for its own in-process run (the plan printed, ``yes`` typed at a terminal, or
  ``--yes`` from a script, recorded as the OS user and host);
- otherwise the run pauses in Prefect with a form that shows the findings and the exact plan. The plan is also
  stored as the run's input ``runbook-plan`` so ``runbook approvals`` / ``runbook approve`` can show it.

A run an executor started from a deployment *suspends* (waiting costs nothing): it leaves its thread, and when the
form is answered Prefect reschedules it; the executor runs it again from the top. Diagnosis and planning are
read-only, so repeating them repeats no side effect, and the "waiting" notification is sent only when the question
is first asked. The decision then covers only the changes that were shown (by identity: the same pid, container,
file...); anything the new plan adds is skipped as not approved, and what no longer holds is dropped by the runner
as always. An executor answers a
suspended run nobody decided by its deadline with a rejection (runbook.app.reconcile), so a timeout ends, as
before, in a report saying nothing was applied. A run started any other way waits in its thread (pause).

No decision, a rejection, a timeout or the run being cancelled while it waits changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext
from prefect.exceptions import Abort, Pause, PrefectHTTPStatusError
from prefect.input import RunInput, keyset_from_paused_state
from prefect.settings import PREFECT_API_URL
from prefect.states import Paused, Running, Suspended
from prefect.utilities.engine import propose_state_sync
from pydantic import Field

from runbook.engine.decisions import (
    _LOCAL,
    APPROVER_PATTERN,
    TIMEOUT_APPROVER,
    Decision,
    PlanView,
    parse_plan_input,
)
from runbook.engine.run_inputs import PAUSE_KEY, PLAN_INPUT_KEY

SERVER_EXPIRY_MARGIN_S = 600


class ApprovalInput(RunInput):
    """The form an approver fills in (Prefect UI, or `runbook approve`). Your name is required."""

    approve: bool = Field(False, description="apply exactly the plan shown above")
    approver: str = Field(min_length=1, max_length=128, pattern=APPROVER_PATTERN,
                          description="your name: recorded in the report and the run's log")
    reason: str = Field("", max_length=500, description="why (recorded in the report)")


def ask(view: PlanView, timeout_s: float, on_waiting: Callable[[PlanView], None]) -> Decision:
    """Ask for a decision on ``view``; ``on_waiting`` is called once the question is out (notifications)."""
    local = _LOCAL.get()
    if local is not None:
        return local(view)

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None or not PREFECT_API_URL.value():
        return Decision(approved=False, reason="nobody can be asked: run at a terminal (`runbook run ... --apply`) "
                                               "or through a Prefect server, where the run pauses for approval")
    if ctx.flow_run.deployment_id is not None:
        return _suspend_for_approval(view, timeout_s, on_waiting)
    return _pause_for_approval(view, timeout_s, on_waiting)


def _suspend_for_approval(view: PlanView, timeout_s: float, on_waiting: Callable[[PlanView], None]) -> Decision:
    """Ask, then leave the thread (``Pause``); on the run's next start, return the decision for this plan."""
    ctx = FlowRunContext.get()
    assert ctx is not None and ctx.flow_run is not None
    run_id = ctx.flow_run.id
    # the server fails a suspended run when its own expiry passes: leave the executors time to answer it first
    state: State[None] = Suspended(timeout_seconds=int(timeout_s) + SERVER_EXPIRY_MARGIN_S, pause_key=PAUSE_KEY)
    keyset = keyset_from_paused_state(state)
    state.state_details.run_input_keyset = keyset  # type: ignore[assignment]  # (see _pause_for_approval)
    with get_client(sync_client=True) as client:
        shown = _stored_plan(client, run_id)
        if shown is None:  # first time asked: the plan is stored before the run shows PAUSED
            view.run_id, view.asked_at = str(run_id), datetime.now(UTC)  # asked now: the deadline counts from here
            view.deadline = view.asked_at + timedelta(seconds=timeout_s)
            client.create_flow_run_input(run_id, PLAN_INPUT_KEY, view.model_dump_json())
        try:
            new = propose_state_sync(client=client, state=state, flow_run_id=run_id)
        except Abort as exc:
            return Decision(approved=False, reason=f"could not suspend for approval: {exc}")
        if new.is_running():  # asked before, and answered: this is the run's next start
            loaded = ApprovalInput.load(keyset)
            answer = ApprovalInput.model_validate(loaded.model_dump())  # type: ignore[union-attr]
            if answer.approver == TIMEOUT_APPROVER:
                return Decision(approved=False, reason=answer.reason or "approval timed out")
            return Decision(approved=answer.approve, approver=answer.approver, reason=answer.reason,
                            how="in the Prefect UI or with `runbook approve`",
                            approved_changes=shown.identities if shown is not None else [])
        if not new.is_paused():
            return Decision(approved=False, reason=f"could not suspend for approval: state is {new.type.value}")
        # the form after the pause: the server clears the keyset's inputs when it accepts one
        ApprovalInput.with_initial_data(approve=False).save(keyset)
        client.create_flow_run_input(run_id, keyset["description"], (shown or view).markdown())
    if shown is None:
        on_waiting(view)
    raise Pause(state=new)  # the engine records the suspension and the executor's thread is free


def _stored_plan(client: SyncPrefectClient, run_id: UUID) -> PlanView | None:
    raw = read_run_input(client, run_id, PLAN_INPUT_KEY)
    return None if raw is None else parse_plan_input(raw)


def read_run_input(client: SyncPrefectClient, run_id: UUID, key: str) -> str | None:
    """A run input's stored value, or None when the run has none under ``key``."""
    try:
        return client.read_flow_run_input(run_id, key)
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code == 404:
            return None
        raise


def _pause_for_approval(view: PlanView, timeout_s: float, on_waiting: Callable[[PlanView], None]) -> Decision:
    """Pause this run with the form, store the plan, and wait for a decision (or the timeout, or a cancel).

    Written on Prefect's pause pieces rather than ``pause_flow_run`` because that one only notices a resume:
    a run cancelled while paused (its alert resolved) would sit out the whole timeout.
    """

    ctx = FlowRunContext.get()
    assert ctx is not None and ctx.flow_run is not None
    run_id = ctx.flow_run.id
    view.run_id, view.asked_at = str(run_id), datetime.now(UTC)
    view.deadline = view.asked_at + timedelta(seconds=timeout_s)
    form = ApprovalInput.with_initial_data(approve=False)
    # the server's own pause expiry comes a little after ours, so this loop always decides first
    state: State[None] = Paused(timeout_seconds=int(timeout_s) + 60, reschedule=False, pause_key=PAUSE_KEY)
    keyset = keyset_from_paused_state(state)
    # prefect types its Keyset (Literal keys) and StateDetails.run_input_keyset (str keys) apart: the same dict
    state.state_details.run_input_keyset = keyset  # type: ignore[assignment]
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        client.create_flow_run_input(run_id, PLAN_INPUT_KEY, view.model_dump_json())
        try:
            new = propose_state_sync(client=client, state=state, flow_run_id=run_id)
        except Abort as exc:
            return Decision(approved=False, reason=f"could not pause for approval: {exc}")
        if not new.is_paused():
            return Decision(approved=False, reason=f"could not pause for approval: state is {new.type.value}")
        form.save(keyset)
        # Prefect's with_initial_data(description=...) is lost on pydantic 2 models (stored as a private attribute,
        # never saved): write the description the UI shows above the form ourselves
        client.create_flow_run_input(run_id, keyset["description"], view.markdown())
        on_waiting(view)
        while time.monotonic() < deadline:
            time.sleep(0.5)
            current = client.read_flow_run(run_id).state
            if current is None:
                continue
            if current.is_running():
                # prefect's async_dispatch types every call as "value or coroutine"; outside an event loop it is sync
                loaded = form.load(keyset)
                answer = ApprovalInput.model_validate(loaded.model_dump())  # type: ignore[union-attr]
                return Decision(approved=answer.approve, approver=answer.approver, reason=answer.reason,
                                how="in the Prefect UI or with `runbook approve`")
            if current.is_final() or current.name == "Cancelling":
                name = current.name or current.type.value  # prefect always names a state; its type allows None
                return Decision(approved=False, reason=f"run {name.lower()} while waiting for approval")
        # Nobody decided: take the run out of PAUSED ourselves (forced: the server would otherwise fail a paused run
        # that completes), so it finishes with a report saying nothing was applied.
        client.set_flow_run_state(run_id, Running(message="approval timed out"), force=True)
    return Decision(approved=False, reason=f"no approval within {timeout_s:g} s (a timeout counts as rejection)")


