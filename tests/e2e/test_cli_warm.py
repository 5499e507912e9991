"""`runbook run` through a warm executor: the run is created on the server, followed, and its report read back;
approval is asked at the CLI and answered on the paused run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prefect.settings import temporary_settings

from runbook.app.executor import Executor
from runbook.app.serve import register_deployments
from runbook.sandbox import SandboxState
from runbook.sandbox.incidents import DbIncident
from tests.integration.derived_env import derive
from tests.prefect_runs import api_headers, api_settings, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def warm(sandbox_state: SandboxState) -> Iterator[tuple[str, Executor]]:
    api = sandbox_state.prefect_api_url
    assert api
    register_deployments(api)
    ex = Executor(poll_s=2)
    with temporary_settings(updates=api_settings(api)):
        ex.start()
    deadline = time.monotonic() + 30
    while not (ex.events_connected.is_set() and ex.polls) and time.monotonic() < deadline:
        time.sleep(0.05)
    yield api, ex
    ex.stop(grace_s=0)
    register_deployments(api)  # the forms as the session's playbooks have them (a test added an environment)


def cli(api: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_API_URL": api}
    return subprocess.run([sys.executable, "-m", "runbook.app.cli", "run", *args], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def _states(api: str, run_id: str) -> list[dict]:
    return httpx.get(f"{api}/flow_run_states/", headers=api_headers(), params={"flow_run_id": run_id},
                     timeout=10).json()


def test_a_pool_that_only_looks_alive_costs_a_few_seconds_not_the_run(sandbox_state: SandboxState) -> None:
    """An executor that died without a goodbye still looks online for a while: the run nobody claims is withdrawn
    (cancelled while still scheduled, so it can never run twice) and runs in the CLI process instead."""
    api = sandbox_state.prefect_api_url
    assert api
    register_deployments(api)
    ghost = {"name": "ghost-executor", "heartbeat_interval_seconds": 30}
    httpx.post(f"{api}/work_pools/runbook/workers/heartbeat", headers=api_headers(), json=ghost,
               timeout=10).raise_for_status()
    try:
        proc = cli(api, "network-checks", "--env", "sandbox", "--output", "json")
    finally:
        httpx.delete(f"{api}/work_pools/runbook/workers/ghost-executor", headers=api_headers(), timeout=10)
    assert "no executor claimed run" in proc.stderr and "running it in this process" in proc.stderr, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["procedure"] == "network-checks"
    withdrawn = re.search(r"claimed run (\S+) within", proc.stderr)
    assert withdrawn
    state = httpx.get(f"{api}/flow_runs/{withdrawn.group(1)}", headers=api_headers(), timeout=10).json()["state"]
    assert state["type"] == "CANCELLED", state


def test_a_dry_run_goes_to_the_warm_executor_and_its_report_comes_back(warm: tuple[str, Executor]) -> None:
    api, ex = warm
    proc = cli(api, "db-slowness", "--env", "sandbox", "--output", "json")
    doc = json.loads(proc.stdout)
    assert doc["procedure"] == "db-slowness" and doc["dry_run"] is True and doc["outcome"], proc.stderr
    assert proc.returncode == {"Completed": 0, "Remediated": 4}.get(doc["outcome"], 3)
    assert "on the warm executor" in proc.stderr and "ok get_activity_snapshot" in proc.stderr, proc.stderr
    run_id = doc["flow_run_id"]
    assert any(s.get("message") == f"claimed by {ex.name}" for s in _states(api, run_id))

    # every step is printed once, the last ones included (from the report: the server records task runs late)
    printed = re.findall(r"^\s*[\d.]+s ok (\S+) \(", proc.stderr, flags=re.M)
    assert sorted(printed) == sorted(st["name"] for st in doc["steps"]), proc.stderr
    assert {"get_pool_status", "plan-cancel-long-queries", "plan-terminate-idle-blockers"} <= set(printed), printed
    tasks: list[dict] = []

    def recorded() -> bool:
        tasks[:] = httpx.post(f"{api}/task_runs/filter", headers=api_headers(), timeout=10,
                              json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
        return len(tasks) >= len(doc["steps"])

    wait_for(recorded, 30, "the server to record the run's task runs")
    assert {t["id"] for t in tasks} == {st["task_run_id"] for st in doc["steps"]}

    # the final state did not wait for the UI's artifacts, and the executor let go of the run only once they were
    # written: no waiting here
    wait_for(lambda: run_id not in ex._mine(), 30, "the executor to let go of the run")
    arts = httpx.post(f"{api}/artifacts/filter", headers=api_headers(), timeout=10,
                      json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
    assert {a["type"] for a in arts} == {"markdown", "table"}, arts
    ended = httpx.get(f"{api}/flow_runs/{run_id}", headers=api_headers(), timeout=10).json()["end_time"]
    assert all(a["created"] >= ended for a in arts), (ended, [a["created"] for a in arts])


def test_bad_parameters_are_refused_before_anything_runs(warm: tuple[str, Executor]) -> None:
    api, _ = warm
    proc = cli(api, "db-slowness", "--env", "sandbox", "--param", "top=-5")
    assert proc.returncode == 2 and "top" in proc.stderr and "minimum" in proc.stderr, proc.stderr
    proc = cli(api, "db-slowness", "--env", "sandbox", "--param", "nope=1")
    assert proc.returncode == 2 and "--param nope: no such parameter" in proc.stderr, proc.stderr
    proc = cli(api, "no-such-procedure", "--env", "sandbox")
    assert proc.returncode == 2 and "unknown procedure 'no-such-procedure'" in proc.stderr, proc.stderr


def test_approval_is_asked_here_and_answered_on_the_paused_run(
        warm: tuple[str, Executor], sandbox_state: SandboxState, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, app_dsn: str) -> None:
    api, _ = warm
    # db-slowness needs approval in this environment (the executor runs in this process: it reads the same env)
    name = derive(sandbox_state, tmp_path, monkeypatch, "approvewarm", {"approvals": {"db-slowness": "required"}})
    monkeypatch.setenv("RUNBOOK_PLAYBOOKS", os.pathsep.join([sandbox_state.engine_env()["RUNBOOK_PLAYBOOKS"],
                                                             str(tmp_path)]))
    register_deployments(api)  # a new environment is a new choice in the deployments' forms
    refused = cli(api, "db-slowness", "--env", name, "--apply")  # no terminal, no --yes: refused before a run
    assert refused.returncode == 2 and "needs approval" in refused.stderr, refused.stderr
    inc = DbIncident(app_dsn, slow_runs=0, runaway=False).start()
    try:
        time.sleep(1.3)
        proc = cli(api, "db-slowness", "--env", name, "--apply", "--yes", "--output", "json",
                   "--param", "idle_in_transaction_s=1", "--param", "long_query_s=1")
    finally:
        inc.stop()
    doc = json.loads(proc.stdout)
    assert "plan (nothing has been changed yet)" in proc.stderr, proc.stderr  # the plan was shown here
    audit = "\n".join(doc["notes"] + doc["audit"])
    assert re.search(r"approved by \S+@\S+", audit), audit
    assert doc["outcome"] == "Remediated" and proc.returncode == 4, (doc["outcome"], proc.stderr[-2000:])
    paused = [s for s in _states(api, doc["flow_run_id"]) if s["type"] == "PAUSED"]
    assert paused, "the run waited on the server"
