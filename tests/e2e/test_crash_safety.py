"""No stranded runs (issue 11): an executor killed mid-run, or stopped with SIGTERM, leaves no run RUNNING forever.

Real `runbook worker` processes against the sandbox's Prefect server; a slow dry run (memory-leak sampling the
sandbox's containers once a second) is what they are running when they die.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prefect.settings import temporary_settings

from runbook.app.executor import Executor
from runbook.app.reconcile import OCCURRENCE_TAG, claim_message
from runbook.app.remote_run import TERMINAL, api_client
from runbook.app.serve import register_deployments
from runbook.sandbox import SandboxState
from tests.prefect_runs import api_settings, create_run, run_history, run_state, wait_for

pytestmark = pytest.mark.integration

SLOW = {"env": "sandbox", "dry_run": True, "samples": 30, "interval_s": 1.0}  # 30 s: long enough to die in




def _worker(api: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "runbook.app.cli", "worker", "--poll", "1", *extra],
                            env={**os.environ, "PREFECT_API_URL": api}, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


@contextmanager
def _executor(api: str) -> Iterator[Executor]:
    ex = Executor(poll_s=1.0)
    with temporary_settings(updates=api_settings(api)):
        ex.start()
    try:
        yield ex
    finally:
        ex.stop(grace_s=0)








def _claimed_by(http: httpx.Client, run_id: str) -> list[str]:
    return [str(s["message"]) for s in run_history(http, run_id) if s["type"] == "PENDING"]


def test_runs_of_a_killed_executor_are_finished_and_an_alert_run_retried_once(
        sandbox_state: SandboxState, tmp_path: Path) -> None:
    api = sandbox_state.prefect_api_url
    assert api
    register_deployments(api)
    worker = _worker(api, tmp_path / "killed.log", "--max-runs", "4")
    with api_client(api, timeout_s=10) as http:
        try:
            alert_run = create_run(http, "memory-leak", SLOW, ["alert:MemoryLeak", f"{OCCURRENCE_TAG}crash-test"])
            cli_run = create_run(http, "memory-leak", SLOW, ["cli"])
            wait_for(lambda: all(run_state(http, r)["type"] == "RUNNING" for r in (alert_run, cli_run)), 90,
                  "both runs RUNNING on the worker")
            owner = _claimed_by(http, alert_run)[-1].removeprefix("claimed by ")
            assert owner.endswith(f"-{worker.pid}"), owner
        finally:
            os.killpg(worker.pid, signal.SIGKILL)  # no drain, no goodbye: a crash
            worker.wait(timeout=30)
        time.sleep(2)
        assert run_state(http, cli_run)["type"] == "RUNNING", "nothing finished it yet: it is a zombie"

        with _executor(api) as successor:  # a restart on the same host: the dead process is recognised at once
            wait_for(lambda: run_state(http, cli_run)["type"] in TERMINAL, 60, "the zombie CLI run to be finished")
            # the reconciler marks the alert run Crashed, then AwaitingRetry: final only once it ran again
            wait_for(lambda: _ended_after_retry(http, alert_run), 120, "the retried alert run to finish")

        cli_final = run_state(http, cli_run)
        assert cli_final["type"] == "CRASHED", cli_final
        assert owner in cli_final["message"] and "nothing was applied" in cli_final["message"], cli_final
        assert [s["type"] for s in run_history(http, cli_run)][-1] == "CRASHED", "a CLI run is not retried"

        history = run_history(http, alert_run)
        kinds = [s["name"] for s in history]
        assert kinds.count("Crashed") == 1 and "AwaitingRetry" in kinds, kinds
        assert kinds.index("Crashed") < kinds.index("AwaitingRetry"), kinds
        assert history[-1]["type"] == "COMPLETED", kinds
        assert _claimed_by(http, alert_run)[-1] == claim_message(successor.name), "the retry ran on the successor"
        assert {v.run_id for v in successor.recovered} == {alert_run, cli_run}
        assert [v.retried for v in sorted(successor.recovered, key=lambda v: v.run_id != alert_run)] == [True, False]


def _ended_after_retry(http: httpx.Client, run_id: str) -> bool:
    """The run was rescheduled for a retry and is final again (a poll between the reconciler's Crashed and its
    AwaitingRetry sees a final state that is not the end)."""
    names = [s["name"] for s in run_history(http, run_id)]
    return "AwaitingRetry" in names and run_state(http, run_id)["type"] in TERMINAL


def test_sigterm_lets_a_short_run_finish_and_hands_a_long_one_back(
        sandbox_state: SandboxState, tmp_path: Path) -> None:
    api = sandbox_state.prefect_api_url
    assert api
    register_deployments(api)
    with api_client(api, timeout_s=10) as http:
        # within the grace period: the run finishes where it started and nothing is handed back
        worker = _worker(api, tmp_path / "drain-short.log", "--grace", "60")
        short = create_run(http, "memory-leak", {**SLOW, "samples": 4}, ["cli"])
        wait_for(lambda: run_state(http, short)["type"] == "RUNNING", 90, "the short run RUNNING")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=90) == 0
        assert run_state(http, short)["type"] == "COMPLETED", run_state(http, short)
        assert len(_claimed_by(http, short)) == 1

        # beyond the grace period: handed back, then run again by the next executor
        worker = _worker(api, tmp_path / "drain-long.log", "--grace", "1")
        long = create_run(http, "memory-leak", SLOW, ["cli"])
        wait_for(lambda: run_state(http, long)["type"] == "RUNNING", 90, "the long run RUNNING")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
        handed = run_state(http, long)
        assert handed["name"] == "AwaitingRetry" and "handed back" in handed["message"], handed
        assert "handed back to the pool" in (tmp_path / "drain-long.log").read_text()
        with _executor(api) as successor:
            wait_for(lambda: run_state(http, long)["type"] in TERMINAL, 120, "the handed-back run to finish")
        assert run_state(http, long)["type"] == "COMPLETED", run_state(http, long)
        assert _claimed_by(http, long)[-1] == claim_message(successor.name)
