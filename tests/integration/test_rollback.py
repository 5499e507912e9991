"""service-outage and rollback-service against the sandbox's real Podman API and Prefect server (issue 13).

The backend's healthy replica is recorded as last known good; a "v2" built locally from the sandbox image (its
/health gone) is deployed over it; service-outage then plans the rollback to exactly the recorded image, under an
alert route's ``approve`` policy waits for a person, and after the approval the backend runs the old image and
answers again. A second apply changes nothing, a dry run touches nothing, and without a record nothing is planned.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flows.service_outage import service_outage
from runbook.sandbox import SandboxState
from runbook.sandbox.incidents import BAD_IMAGE, IMAGE, BadDeploy
from tasks.container_remediations import answers_2xx, service_health_url
from tasks.containers import list_project_containers
from tasks.last_known_good import forget_last_known_good, load_last_known_good, save_last_known_good, short_id
from tests.intake_harness import alert, routes_yaml, running_intake
from tests.integration.derived_env import derive
from tests.prefect_runs import api_headers, approve_seen_plan
from tests.scenarios import bad_deploy, project_containers

pytestmark = pytest.mark.integration

ROUTE = {"name": "rollback-approve", "match": {"alertname": "ServiceDownRollbackTest"},
         "procedure": "service-outage", "env": "sandbox",
         "labels": {"service": {"label": "job", "inventory": "services", "map": {"pafar-backend": "backend"}}},
         "params": {"notify": False}, "policy": {"mode": "approve", "cooldown_s": 0, "approval_timeout_s": 300}}


def _actions(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in doc["actions"]}


def _backend(env: Any) -> Any:
    [mine] = [c for c in list_project_containers.fn(env) if c.name == "pafar-backend-1"]
    return mine


@pytest.fixture
def no_record(sandbox_state: SandboxState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An environment like the sandbox whose backend has no last known good recorded."""
    name = derive(sandbox_state, tmp_path, monkeypatch, "nolkg", {})
    forget_last_known_good(name, "backend")
    yield name
    forget_last_known_good(name, "backend")


def test_healthy_service_is_recorded_and_unhealthy_never_is(no_record: str, sandbox_env: Any) -> None:
    healthy = service_outage(env=no_record, dry_run=True, notify=False, lkg_min_uptime_s=0)
    assert any(n.startswith(f"last known good of backend recorded: {IMAGE}") for n in healthy["notes"]), healthy
    record = load_last_known_good(no_record, "backend")
    assert record is not None and record.image == IMAGE and [r.name for r in record.replicas] == ["pafar-backend-1"]
    spec = record.replicas[0]
    assert spec.command and "httpd" in spec.command[-1] and spec.ports["8000/tcp"][0]["HostIp"] == "127.0.0.1"
    assert "PAFAR_SERVICE=backend" in spec.env and spec.network == "pafar_default" and spec.limits["mem_limit"]
    assert not any(e.startswith("HOSTNAME=") for e in spec.env)

    assert sandbox_env.docker is not None
    bad = BadDeploy(sandbox_env.docker.base_url).start()
    try:
        doc = service_outage(env=no_record, dry_run=True, notify=False, lkg_min_uptime_s=0)
        assert any(n.startswith("last known good of backend not recorded: its health endpoint fails")
                   for n in doc["notes"]), doc["notes"]
        after = load_last_known_good(no_record, "backend")
        assert after is not None and after.image_id == record.image_id and after.recorded_at == record.recorded_at
    finally:
        bad.stop()


def test_without_a_last_known_good_nothing_is_planned(no_record: str, sandbox_env: Any) -> None:
    assert sandbox_env.docker is not None
    url = sandbox_env.docker.base_url
    bad = BadDeploy(url).start()
    try:
        snapshot = project_containers(url)
        before = snapshot()
        doc = service_outage(env=no_record, dry_run=False, notify=False, lkg_min_uptime_s=0)
        assert snapshot() == before, "something changed without a last known good"
        assert "rollback-service" not in _actions(doc)
        assert not any(a["planned"] for a in doc["actions"])
        [finding] = [f for f in doc["findings"] if f["title"].startswith("backend: no last known good recorded")]
        assert BAD_IMAGE in finding["title"] and finding["severity"] == "warning"
        assert load_last_known_good(no_record, "backend") is None, "the broken v2 was recorded"
    finally:
        bad.stop()


