"""Scale-out: two `runbook worker` processes against one Prefect server on PostgreSQL share the runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from runbook.app.remote_run import api_client, deployment

pytestmark = pytest.mark.integration


def _wait_until_serving(log: Path, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "serving work pool" in log.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"worker exited early:\n{log.read_text(errors='replace')[-2000:]}"
        time.sleep(0.2)
    raise AssertionError(f"worker never started serving:\n{log.read_text(errors='replace')[-2000:]}")


def test_two_workers_share_runs_and_each_run_executes_once(sandbox_state, tmp_path) -> None:  # noqa: ANN001
    from runbook.app.serve import register_deployments

    api = sandbox_state.prefect_api_url
    assert "postgresql" in sandbox_state.services["prefect"].paths["database"], "scale-out runs on PostgreSQL"
    register_deployments(api)
    env = {**os.environ, "PREFECT_API_URL": api}
    workers = [
        subprocess.Popen([sys.executable, "-m", "runbook.app.cli", "worker", "--poll", "0.5", "--max-runs", "1"],
                         env=env, stdout=open(tmp_path / f"w{i}.log", "w"), stderr=subprocess.STDOUT)
        for i in range(2)
    ]
    try:
        # Both must be serving before the runs exist: a worker still importing would leave them all to the other.
        for i in range(2):
            _wait_until_serving(tmp_path / f"w{i}.log", workers[i])
        with api_client(api, timeout_s=10) as http:
            dep = deployment(http, "db-slowness")
            runs = [http.post(f"/deployments/{dep['id']}/create_flow_run",
                              json={"parameters": {"env": "sandbox", "dry_run": True}, "tags": ["scale-out-test"]}
                              ).json()["id"] for _ in range(6)]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                states = [http.get(f"/flow_runs/{r}").json()["state"]["type"] for r in runs]
                if all(s in {"COMPLETED", "FAILED", "CRASHED"} for s in states):
                    break
                time.sleep(0.5)
            assert states == ["COMPLETED"] * 6, states
            claims: Counter[str] = Counter()
            for r in runs:
                history = http.get("/flow_run_states/", params={"flow_run_id": r}).json()
                pending = [s for s in history if s["type"] == "PENDING"]
                assert len(pending) == 1, f"run {r} was claimed {len(pending)} times"
                claims[pending[0]["message"]] += 1
    finally:
        for w in workers:
            w.send_signal(signal.SIGINT)
        for w in workers:
            try:
                w.wait(timeout=15)
            except subprocess.TimeoutExpired:
                w.kill()
    assert len(claims) == 2, f"one worker ran everything: {claims}"
    assert sum(claims.values()) == 6
