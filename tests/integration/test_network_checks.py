"""network-checks against the sandbox's real services: a closed port, an unresolvable name and a slow endpoint are each
found with the right source and destination; TLS days left come from the loopback payment-provider stand-in."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from flows.network_checks import NOTHING_TO_REMEDIATE, network_checks
from runbook.engine.config import HttpCheckConfig
from runbook.sandbox import SandboxState
from runbook.sandbox.backend import CERT_DAYS
from tasks.http_checks import check_http
from tasks.network import tcp_connect
from tasks.probes import resolve
from tests.integration.derived_env import derive
from tests.require import require_service

pytestmark = pytest.mark.integration


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def by(doc: dict, **match: str) -> list[dict]:
    return [f for f in doc["findings"] if all(f["details"].get(k) == v for k, v in match.items())]


@pytest.fixture(scope="module")
def broken_doc(sandbox_state: SandboxState, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run of the flow on the sandbox plus a closed port, a .invalid name and a 40-day TLS warning."""
    mp = pytest.MonkeyPatch()
    port = closed_port()
    name = derive(sandbox_state, tmp_path_factory.mktemp("net"), mp, "netbroken", {
        "network": {"targets": {
            **_targets(sandbox_state),
            "closed": {"host": "127.0.0.1", "port": port, "timeout_s": 2, "from_services": []},
            "nowhere": {"host": "db.pafar.invalid", "port": 5432, "timeout_s": 2, "from_services": []},
        }, "dns_names": ["localhost", "db.pafar.invalid"]},
        "thresholds": {"cert_days_warning": CERT_DAYS + 10},
    })
    try:
        started = time.monotonic()
        doc = network_checks(env=name)
        doc["_elapsed"] = time.monotonic() - started
        doc["_closed_port"] = port
        return doc
    finally:
        mp.undo()


def _targets(state: SandboxState) -> dict:
    import yaml

    env = yaml.safe_load(state.playbook_path.read_text())["environments"]["sandbox"]
    return dict(env["network"]["targets"])


def test_closed_port_is_critical_with_source_and_destination(broken_doc: dict) -> None:
    port = broken_doc["_closed_port"]
    found = by(broken_doc, source="host", destination=f"closed 127.0.0.1:{port}")
    assert len(found) == 1, [f["title"] for f in broken_doc["findings"]]
    assert found[0]["severity"] == "critical"
    assert found[0]["details"]["result"] == "refused"
    assert "refused" in found[0]["details"]["error"]


def test_invalid_name_is_unresolvable_for_tcp_and_dns(broken_doc: dict) -> None:
    tcp = by(broken_doc, source="host", destination="nowhere db.pafar.invalid:5432")
    assert [f["details"]["result"] for f in tcp] == ["unresolvable"]
    assert "db.pafar.invalid" in tcp[0]["details"]["error"]
    dns = by(broken_doc, source="host", destination="db.pafar.invalid")
    assert [(f["severity"], f["details"]["result"]) for f in dns] == [("critical", "NXDOMAIN")]


def test_slow_endpoint_is_named_with_source_and_destination(broken_doc: dict, sandbox_env) -> None:  # noqa: ANN001
    url = sandbox_env.http_checks["api-slow"].url
    slow = [f for f in by(broken_doc, source="host", destination=f"api-slow {url}") if "slow endpoint" in f["title"]]
    assert len(slow) == 1 and slow[0]["severity"] == "warning"
    assert slow[0]["details"]["total_ms"] > 500 and slow[0]["details"]["ttfb_ms"] > 500
    fast = [f for f in broken_doc["findings"] if "slow endpoint" in f["title"] and "api-health" in f["title"]]
    assert fast == []


def test_tls_days_left_and_healthy_targets(broken_doc: dict, sandbox_env) -> None:  # noqa: ANN001
    tls = [f for f in broken_doc["findings"] if f["title"].startswith("TLS certificate of payment-provider")]
    assert len(tls) == 1 and tls[0]["severity"] == "warning"
    assert CERT_DAYS - 1 <= tls[0]["details"]["cert_days_left"] <= CERT_DAYS
    matrix = next(f for f in broken_doc["findings"] if f["subject"] == "network matrix")
    rows = {(r[0], r[1]): r for r in matrix["blocks"][0]["rows"]}
    for name in ("db", "redis", "backend", "prometheus", "elasticsearch"):
        target = sandbox_env.network.targets[name]
        assert rows[("host", f"{name} 127.0.0.1:{target.port}")][3] == "connected"
    assert NOTHING_TO_REMEDIATE in broken_doc["notes"]
    assert broken_doc["actions"] == [] and broken_doc["dry_run"] is True
    assert broken_doc["_elapsed"] < 60


def test_from_inside_a_container(sandbox_env, sandbox_state, tmp_path: Path,  # noqa: ANN001
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    require_service(sandbox_state, "podman", "the checks run inside a container of Podman's Docker API")
    name = derive(sandbox_state, tmp_path, monkeypatch, "netcontainer", {"network": {"targets": {
        "backend-http": {"host": "127.0.0.1", "port": 8000, "timeout_s": 2, "from_host": False,
                         "from_services": ["backend"]},
        "backend-closed": {"host": "127.0.0.1", "port": 8001, "timeout_s": 2, "from_host": False,
                           "from_services": ["backend"]},
    }}}, drop=("http_checks",))
    doc = network_checks(env=name)
    matrix = next(f for f in doc["findings"] if f["subject"] == "network matrix")
    rows = {r[1]: r for r in matrix["blocks"][0]["rows"] if r[0].startswith("container ")}
    assert rows["backend-http 127.0.0.1:8000"][3].startswith("connected")
    assert rows["backend-http 127.0.0.1:8000"][0].endswith("(backend)")
    closed = by(doc, destination="backend-closed 127.0.0.1:8001")
    assert len(closed) == 1 and closed[0]["details"]["result"] == "refused"
    assert closed[0]["details"]["source"].startswith("container ") and "(backend)" in closed[0]["details"]["source"]


def test_without_docker_the_container_part_says_it_was_skipped(sandbox_state, tmp_path: Path,  # noqa: ANN001
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    name = derive(sandbox_state, tmp_path, monkeypatch, "netnodocker",
                  {"network": {"targets": {"redis": _targets(sandbox_state)["redis"] | {"from_services": None}}}},
                  drop=("docker", "http_checks"))
    doc = network_checks(env=name)
    assert any("in-container checks skipped: no docker endpoint" in n for n in doc["notes"])
    assert doc["worst_severity"] == "info"


def test_check_primitives_against_real_listeners(sandbox_env) -> None:  # noqa: ANN001
    redis_port = sandbox_env.network.targets["redis"].port
    assert tcp_connect("127.0.0.1", redis_port, 2).ok
    assert tcp_connect("localhost", closed_port(), 2).result == "refused"
    assert resolve("localhost", 2).result == "127.0.0.1"
    pay = sandbox_env.http_checks["payment-provider"]
    ok = check_http("payment-provider", pay)
    assert ok.status == 401 and ok.ok and ok.tls_ms is not None
    assert ok.dns_ms is not None and ok.connect_ms is not None and ok.ttfb_ms is not None and ok.total_ms is not None
    assert ok.dns_ms <= ok.connect_ms <= ok.tls_ms <= ok.ttfb_ms <= ok.total_ms
    # the same endpoint without the stand-in's CA: verification is real, so it fails as TLS
    unverified = check_http("payment-provider", HttpCheckConfig(url=pay.url, expect_status=401, timeout_s=3))
    assert unverified.result == "tls" and "certificate" in unverified.error.lower()
