"""Runs whose executor died: found, finished honestly, and an alert's run retried once.

An executor claims a run by proposing PENDING with the message ``claimed by NAME`` and heartbeats its worker record
every poll. A RUNNING or PENDING run whose claiming executor stopped heartbeating (or, on this host, whose process is
gone) is a zombie: nothing will ever finish it, and the intake's deduplication would hold every resend of its alert
on it. One live executor at a time (the one whose name sorts first, so two never race on the same run) marks each
zombie CRASHED, saying which executor died and whether it had started applying, and reschedules an alert's run once
(``AwaitingRetry``: the same run, so the intake's record of the occurrence still points at it). A retry is safe even
after a partial apply: every remediation re-reads the state it would change, plans only what is still needed, and
re-checks each change against the identity it was planned for (runbook.engine.runner).

The same executor answers a run suspended for approval (runbook.engine.approval) that nobody decided by the
deadline stored with its plan: a rejection, so the run starts again, applies nothing and reports the timeout.

Prefect's own zombie detection (an automation on missing flow-run heartbeats) needs heartbeats of at least 30 s
and a proactive trigger window beyond them: 90-120 s. The executors' worker heartbeats (every poll, 15 s) bound it
tighter, and a restarted executor on the same host recovers its predecessor's runs at once.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    TaskRunFilter,
    TaskRunFilterName,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import FlowRun, StateType, Worker
from prefect.client.schemas.responses import SetStateStatus
from prefect.states import AwaitingRetry, Crashed, Failed

from runbook.engine.decisions import TIMEOUT_APPROVER, parse_plan_input
from runbook.engine.run_inputs import PAUSE_KEY, PLAN_INPUT_KEY

log = logging.getLogger(__name__)

CLAIM_PREFIX = "claimed by "  # the message of an executor's PENDING claim
OCCURRENCE_TAG = "occurrence:"  # on every run the intake creates for an alert
MISSED_BEATS = 3  # an executor that missed three heartbeats is gone...
# ...and never sooner than this: a live executor starved of CPU or stuck behind a slow API (seen in the multi-node
# storm with 1 s heartbeats: both executors took each other for dead) must not lose its runs to a retry elsewhere
MIN_SILENCE_S = 30.0


def claim_message(executor: str) -> str:
    return f"{CLAIM_PREFIX}{executor}"


def executor_name(pid: int | None = None) -> str:
    """``runbook-HOST-PID``: unique per process, and tells a successor on the same host whether it still lives."""
    return f"runbook-{socket.gethostname()}-{pid or os.getpid()}"


def heartbeat_fresh(worker: Worker, now: datetime, default_interval_s: float) -> bool:
    beat = worker.last_heartbeat_time
    interval = worker.heartbeat_interval_seconds or default_interval_s
    return beat is not None and (now - beat).total_seconds() <= max(MISSED_BEATS * interval, MIN_SILENCE_S)


def process_gone(executor: str) -> bool:
    """True only when ``executor`` ran on this host and its process no longer exists (a restart after kill -9)."""
    prefix = f"runbook-{socket.gethostname()}-"
    if not executor.startswith(prefix) or not executor.removeprefix(prefix).isdigit():
        return False
    try:
        os.kill(int(executor.removeprefix(prefix)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # someone's process: alive
    return False


@dataclass(frozen=True)
class Verdict:
    """What the reconciler did with one zombie run."""

    run_id: str
    owner: str
    retried: bool
    message: str


class Reconciler:
    """Finds and finishes the runs of dead executors in one work pool (called from an executor's poll)."""

    def __init__(self, work_pool: str, name: str, mine: Callable[[], set[str]], interval_s: float) -> None:
        self.work_pool = work_pool
        self.name = name
        self._mine = mine
        self._interval_s = interval_s
        self._owners: dict[str, str | None] = {}
        self._deadlines: dict[str, datetime | None] = {}
        self._asked: dict[str, datetime] = {}

    def reconcile(self, client: Any) -> list[Verdict]:
        now = datetime.now(UTC)
        workers = {w.name: w for w in client.read_workers_for_work_pool(self.work_pool)}
        live = sorted(n for n, w in workers.items()
                      if heartbeat_fresh(w, now, self._interval_s) and not process_gone(n))
        if live and live[0] != self.name:
            return []  # another live executor reconciles this pool
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.RUNNING, StateType.PENDING]))),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[self.work_pool])), limit=200)
        self._answer_expired_approvals(client, now)
        mine = self._mine()
        verdicts = []
        for run in runs:
            if str(run.id) in mine:
                continue
            history = None
            if str(run.id) not in self._owners:
                history = client.read_flow_run_states(run.id)
                self._owners[str(run.id)] = _claimed_by(history)
            owner = self._owners[str(run.id)]
            if owner is None or owner == self.name or owner in live:
                continue  # not ours to judge (no runbook claim), or its executor lives
            if owner not in workers and not process_gone(owner) and _claimed_within(run, now, MIN_SILENCE_S):
                continue  # claimed just now by an executor whose first heartbeat has not landed yet
            verdicts.append(self._finish(client, run, owner, workers.get(owner), history, now))
        return verdicts

    def _answer_expired_approvals(self, client: Any, now: datetime) -> None:
        suspended = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.PAUSED]))),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[self.work_pool])), limit=200)
        for run in suspended:
            details = run.state.state_details if run.state else None
            if details is None or details.pause_key != PAUSE_KEY or not details.pause_reschedule:
                continue  # not a suspended approval (a run paused in its thread times out by itself)
            key = str(run.id)
            if key not in self._deadlines:
                try:
                    plan = parse_plan_input(client.read_flow_run_input(run.id, PLAN_INPUT_KEY))
                except httpx.HTTPStatusError:
                    plan = None
                self._deadlines[key] = plan.deadline if plan else None
                if plan is not None:
                    self._asked[key] = plan.asked_at
            deadline = self._deadlines[key]
            if deadline is None or now < deadline:
                continue
            asked_for = round((deadline - self._asked[key]).total_seconds()) if key in self._asked else None
            reason = ((f"no approval within {asked_for} s" if asked_for is not None else "no approval in time")
                      + " (a timeout counts as rejection)")
            result = client.resume_flow_run(run.id, run_input={
                "approve": False, "approver": TIMEOUT_APPROVER, "reason": reason})
            if result.status != SetStateStatus.ACCEPT:  # e.g. its form is gone: end it, applying nothing
                why = getattr(result.details, "reason", None) or result.status.value
                message = f"{reason}; could not resume it ({why}): nothing was applied"
                client.set_flow_run_state(run.id, Failed(message=message[:500]), force=True)
            self._deadlines.pop(key, None)
            self._asked.pop(key, None)
            log.warning("flow run %s: approval timed out; resumed as rejected", run.id)

    def _finish(self, client: Any, run: FlowRun, owner: str, worker: Worker | None, history: list[Any] | None,
                now: datetime) -> Verdict:
        history = history if history is not None else client.read_flow_run_states(run.id)
        if worker is not None and worker.last_heartbeat_time is not None:
            silent = int((now - worker.last_heartbeat_time).total_seconds())
            gone = f"its executor {owner} stopped heartbeating {silent} s ago"
        else:
            gone = f"its executor {owner} is gone"
        applying = _started_applying(client, run)
        message = (f"{gone} while the run was {run.state.name if run.state else '?'}"
                   + (f"; it had started {', '.join(applying)}" if applying else "; nothing was applied"))
        client.set_flow_run_state(run.id, Crashed(message=message[:500]), force=True)
        crashed_before = sum(1 for s in history if s.type == StateType.CRASHED)
        retry = any(t.startswith(OCCURRENCE_TAG) for t in run.tags) and crashed_before == 0
        if retry:
            client.set_flow_run_state(run.id, AwaitingRetry(
                scheduled_time=now, message=f"retried once after a crash ({gone}): remediations re-check every "
                                            "change, so nothing done is done twice"), force=True)
        self._owners.pop(str(run.id), None)  # a retry is claimed afresh
        log.warning("flow run %s: %s%s", run.id, message, "; retrying once" if retry else "")
        return Verdict(str(run.id), owner, retry, message)


def _claimed_within(run: FlowRun, now: datetime, seconds: float) -> bool:
    """Whether the run's current state (its claim, or Running) began less than ``seconds`` ago."""
    ts = run.state.timestamp if run.state else None
    return ts is not None and (now - ts).total_seconds() < seconds


def _claimed_by(history: list[Any]) -> str | None:
    """The executor of the run's latest claim (runs are claimed again after a retry)."""
    claims = [s for s in history if s.type == StateType.PENDING and (s.message or "").startswith(CLAIM_PREFIX)]
    if not claims:
        return None
    latest = max(claims, key=lambda s: s.timestamp)
    return str(latest.message).removeprefix(CLAIM_PREFIX)


def _started_applying(client: Any, run: FlowRun) -> list[str]:
    """The apply steps the run had started (task runs ``apply-...``), for the crash message."""
    tasks = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
        task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="apply-")), limit=50)
    return sorted({t.name for t in tasks})
