"""A DSN libpq cannot parse is a configuration error (exit 2) naming the environment and the key, and no part of its
password reaches any output: the CLI's stdout and stderr, the console of the process running the flow, and what the
sandbox's real Prefect server keeps (the run's logs, flow and task run states and their messages, artifacts).

The passwords are five characters or fewer, so the redaction net (which masks registered secrets of six or more)
cannot hide them: only the mapping at the client boundary keeps them out. Fragments are mixed-case so they cannot
turn up by chance in UUIDs or timestamps.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from runbook.app.remote_run import api_client
from runbook.app.serve import register_deployments
from runbook.engine.procedure import flush_run_records
from runbook.sandbox import SandboxState
from tests.e2e.test_cli_warm import warm  # noqa: F401 - the warm executor fixture, one per module
from tests.integration.derived_env import derive

pytestmark = pytest.mark.integration

VAR = "RUNBOOK_LEAKTEST_DSN"


@dataclass(frozen=True)
class Shape:
    name: str
    dsn: str  # {port} is the sandbox PostgreSQL's
    fragments: tuple[str, ...]  # the password and the tail libpq's message would quote
    problem: str  # the fixed description the ConfigError gives


SHAPES = [
    Shape("url-bad-percent", "postgresql://runbook:K%zQ7@127.0.0.1:{port}/pafar", ("K%zQ7", "zQ7"),
          "'%' in the URL is not followed by two hex digits"),
    Shape("keyword-unquoted-space", "host=127.0.0.1 port={port} user=runbook password=Hd9W XqZ7k dbname=pafar",
          ("Hd9W", "XqZ7k"), "a value with a space must be in single quotes"),
]
MORE_SHAPES = [
    Shape("keyword-unterminated-quote", "host=127.0.0.1 port={port} password='Hd9W XqZ7k", ("Hd9W", "XqZ7k"),
          "a quoted value is not closed"),
    Shape("keyword-space-then-equals", "host=127.0.0.1 port={port} password=Hd9W Zq7=1 dbname=pafar",
          ("Hd9W", "Zq7"), "an unknown keyword"),
    Shape("url-unclosed-ipv6", "postgresql://runbook:Kq9Zt@[::1:{port}/pafar", ("Kq9Zt",),
          "IPv6 address in the URL is missing its ']'"),
]


def _assert_clean(text: str, shape: Shape, channel: str) -> None:
    for fragment in shape.fragments:
        assert fragment not in text, f"{shape.name}: {fragment!r} leaked in {channel}:\n{text[-3000:]}"


def _assert_config_error(text: str, shape: Shape, env_name: str) -> None:
    flat = " ".join(text.split())
    assert f"environments.{env_name}.databases.main.dsn: not a valid PostgreSQL connection string" in flat, flat
    assert shape.problem in flat and "(the value is not shown)" in flat, flat


@pytest.fixture
def leaky_env(request: pytest.FixtureRequest, sandbox_state: SandboxState, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> tuple[str, Shape]:
    """An environment whose database DSN (from ``VAR``) is the shape's; also visible to subprocesses."""
    shape: Shape = request.param
    name = derive(sandbox_state, tmp_path, monkeypatch, "leaktest", {"databases": {"main": {"dsn": {"env": VAR}}}})
    port = sandbox_state.env_vars()["RUNBOOK_SANDBOX_DB_DSN"].rsplit(":", 1)[1].split("/")[0]
    monkeypatch.setenv(VAR, shape.dsn.format(port=port))
    monkeypatch.setenv("RUNBOOK_PLAYBOOKS", os.pathsep.join([sandbox_state.engine_env()["RUNBOOK_PLAYBOOKS"],
                                                             str(tmp_path)]))
    return name, shape


