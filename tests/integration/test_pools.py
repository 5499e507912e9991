"""The backend's connection pool (services.backend.pool_status_command, run through the Docker exec API) beside the
server-side connection counts, in service-outage and db-slowness, against the sandbox's real Podman and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from flows.db_slowness import db_slowness
from flows.service_outage import service_outage
from runbook.engine.clients import docker_api_version
from runbook.sandbox import SandboxState
from tests.integration.derived_env import derive

pytestmark = pytest.mark.integration


def _pools(doc: dict[str, Any]) -> dict[str, Any]:
    [finding] = [f for f in doc["findings"] if f["subject"] == "connection pools"]
    return finding


@pytest.fixture
def backend(sandbox_env: Any) -> Iterator[Any]:
    url = sandbox_env.docker.base_url
    client = docker.DockerClient(base_url=url, version=docker_api_version(url, 30), timeout=30)
    container = client.containers.get("pafar-backend-1")
    try:
        yield container
    finally:
        container.exec_run(["rm", "-f", "/tmp/pool-checked-out"])
        client.close()


def test_service_outage_reports_the_pool_beside_the_server_counts(backend: Any) -> None:
    doc = service_outage(env="sandbox", dry_run=True, notify=False)
    pools = _pools(doc)
    assert pools["severity"] == "info", pools
    assert pools["title"].startswith("connection pools: pafar-backend-1 1 of 5 checked out | server: ")
    app, server = pools["blocks"]
    assert app["rows"] == [["backend", "pafar-backend-1", 5, 1, 4, 0, "ok"]]
    assert [r[0] for r in server["rows"]] == ["pafar"] and server["rows"][0][2] >= 1


def test_db_slowness_shows_a_saturated_pool(backend: Any) -> None:
    assert backend.exec_run(["sh", "-c", "echo 7 > /tmp/pool-checked-out"]).exit_code == 0  # test setup, not engine
    doc = db_slowness(env="sandbox", dry_run=True, top=3)
    pools = _pools(doc)
    assert pools["severity"] == "warning" and pools["details"]["saturated"] == "pafar-backend-1", pools
    assert pools["blocks"][0]["rows"] == [["backend", "pafar-backend-1", 5, 7, 0, 2, "saturated"]]
    connections = next(f for f in doc["findings"] if f["subject"] == "database pafar")
    assert "connections to pafar" in pools["title"] and "connections to pafar" in connections["title"]


def test_a_command_that_hangs_or_fails_is_a_row_not_a_stuck_run(
    sandbox_state: SandboxState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: Any,
) -> None:
    base = {"min_replicas": 1, "max_replicas": 3, "writer": True}
    hangs = derive(sandbox_state, tmp_path, monkeypatch, "poolhang", {"services": {"backend": {
        **base, "pool_status_command": ["sleep", "30"], "pool_status_timeout_s": 1}}})
    pools = _pools(service_outage(env=hangs, dry_run=True, notify=False))
    assert pools["severity"] == "warning"
    assert pools["details"]["unreadable"] == "pafar-backend-1: no status: no answer within 1 s", pools

    fails = derive(sandbox_state, tmp_path, monkeypatch, "poolfail", {"services": {"backend": {
        **base, "pool_status_command": ["cat", "/nonexistent; rm -rf /"]}}})
    pools = _pools(service_outage(env=fails, dry_run=True, notify=False))
    assert pools["blocks"][0]["rows"][0][-1] == "pool_status_command exited 1", pools
    assert backend.exec_run(["ls", "/bin/sh"]).exit_code == 0, "the argument reached a shell"
