"""`runbook serve`: one command brings up Prefect (SQLite), deployments, executor and intake; Ctrl-C stops it all."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from runbook.engine.config import PROJECT_ROOT
from runbook.sandbox.net import free_ports, port_accepts
from tests.intake_harness import alert

pytestmark = pytest.mark.integration

ROUTE = """
routes:
  - name: serve-test
    match: {alertname: ServeTest}
    procedure: db-slowness
    env: sandbox
    policy: {mode: dry_run, cooldown_s: 0}
"""


def test_serve_runs_an_alert_end_to_end_and_ctrl_c_stops_everything(sandbox_state, tmp_path: Path) -> None:  # noqa: ANN001
    (tmp_path / "routes").mkdir()
    (tmp_path / "routes" / "routes.yaml").write_text(ROUTE)
    intake_port, prefect_port = free_ports(2)
    token = secrets.token_urlsafe(24)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(RUNBOOK_INTAKE_TOKEN=token, RUNBOOK_PLAYBOOKS=os.pathsep.join(
        [str(PROJECT_ROOT / "playbooks"), str(sandbox_state.playbook_dir), str(tmp_path / "routes")]))
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "runbook.app.cli", "serve", "--port", str(intake_port), "--prefect-port",
         str(prefect_port), "--state", str(tmp_path / "state")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{prefect_port}/api"
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{intake_port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("serve did not come up: " + (tmp_path / "serve.log").read_text()[-3000:])
        resp = httpx.post(f"http://127.0.0.1:{intake_port}/alerts", json=alert("ServeTest"), timeout=30,
                          headers={"Authorization": f"Bearer {token}"})
        assert resp.json()["results"][0]["outcome"] == "run", resp.text
        deadline = time.monotonic() + 120
        state = ""
        while time.monotonic() < deadline:
            runs = httpx.post(f"{api}/flow_runs/filter", timeout=10,
                              json={"flow_runs": {"tags": {"all_": ["route:serve-test"]}}}).json()
            state = runs[0]["state"]["type"] if runs else ""
            if state in {"COMPLETED", "FAILED", "CRASHED"}:
                break
            time.sleep(0.5)
        assert state == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
    time.sleep(1)
    assert not port_accepts(intake_port) and not port_accepts(prefect_port), "serve left something listening"