def cli(*args: str, api: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RUNBOOK_LOCAL_SERVER": "0"}
    if api:
        env["PREFECT_API_URL"] = api
    return subprocess.run([sys.executable, "-m", "runbook.app.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def server_texts(api: str, run_id: str) -> dict[str, str]:
    """Everything the Prefect server keeps about a flow run that can hold text, as JSON per channel."""
    flush_run_records()
    with api_client(api, timeout_s=10) as http:
        run = http.get(f"/flow_runs/{run_id}").json()
        states = http.get("/flow_run_states/", params={"flow_run_id": run_id}).json()
        tasks = http.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
        task_states = [http.get("/task_run_states/", params={"task_run_id": t["id"]}).json() for t in tasks]
        logs = http.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}).json()
        arts = http.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
        inputs = http.post(f"/flow_runs/{run_id}/input/filter", json={"prefix": ""}).json()
    return {"flow run": json.dumps(run), "flow run states": json.dumps(states), "task runs": json.dumps(tasks),
            "task run states": json.dumps(task_states), "logs": json.dumps(logs), "artifacts": json.dumps(arts),
            "run inputs": json.dumps(inputs)}


@pytest.mark.parametrize("leaky_env", SHAPES + MORE_SHAPES, indirect=True, ids=lambda s: s.name)
def test_check_env_parses_every_dsn_and_names_env_and_key(leaky_env: tuple[str, Shape]) -> None:
    name, shape = leaky_env
    proc = cli("check", "--env", name)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    _assert_config_error(proc.stderr, shape, name)
    _assert_clean(proc.stdout + proc.stderr, shape, "check's output")


@pytest.mark.parametrize("leaky_env", SHAPES, indirect=True, ids=lambda s: s.name)
def test_run_in_process_exits_2_before_a_run_exists(leaky_env: tuple[str, Shape],
                                                    sandbox_state: SandboxState) -> None:
    name, shape = leaky_env
    proc = cli("run", "db-slowness", "--env", name, "--in-process", api=sandbox_state.prefect_api_url)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    _assert_config_error(proc.stderr, shape, name)
    assert "Traceback" not in proc.stderr
    _assert_clean(proc.stdout + proc.stderr, shape, "run --in-process output")


@pytest.mark.parametrize("leaky_env", SHAPES, indirect=True, ids=lambda s: s.name)
def test_a_flow_run_on_the_server_fails_as_a_config_error_and_keeps_no_password(
        leaky_env: tuple[str, Shape], sandbox_state: SandboxState, capfd: pytest.CaptureFixture[str]) -> None:
    """The flow itself (as a worker, the intake or a UI run starts it, with no CLI check before it): the task
    that connects fails with the ConfigError from the client boundary, the flow with it; the process's console
    (Prefect prints tracebacks there) and every server channel are clean."""
    from flows.db_slowness import db_slowness

    name, shape = leaky_env
    state = db_slowness(env=name, dry_run=True, return_state=True)
    console = capfd.readouterr()
    assert state.is_failed() and "ConfigError" in (state.message or ""), state
    run_id = str(state.state_details.flow_run_id)
    texts = server_texts(sandbox_state.prefect_api_url or "", run_id)
    _assert_config_error(texts["flow run"], shape, name)
    assert "ConfigError" in texts["task run states"], "the failing task's state was not looked at"
    assert "Encountered exception" in texts["logs"] or "Finished in state Failed" in texts["logs"], texts["logs"]
    for channel, text in {**texts, "console": console.out + console.err}.items():
        _assert_clean(text, shape, channel)


@pytest.mark.usefixtures("warm")
@pytest.mark.parametrize("leaky_env", SHAPES, indirect=True, ids=lambda s: s.name)
def test_a_run_through_the_warm_executor_exits_2_and_keeps_no_password(
        leaky_env: tuple[str, Shape], sandbox_state: SandboxState, capfd: pytest.CaptureFixture[str]) -> None:
    """`runbook run` handing the run to an executor (the path an alert's run takes): exit 2 from the run's
    ConfigError, and neither the CLI, the executor's console nor the server holds the password."""
    api = sandbox_state.prefect_api_url or ""
    name, shape = leaky_env
    register_deployments(api)  # the new environment is a choice in the deployments' forms
    proc = cli("run", "db-slowness", "--env", name, api=api)
    console = capfd.readouterr()
    assert "on the warm executor" in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stdout + proc.stderr
    _assert_config_error(proc.stderr, shape, name)
    match = re.search(r"\(([0-9a-f-]{36})\) on the warm executor", proc.stderr)
    assert match, proc.stderr
    texts = server_texts(api, match.group(1))
    assert "ConfigError" in texts["task run states"]
    for channel, text in {**texts, "cli": proc.stdout + proc.stderr, "executor console": console.out + console.err
                          }.items():
        _assert_clean(text, shape, channel)
