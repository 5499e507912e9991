"""API authentication is on by default: the sandbox's Prefect server refuses a run created without its auth string,
accepts ours, and the CLI with a missing or wrong string stops with exit 2 and a message that never quotes it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from runbook.app.remote_run import api_client, deployment
from runbook.app.serve import register_deployments
from runbook.engine.prefect_env import AUTH_ENV, AUTH_FILE
from runbook.sandbox import SandboxState
from tests.intake_harness import alert, running_intake

pytestmark = pytest.mark.integration

WRONG = "runbook:not-the-string-0123456789"


def _create_body() -> dict[str, object]:
    return {"parameters": {"env": "sandbox", "dry_run": True}, "tags": ["auth-test"],
            "state": {"type": "CANCELLED", "name": "Cancelled"}}  # created final: no executor ever runs it


def test_the_api_refuses_a_run_without_the_string_and_accepts_ours(sandbox_state: SandboxState) -> None:
    api = sandbox_state.prefect_api_url
    auth = sandbox_state.prefect_api_auth
    assert api and auth
    register_deployments(api, auth=auth)
    with api_client(api, auth=auth) as http:
        dep = deployment(http, "db-slowness")
    url = f"{api}/deployments/{dep['id']}/create_flow_run"
    with httpx.Client(timeout=10, trust_env=False) as anyone:
        assert anyone.post(url, json=_create_body()).status_code == 401
        assert anyone.post(url, json=_create_body(), auth=("runbook", "guessed")).status_code == 401
        assert anyone.get(f"{api}/health").status_code == 200, "health probes stay open, as Prefect leaves them"
    with api_client(api, auth=auth) as http:
        resp = http.post(f"/deployments/{dep['id']}/create_flow_run", json=_create_body())
        assert resp.status_code == 201, resp.text
        http.delete(f"/flow_runs/{resp.json()['id']}").raise_for_status()


def test_the_string_lives_in_a_0600_file_and_never_in_the_server_log(sandbox_state: SandboxState) -> None:
    path = sandbox_state.state_dir / AUTH_FILE
    auth = sandbox_state.prefect_api_auth
    assert auth and stat.S_IMODE(path.stat().st_mode) == 0o600
    log = Path(sandbox_state.services["prefect"].log_file).read_text(errors="replace")
    assert auth.partition(":")[2] not in log


def test_sandbox_env_exports_the_string_beside_the_url(sandbox_state: SandboxState) -> None:
    proc = _runbook("sandbox", "env", env=os.environ)
    assert proc.returncode == 0, proc.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in proc.stdout.splitlines())
    assert exports["PREFECT_API_URL"] == sandbox_state.prefect_api_url
    assert exports[AUTH_ENV] == sandbox_state.prefect_api_auth  # token_urlsafe needs no shell quoting


def test_an_intake_with_a_wrong_string_answers_503_and_stores_nothing(sandbox_state: SandboxState,
                                                                       tmp_path: Path) -> None:
    """Alertmanager retries a 503 (never a 4xx): the alert is not lost while the string is being fixed."""
    with running_intake(sandbox_state, tmp_path, executor=False, api_auth=WRONG) as it:
        resp = it.post(alert("DatabaseConnectionHigh", {"db": "main"}, fingerprint="auth0001"))
        assert resp.status_code == 503 and "auth string" in resp.text
        assert it.app.state.store.pending() == []
        health = httpx.get(f"{it.url}/healthz", timeout=5)
        assert health.status_code == 503 and health.json()["prefect_api"] is False
        assert WRONG.partition(":")[2] not in resp.text + health.text


@pytest.mark.parametrize(("command", "auth"), [
    (("run", "db-slowness", "--env", "sandbox"), WRONG),
    (("run", "db-slowness", "--env", "sandbox"), ""),
    (("run", "db-slowness", "--env", "sandbox", "--in-process"), WRONG),  # Prefect's own client meets the 401
    (("approvals",), WRONG),
    (("deploy",), ""),
], ids=["run-wrong", "run-missing", "run-in-process-wrong", "approvals-wrong", "deploy-missing"])
def test_the_cli_with_a_wrong_or_missing_string_exits_2_saying_where_to_set_it(
        sandbox_state: SandboxState, auth: str, command: tuple[str, ...]) -> None:
    env = {k: v for k, v in os.environ.items() if k != AUTH_ENV}
    env.update(PREFECT_API_URL=sandbox_state.prefect_api_url or "", **({AUTH_ENV: auth} if auth else {}))
    proc = _runbook(*command, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    said = proc.stdout + proc.stderr
    assert "401" in said and AUTH_ENV in said and "PREFECT_SERVER_API_AUTH_STRING" in said
    assert ("refused the auth string sent" if auth else "no auth string was sent") in said
    assert "Traceback" not in said
    right = sandbox_state.prefect_api_auth or ""
    assert right.partition(":")[2] not in said
    if auth:
        assert WRONG.partition(":")[2] not in said, "the string sent is never echoed"


def _runbook(*args: str, env: os._Environ[str] | dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runbook.app.cli", *args], capture_output=True, text=True,
                          env=dict(env), timeout=300, check=False)


def test_the_background_server_demands_its_own_string_and_runbook_run_sends_it(
        sandbox_state: SandboxState, tmp_path: Path) -> None:
    """`runbook run` with nothing configured starts the background server with a string of its own (another one in
    the environment, here the sandbox's, is not sent to it), and the run goes through it."""
    from runbook.app import local_server

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(RUNBOOK_STATE_DIR=str(tmp_path), RUNBOOK_LOCAL_SERVER="1")
    try:
        proc = _runbook("run", "network-checks", "--env", "sandbox", env=env)
        assert proc.returncode in (0, 3), proc.stdout + proc.stderr
        assert "on the warm executor at" in proc.stderr, proc.stderr
        auth = local_server.auth_string(tmp_path)
        assert auth and auth != sandbox_state.prefect_api_auth
        assert stat.S_IMODE((tmp_path / AUTH_FILE).stat().st_mode) == 0o600
        api = local_server.running(tmp_path)
        assert api and httpx.get(f"{api}/admin/version", timeout=10, trust_env=False).status_code == 401
        logs = proc.stdout + proc.stderr + (tmp_path / "serve.log").read_text(errors="replace")
        assert auth.partition(":")[2] not in logs
    finally:
        local_server.stop(tmp_path)
