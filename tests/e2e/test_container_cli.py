"""The container and host procedures through the operator's CLI: listed with their parameters, JSON output,
exit codes (0 healthy, 2 a replica count above the playbook's max)."""

from __future__ import annotations

import json

import pytest

from tests.e2e.test_cli import cli, invoke


def test_list_shows_the_container_procedures_with_parameters() -> None:
    code, text = invoke("list")
    assert code == 0
    for name, param in (("high-cpu", "replicas"), ("memory-leak", "since"), ("service-outage", "notify")):
        assert name in text and param in text, (name, param)


@pytest.mark.integration
def test_service_outage_json_on_a_healthy_sandbox_exits_0(sandbox_state) -> None:  # noqa: ANN001
    proc = cli("run", "service-outage", "--env", "sandbox", "--output", "json", "--param", "deploy_hours=1",
               extra_env={"PREFECT_API_URL": sandbox_state.prefect_api_url})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["procedure"] == "service-outage" and doc["dry_run"] is True
    [action] = doc["actions"]
    assert action["name"] == "start-service-containers" and action["planned"] == [] and not action["changed"]
    assert any(f["title"] == "backend: all 1 container(s) running" for f in doc["findings"])


@pytest.mark.integration
def test_replicas_above_the_playbook_max_exit_2(sandbox_state) -> None:  # noqa: ANN001
    proc = cli("run", "high-cpu", "--env", "sandbox", "--param", "service=backend", "--param", "replicas=9",
               extra_env={"PREFECT_API_URL": sandbox_state.prefect_api_url})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "replicas=9: must be between 1 and services.backend.max_replicas (3)" in " ".join(proc.stderr.split())