def test_dry_run_plans_the_rollback_and_touches_nothing_then_apply_then_nothing(sandbox_env: Any) -> None:
    assert sandbox_env.docker is not None
    url = sandbox_env.docker.base_url
    with bad_deploy(sandbox_env) as bad:
        record = load_last_known_good("sandbox", "backend")
        assert record is not None
        snapshot = project_containers(url)
        before = snapshot()
        dry = service_outage(env="sandbox", dry_run=True, notify=False)
        assert snapshot() == before, "the dry run changed a container"
        rollback = _actions(dry)["rollback-service"]
        assert [c["subject"] for c in rollback["planned"]] == [
            f"container pafar-backend-1 from {BAD_IMAGE} ({short_id(bad.bad_image_id)}) "
            f"to {IMAGE} ({short_id(record.image_id)})"]
        assert not rollback["changed"] and not _actions(dry)["start-service-containers"]["planned"]
        assert any("last known good: " + IMAGE in f["title"] for f in dry["findings"])

        real = service_outage(env="sandbox", dry_run=False, notify=False)
        rollback = _actions(real)["rollback-service"]
        assert rollback["changed"] and rollback["verified"] and not rollback["error"], rollback
        assert real["outcome"] == "Remediated", real["audit"]
        now = _backend(sandbox_env)
        assert now.running and now.image_id == record.image_id and now.image == IMAGE
        url_ = service_health_url(sandbox_env, "backend")
        assert url_ and answers_2xx(url_)
        assert not [c for c in list_project_containers.fn(sandbox_env) if c.name.endswith("-before-rollback")]

        again = service_outage(env="sandbox", dry_run=False, notify=False)
        assert not any(a["changed"] or a["planned"] for a in again["actions"]), again["actions"]
        assert not [f for f in again["findings"] if f["severity"] == "critical" and f["subject"] == "service backend"]


def test_alert_under_approve_waits_then_rolls_back_to_the_recorded_image(
    sandbox_state: SandboxState, sandbox_env: Any, tmp_path: Path,
) -> None:
    assert sandbox_env.docker is not None
    url = sandbox_env.docker.base_url
    with running_intake(sandbox_state, tmp_path, routes=routes_yaml(ROUTE)) as it, bad_deploy(sandbox_env) as bad:
        record = load_last_known_good("sandbox", "backend")
        assert record is not None
        snapshot = project_containers(url)
        before = snapshot()
        fp = os.urandom(8).hex()
        result = it.post(alert("ServiceDownRollbackTest", {"job": "pafar-backend"}, fingerprint=fp)).json()
        assert result["results"][0]["outcome"] == "run", result
        [run] = it.wait_runs("rollback-approve", fp)
        assert it.wait_state(run["id"], {"PAUSED"}, 120) == "PAUSED"
        assert snapshot() == before, "something changed before the approval"
        approve_seen_plan(it.api_url, run["id"],
                          f"rollback-service: roll back container pafar-backend-1 from {BAD_IMAGE} "
                          f"({short_id(bad.bad_image_id)}) to {IMAGE} ({short_id(record.image_id)})", "roll back v2")
        assert it.wait_state(run["id"], {"COMPLETED", "FAILED", "CRASHED"}, 180) == "COMPLETED"
        state = httpx.get(f"{it.api_url}/flow_runs/{run['id']}", headers=api_headers(), timeout=10).json()["state"]
        assert state["name"] == "Remediated", state
        now = _backend(sandbox_env)
        assert now.running and now.image_id == record.image_id
        health = service_health_url(sandbox_env, "backend")
        assert health and answers_2xx(health)

        again = service_outage(env="sandbox", dry_run=False, notify=False)
        assert not any(a["changed"] or a["planned"] for a in again["actions"]), again["actions"]


def test_a_last_known_good_image_gone_from_the_host_is_said_and_not_planned(no_record: str, sandbox_env: Any) -> None:
    assert sandbox_env.docker is not None
    url = sandbox_env.docker.base_url
    service_outage(env=no_record, dry_run=True, notify=False, lkg_min_uptime_s=0)  # records the healthy backend
    record = load_last_known_good(no_record, "backend")
    assert record is not None
    save_last_known_good(record.model_copy(update={"image_id": "sha256:" + "0" * 64}))  # as if pruned since
    bad = BadDeploy(url).start()
    try:
        snapshot = project_containers(url)
        before = snapshot()
        doc = service_outage(env=no_record, dry_run=False, notify=False)
        assert snapshot() == before
        assert "rollback-service" not in _actions(doc)
        assert any("is no longer on the host" in f["title"] for f in doc["findings"]), doc["findings"]
    finally:
        bad.stop()
