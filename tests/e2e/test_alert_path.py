"""The whole alert path with real peers: the sandbox backend stops, Prometheus fires ServiceDown, Alertmanager
posts to the intake, exactly one run is created and completes with its report; resends create nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from runbook import sandbox
from runbook.sandbox import SERVICES
from tests.intake_harness import Intake, alerts_through, running_intake
from tests.prefect_runs import run_artifacts

pytestmark = pytest.mark.integration

ROUTES = """
routes:
  - name: e2e-service-down
    match: {alertname: ServiceDown}
    procedure: service-outage
    env: sandbox
    labels:
      service: {label: job, inventory: services, map: {pafar-backend: backend}}
    policy: {mode: dry_run, cooldown_s: 0}
"""

FAST_RULE = {"groups": [{"name": "e2e", "rules": [{
    "alert": "ServiceDown", "expr": 'up{job="pafar-backend"} == 0', "for": "2s",
    "labels": {"severity": "critical"}, "annotations": {"summary": "backend down (e2e)"}}]}]}


@pytest.fixture
def wired(sandbox_state, tmp_path: Path) -> Iterator[tuple[Intake, sandbox.SandboxState]]:  # noqa: ANN001
    """The intake, Alertmanager posting to it with its token, Prometheus evaluating a 2 s ServiceDown."""
    with running_intake(sandbox_state, tmp_path, routes=ROUTES) as it:
        try:
            with alerts_through(sandbox_state, it, FAST_RULE, tmp_path):
                yield it, sandbox_state
        finally:
            # brings the backend back, and restarts what depends on it (Prometheus) on new ports: later tests share
            # this state object, so they must see the new ports (a stale Prometheus port failed the next e2e test)
            sandbox_state.services.update(sandbox.up().services)


def test_service_down_alert_runs_service_outage_exactly_once(wired) -> None:  # noqa: ANN001
    it, state = wired
    since = datetime.now(UTC)

    def this_session() -> list[dict]:  # a reused sandbox keeps the runs of earlier sessions
        return [r for r in it.runs("route:e2e-service-down")
                if datetime.fromisoformat(r["created"].replace("Z", "+00:00")) >= since]

    backend = state.services["backend"]
    SERVICES["backend"].stop(backend)  # the incident: the backend process is gone
    deadline = time.monotonic() + 90
    runs: list[dict] = []
    while time.monotonic() < deadline and not runs:
        runs = this_session()
        time.sleep(0.5)
    assert runs, "no run was created from Prometheus -> Alertmanager -> intake"
    assert it.wait_state(runs[0]["id"], {"COMPLETED", "FAILED", "CRASHED"}, 120) == "COMPLETED"
    time.sleep(6)  # Alertmanager resends the firing group every repeat_interval (2 s here)
    assert len(this_session()) == 1, "a resend created a second run"
    metrics = httpx.get(f"{it.url}/metrics", timeout=5).text
    dedup = [ln for ln in metrics.splitlines() if ln.startswith("runbook_intake_alerts_deduplicated_total")]
    assert dedup and float(dedup[0].split()[-1]) >= 1, "Alertmanager's resends were not seen as duplicates"
    arts = run_artifacts(it.api_url, runs[0]["id"])
    assert any("service-outage on `sandbox`" in (a.get("data") or "") for a in arts)
    assert runs[0]["parameters"]["service"] == "backend" and runs[0]["parameters"]["dry_run"] is True
