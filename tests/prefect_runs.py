"""Test helpers for runs on the sandbox's Prefect server: create one as the UI does, read its state, wait."""

from __future__ import annotations

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
