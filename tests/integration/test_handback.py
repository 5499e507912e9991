"""A run's last state has one writer (runbook.app.handback): a draining executor's hand-back never overwrites a
final state its run already reached, and a handed-back run's thread writes no state over the hand-back. Against
the sandbox's real Prefect server, with Prefect's real flow engine; the two orders are forced with events."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.flow_engine import run_flow
from prefect.settings import temporary_settings
from prefect.states import AwaitingRetry

from runbook.app import handback
from runbook.app.remote_run import api_client
from runbook.sandbox import SandboxState
from tests.prefect_runs import api_settings, run_history

pytestmark = pytest.mark.integration

TIMEOUT_S = 60  # hang bounds, never speed checks


def _hand_back_writer(run_id: str) -> Callable[[], None]:
    def write() -> None:  # what Executor._hand_back writes
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(UUID(run_id), AwaitingRetry(scheduled_time=datetime.now(UTC),
                                                                   message="handed back (test)"), force=True)
    return write


def _start(api: str, fl: Any) -> tuple[str, threading.Thread, dict[str, Any]]:
    """Create a run of ``fl`` and run it in a thread that holds it, as the executor's run threads do."""
    out: dict[str, Any] = {}
    with temporary_settings(updates=api_settings(api)), get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(fl)
    run_id = str(flow_run.id)

    def body() -> None:
        with temporary_settings(updates=api_settings(api)), handback.holding(run_id):
            try:
                out["state"] = run_flow(fl, flow_run=flow_run, return_type="state")
            except BaseException as exc:  # noqa: BLE001 - the test reads what the engine raised
                out["raised"] = exc
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return run_id, thread, out


def _hand_back_then_release(api: str, run_id: str, thread: threading.Thread, release: threading.Event) -> bool:
    """Hand the run back while its thread is held, then let the thread go on and wait for it."""
    with temporary_settings(updates=api_settings(api)):
        handed = handback.hand_back_unless_final(run_id, _hand_back_writer(run_id))
    release.set()
    thread.join(TIMEOUT_S)
    return handed


def _states(api: str, run_id: str) -> list[str]:
    with api_client(api, timeout_s=10) as http:
        return [f"{s['type']}:{s['name']}" for s in run_history(http, run_id)]


def test_a_run_whose_final_state_was_accepted_is_not_handed_back(sandbox_state: SandboxState) -> None:
    api = sandbox_state.prefect_api_url
    assert api
    handback.install()
    final_accepted, release = threading.Event(), threading.Event()

    def artifacts_hook(*_args: object) -> None:  # the run's thread still holds the run, as while it writes artifacts
        final_accepted.set()
        release.wait(TIMEOUT_S)

    @flow(name="handback-finished", persist_result=False, on_completion=[artifacts_hook])
    def finished() -> str:
        return "done"

    run_id, thread, out = _start(api, finished)
    assert final_accepted.wait(TIMEOUT_S), out
    assert _hand_back_then_release(api, run_id, thread, release) is False
    assert _states(api, run_id)[-1] == "COMPLETED:Completed", _states(api, run_id)
    assert out["state"].is_completed(), out


def test_a_handed_back_run_writes_no_state_over_the_hand_back(sandbox_state: SandboxState) -> None:
    api = sandbox_state.prefect_api_url
    assert api
    handback.install()
    running, release = threading.Event(), threading.Event()

    @flow(name="handback-long", persist_result=False)
    def long() -> str:
        running.set()
        release.wait(TIMEOUT_S)
        return "done"

    run_id, thread, out = _start(api, long)
    assert running.wait(TIMEOUT_S), out
    assert _hand_back_then_release(api, run_id, thread, release) is True
    states = _states(api, run_id)
    assert states[-1] == "SCHEDULED:AwaitingRetry", states  # not the thread's Completed
    assert "COMPLETED:Completed" not in states, states
    assert "handed back" in str(out.get("raised") or out.get("state")), out


def test_a_run_its_thread_let_go_of_is_not_handed_back(sandbox_state: SandboxState) -> None:
    api = sandbox_state.prefect_api_url
    assert api
    handback.install()

    @flow(name="handback-done", persist_result=False)
    def done() -> str:
        return "done"

    run_id, thread, out = _start(api, done)
    thread.join(TIMEOUT_S)
    writes: list[str] = []
    assert handback.hand_back_unless_final(run_id, lambda: writes.append(run_id)) is False
    assert writes == [] and _states(api, run_id)[-1] == "COMPLETED:Completed"
