"""The whole path of a bad deployment, with real peers: a "v2" of the backend whose health check fails replaces its
container; Prometheus (scraping the container) fires ServiceDown; Alertmanager posts to the intake; service-outage
runs under the route's ``approve`` policy and waits with the rollback to the recorded image in its plan; after the
approval the backend runs the last known good image again, answers, and the alert resolves."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest

from flows.service_outage import service_outage
from runbook.sandbox import SandboxState
from runbook.sandbox.incidents import BAD_IMAGE, IMAGE
from tasks.container_remediations import answers_2xx, service_health_url
from tasks.containers import list_project_containers
from tasks.last_known_good import load_last_known_good, short_id
from tests.intake_harness import alerts_through, running_intake
from tests.prefect_runs import api_headers, approve_seen_plan, wait_for
from tests.scenarios import bad_deploy

pytestmark = pytest.mark.integration

JOB = "pafar-backend-container"
# A label of this run's own on the rule, matched by the route: Alertmanager keeps an alert of the same labels from an
# earlier session (with its old startsAt, so the intake would see that old occurrence again) until it times out.
ATTEMPT = secrets.token_hex(4)
ROUTES = f"""
routes:
  - name: e2e-rollback
    match: {{alertname: ServiceDown, job: {JOB}, attempt: "{ATTEMPT}"}}
    procedure: service-outage
    env: sandbox
    params: {{notify: false}}
    labels:
      service: {{label: job, inventory: services, map: {{{JOB}: backend}}}}
    policy: {{mode: approve, cooldown_s: 0, approval_timeout_s: 300}}
"""
FAST_RULE = {"groups": [{"name": "e2e-rollback", "rules": [{
    "alert": "ServiceDown", "expr": f'up{{job="{JOB}"}} == 0', "for": "2s",
    "labels": {"severity": "critical", "attempt": ATTEMPT},
    "annotations": {"summary": "backend container down (e2e)"}}]}]}


def _up(state: SandboxState) -> list[float]:
    prom = state.services["prometheus"]
    data = httpx.get(f"http://127.0.0.1:{prom.port}/api/v1/query", params={"query": f'up{{job="{JOB}"}}'},
                     timeout=5).json()["data"]["result"]
    return [float(r["value"][1]) for r in data]


def test_service_down_from_a_bad_deploy_is_rolled_back_after_approval(
    sandbox_state: SandboxState, sandbox_env: Any, tmp_path: Path,
) -> None:
    podman = sandbox_state.services["podman"]  # its port is the backend container's published port
    job = {"job_name": JOB, "metrics_path": "/metrics",
           "static_configs": [{"targets": [f"127.0.0.1:{podman.port}"]}]}
    with running_intake(sandbox_state, tmp_path, routes=ROUTES) as it, \
            alerts_through(sandbox_state, it, FAST_RULE, tmp_path, scrape_jobs=[job]):
        wait_for(lambda: _up(sandbox_state) == [1.0], 30, "Prometheus to scrape the healthy backend container")
        earlier = {r["id"] for r in it.runs("route:e2e-rollback")}
        with bad_deploy(sandbox_env) as bad:
            record = load_last_known_good("sandbox", "backend")
            assert record is not None and record.image == IMAGE
            runs: list[dict[str, Any]] = []

            def created() -> bool:  # the sandbox's Prefect server outlives a session: only this test's run counts
                runs[:] = [r for r in it.runs("route:e2e-rollback") if r["id"] not in earlier]
                return bool(runs)

            wait_for(created, 90, "a run from Prometheus -> Alertmanager -> intake")
            assert it.wait_state(runs[0]["id"], {"PAUSED"}, 120) == "PAUSED"
            approve_seen_plan(it.api_url, runs[0]["id"],
                              f"rollback-service: roll back container pafar-backend-1 from {BAD_IMAGE} "
                              f"({short_id(bad.bad_image_id)}) to {IMAGE} ({short_id(record.image_id)})",
                              "roll back v2 (e2e)")
            assert it.wait_state(runs[0]["id"], {"COMPLETED", "FAILED", "CRASHED"}, 180) == "COMPLETED"
            state = httpx.get(f"{it.api_url}/flow_runs/{runs[0]['id']}", headers=api_headers(),
                              timeout=10).json()["state"]
            assert state["name"] == "Remediated", state
            [backend] = [c for c in list_project_containers.fn(sandbox_env) if c.name == "pafar-backend-1"]
            assert backend.running and backend.image_id == record.image_id
            health = service_health_url(sandbox_env, "backend")
            assert health and answers_2xx(health)
            wait_for(lambda: _up(sandbox_state) == [1.0], 30, "Prometheus to see the backend container up again")
            assert len([r for r in it.runs("route:e2e-rollback") if r["id"] not in earlier]) == 1, \
                "a resend or the resolve created a second run"

            again = service_outage(env="sandbox", dry_run=False, notify=False)
            assert not any(a["changed"] or a["planned"] for a in again["actions"]), again["actions"]
