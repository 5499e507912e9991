"""Test helpers for runs on the sandbox's Prefect server: create one as the UI does, read its state, wait."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from runbook.app.remote_run import deployment
from runbook.engine.prefect_env import auth_header, client_env, env_auth_string


def api_headers() -> dict[str, str]:
    """The Authorization header the sandbox's Prefect API demands (the session puts its auth string in
    PREFECT_API_AUTH_STRING, as `runbook sandbox env` does for a shell)."""
    return auth_header(env_auth_string())


def api_settings(api: str) -> dict[str, str]:
    """Prefect settings for runs against ``api`` with the sandbox's auth string: a thread starts from Prefect's
    import-time settings, not the session's, so it needs both again."""
    return client_env(api, env_auth_string())


def wait_for(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``pred`` until true; fail naming ``what`` after ``timeout_s`` (a hang bound, never a speed check)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def run_artifacts(api: str, run_id: str, timeout_s: float = 30) -> list[dict[str, Any]]:
    """The run's artifacts once its report and findings table are both there: the engine writes them the moment
    the final state is accepted (runbook.engine.procedure.publish_after_final_state), so a test that has just
    seen the state may be a few milliseconds ahead of them."""
    found: list[dict[str, Any]] = []

    def both() -> bool:
        found[:] = httpx.post(f"{api}/artifacts/filter", headers=api_headers(), timeout=10,
                              json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).raise_for_status().json()
        return {"markdown", "table"} <= {a.get("type") for a in found}

    wait_for(both, timeout_s, f"the report artifacts of run {run_id}")
    return found


def create_run(http: httpx.Client, procedure: str, params: dict[str, Any], tags: list[str]) -> str:
    """A run of the procedure's deployment, created the way the Prefect UI's Run button does."""
    dep = deployment(http, procedure)
    return str(http.post(f"/deployments/{dep['id']}/create_flow_run", json={
        "parameters": params, "tags": tags, "state": {"type": "SCHEDULED", "name": "Scheduled"}},
    ).raise_for_status().json()["id"])


def run_state(http: httpx.Client, run_id: str) -> dict[str, Any]:
    return http.get(f"/flow_runs/{run_id}").raise_for_status().json()["state"]  # type: ignore[no-any-return]


def run_history(http: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    states = http.get("/flow_run_states/", params={"flow_run_id": run_id}).raise_for_status().json()
    return sorted(states, key=lambda s: s["timestamp"])


def runbook_cli(api_url: str, *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    """`runbook ARGS` in a subprocess against the Prefect API at ``api_url`` (no terminal: stdin closed)."""
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return subprocess.run([sys.executable, "-m", "runbook.app.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False, stdin=subprocess.DEVNULL)


def approve_seen_plan(api_url: str, run_id: str, change: str, reason: str) -> None:
    """As a person would: `runbook approvals` must show ``change`` (a prefix) in the run's plan, then
    `runbook approve RUN --yes`."""
    listed = json.loads(runbook_cli(api_url, "approvals", "--output", "json").stdout)
    mine = next(r for r in listed if r["run_id"] == run_id)
    assert any(c.startswith(change) for c in mine["changes"]), mine["changes"]
    approved = runbook_cli(api_url, "approve", run_id, "--yes", "--reason", reason)
    assert approved.returncode == 0, approved.stdout + approved.stderr
