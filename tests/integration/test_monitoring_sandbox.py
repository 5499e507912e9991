"""The sandbox's monitoring services: Prometheus scraping the backend and node_exporter, Alertmanager, osmem."""

from __future__ import annotations

import time

import httpx
import pytest
import yaml

from runbook.sandbox.alertmanager import alertmanager_config
from tasks.metrics import SYSTEM_QUERIES, instant_query, render

pytestmark = pytest.mark.integration


def test_generated_environment_points_at_the_monitoring_stack(sandbox_env) -> None:  # noqa: ANN001
    assert sandbox_env.prometheus_url and sandbox_env.prometheus_url.startswith("http://127.0.0.1:")
    assert sandbox_env.elasticsearch.media_type == "plain-json"  # the explicit opt-in, set by the sandbox only
    assert sandbox_env.elasticsearch.index_pattern == "logstash-pafar-*"
    assert {"api-health", "api-slow", "payment-provider"} <= set(sandbox_env.http_checks)
    assert sandbox_env.http_checks["payment-provider"].url.startswith("https://localhost:")
    assert {"db", "redis", "backend", "prometheus", "elasticsearch"} <= set(sandbox_env.network.targets)


def test_prometheus_scrapes_backend_and_node_exporter(sandbox_env) -> None:  # noqa: ANN001
    deadline = time.monotonic() + 10
    up: dict[str, float] = {}
    while time.monotonic() < deadline:
        up = {s.labels["job"]: s.value for s in instant_query(sandbox_env, "up")}
        if up.get("pafar-backend") == 1 and up.get("node") == 1:
            break
        time.sleep(0.5)
    assert up.get("pafar-backend") == 1 and up.get("node") == 1, up
    memory = instant_query(sandbox_env, render(SYSTEM_QUERIES["memory_percent"]))
    assert len(memory) == 1 and 0 < memory[0].value < 100


def test_alertmanager_runs_with_a_configurable_webhook(sandbox_state) -> None:  # noqa: ANN001
    rec = sandbox_state.services["alertmanager"]
    status = httpx.get(f"http://127.0.0.1:{rec.port}/api/v2/status", timeout=3).json()
    loaded = yaml.safe_load(status["config"]["original"])
    assert loaded["route"]["receiver"] == "runbook"
    hooked = alertmanager_config("http://127.0.0.1:9/alerts")
    assert hooked["receivers"][0]["webhook_configs"][0]["url"] == "http://127.0.0.1:9/alerts"
    assert "webhook_configs" not in alertmanager_config(None)["receivers"][0]
