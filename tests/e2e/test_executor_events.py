"""A run created elsewhere (the Prefect UI, the API) reaches the warm executor through Prefect's event stream."""

from __future__ import annotations

import time

import pytest
from prefect.settings import temporary_settings

from runbook.app.executor import Executor
from runbook.app.remote_run import api_client, deployment
from runbook.app.serve import register_deployments
from runbook.sandbox import SandboxState
from tests.prefect_runs import api_settings

pytestmark = pytest.mark.integration


def _wait(pred, timeout_s: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_a_run_created_through_the_api_starts_without_a_poll(sandbox_state: SandboxState) -> None:
    api = sandbox_state.prefect_api_url
    assert api
    register_deployments(api)
    ex = Executor(poll_s=3600)  # one poll at start (heartbeat), then none for an hour: only events can start it
    with temporary_settings(updates=api_settings(api)):
        ex.start()
    try:
        assert _wait(lambda: ex.events_connected.is_set() and ex.polls >= 1, 30), "executor not ready"
        with api_client(api, timeout_s=10) as http:
            dep = deployment(http, "network-checks")
            run = http.post(f"/deployments/{dep['id']}/create_flow_run", json={
                "parameters": {"env": "sandbox"}, "state": {"type": "SCHEDULED", "name": "Scheduled"}},
            ).raise_for_status().json()

            def state() -> dict:
                return http.get(f"/flow_runs/{run['id']}").raise_for_status().json()["state"]

            assert _wait(lambda: state()["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"), 180), state()
            assert state()["type"] == "COMPLETED", state()
            states = http.get("/flow_run_states/", params={"flow_run_id": run["id"]}).raise_for_status().json()
        assert any(s.get("message") == f"claimed by {ex.name}" for s in states), [s.get("message") for s in states]
        assert ex.polls == 1, "started by the event, not by a poll"
    finally:
        ex.stop(grace_s=0)
