"""The whole alert path with real peers: the sandbox backend stops, Prometheus fires ServiceDown, Alertmanager
posts to the intake, exactly one run is created and completes with its report; resends create nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from runbook import sandbox
from runbook.sandbox import SERVICES
from tests.intake_harness import Intake, running_intake
from tests.prefect_runs import api_headers

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
    prom, am = sandbox_state.services["prometheus"], sandbox_state.services["alertmanager"]
    with running_intake(sandbox_state, tmp_path, routes=ROUTES) as it:
        am_cfg = yaml.safe_load(Path(am.paths["config"]).read_text())
        original_am = yaml.safe_dump(am_cfg)
        for r in am_cfg["receivers"]:
            r["webhook_configs"] = [{"url": f"{it.url}/alerts", "send_resolved": True, "max_alerts": 0,
                                     "http_config": {"authorization": {"type": "Bearer", "credentials": it.token}}}]
        am_cfg["route"]["repeat_interval"] = "2s"  # resend the firing alert often: each must be a duplicate
        Path(am.paths["config"]).write_text(yaml.safe_dump(am_cfg))
        prom_cfg_path = Path(prom.paths["config"])
        original_prom = prom_cfg_path.read_text()
        rules = tmp_path / "fast-rules.yml"
        rules.write_text(yaml.safe_dump(FAST_RULE))
        prom_cfg = yaml.safe_load(original_prom)
        prom_cfg["rule_files"] = [str(rules)]
        prom_cfg_path.write_text(yaml.safe_dump(prom_cfg))
        for port in (am.port, prom.port):
            httpx.post(f"http://127.0.0.1:{port}/-/reload", timeout=10).raise_for_status()
        try:
            yield it, sandbox_state
        finally:
            Path(am.paths["config"]).write_text(original_am)
            prom_cfg_path.write_text(original_prom)
            for port in (am.port, prom.port):
                httpx.post(f"http://127.0.0.1:{port}/-/reload", timeout=10)
            sandbox.up()  # brings the backend back (and whatever depended on it)


def test_service_down_alert_runs_service_outage_exactly_once(wired) -> None:  # noqa: ANN001
    it, state = wired
    backend = state.services["backend"]
    SERVICES["backend"].stop(backend)  # the incident: the backend process is gone
    deadline = time.monotonic() + 90
    runs: list[dict] = []
    while time.monotonic() < deadline and not runs:
        runs = it.runs("route:e2e-service-down")
        time.sleep(0.5)
    assert runs, "no run was created from Prometheus -> Alertmanager -> intake"
    assert it.wait_state(runs[0]["id"], {"COMPLETED", "FAILED", "CRASHED"}, 120) == "COMPLETED"
    time.sleep(6)  # Alertmanager resends the firing group every repeat_interval (2 s here)
    assert len(it.runs("route:e2e-service-down")) == 1, "a resend created a second run"
    metrics = httpx.get(f"{it.url}/metrics", timeout=5).text
    dedup = [ln for ln in metrics.splitlines() if ln.startswith("runbook_intake_alerts_deduplicated_total")]
    assert dedup and float(dedup[0].split()[-1]) >= 1, "Alertmanager's resends were not seen as duplicates"
    arts = httpx.post(f"{it.api_url}/artifacts/filter", headers=api_headers(), timeout=10,
                      json={"artifacts": {"flow_run_id": {"any_": [runs[0]["id"]]}}}).json()
    assert any("service-outage on `sandbox`" in (a.get("data") or "") for a in arts)
    assert runs[0]["parameters"]["service"] == "backend" and runs[0]["parameters"]["dry_run"] is True
