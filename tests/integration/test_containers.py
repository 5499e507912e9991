"""high-cpu, memory-leak and service-outage end to end against the sandbox's real Podman Docker API (and sshd).

Each test injects its incident (a CPU burner, a container whose memory grows, a stopped backend), and the
``project`` fixture puts the compose project back exactly as it was afterwards.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import docker
import pytest

from flows.high_cpu import high_cpu
from flows.memory_leak import memory_leak
from flows.service_outage import service_outage
from runbook.engine.clients import docker_api_version
from runbook.sandbox.incidents import CpuBurner, MemoryGrower, StoppedService, remove_containers_except
from tasks.containers import list_project_containers, sample_container_stats
from tests.integration.derived_env import derive
from tests.scenarios import project_containers

pytestmark = pytest.mark.integration


@pytest.fixture
def project(sandbox_env) -> Iterator[str]:  # noqa: ANN001
    """The Docker URL; afterwards every added container is removed and stopped ones are started again."""
    url = sandbox_env.docker.base_url
    client = docker.DockerClient(base_url=url, version=docker_api_version(url, 30), timeout=30)
    keep = {c.id for c in client.containers.list(all=True, filters={"label": "com.docker.compose.project=pafar"})}
    try:
        yield url
    finally:
        remove_containers_except(url, keep)
        for c in client.containers.list(all=True, filters={"label": "com.docker.compose.project=pafar"}):
            if c.status != "running":
                c.start()
        client.close()


def _actions(doc: dict) -> dict[str, dict]:
    return {a["name"]: a for a in doc["actions"]}


def test_cpu_burner_ranks_first(sandbox_env, project: str) -> None:  # noqa: ANN001
    burner = CpuBurner(project).start()
    stats = sample_container_stats.fn(sandbox_env, list_project_containers.fn(sandbox_env), 0.5)
    assert stats[0].name == burner.name
    assert stats[0].cpu_percent > 2 * max(s.cpu_percent for s in stats[1:]) + 10
    assert all(s.mem_limit > 0 for s in stats)


def test_high_cpu_dry_run_then_scale_then_nothing(
    sandbox_state, project: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    # a low line: on a 2-core machine shared with the rest of the suite the burner gets what the scheduler leaves it
    env = derive(sandbox_state, tmp_path, monkeypatch, "hot", {"thresholds": {"cpu_percent": 10}})
    burner = CpuBurner(project).start()
    snapshot = project_containers(project)
    before = snapshot()

    dry = high_cpu(env=env, dry_run=True, sample_interval_s=0.5)
    assert snapshot() == before, "the dry run changed a container"
    hot = [f for f in dry["findings"] if f["subject"] == f"container {burner.name}"]
    assert hot and any("ERROR line(s)" in f["title"] and "0 ERROR" not in f["title"] for f in hot)
    assert any(f["title"].startswith(f"top CPU: {burner.name}") for f in dry["findings"])
    scale = _actions(dry)["scale-service"]  # the hot service, to its max_replicas (3): backend-1 + burner + one
    assert [c["subject"] for c in scale["planned"]] == ["container pafar-backend-3"] and not scale["changed"]

    real = high_cpu(env=env, dry_run=False, service="backend", replicas=3, sample_interval_s=0.5)
    scale = _actions(real)["scale-service"]
    assert scale["changed"] and scale["verified"], scale
    added = {row[1]: row for row in snapshot() - before}
    assert list(added) == ["pafar-backend-3"] and added["pafar-backend-3"][2] == "running"
    client = docker.DockerClient(base_url=project, version=docker_api_version(project, 30), timeout=30)
    new, template = client.containers.get("pafar-backend-3"), client.containers.get(burner.name)
    assert new.labels["com.docker.compose.service"] == "backend" and new.labels["com.docker.compose.project"] == "pafar"
    assert new.labels["com.docker.compose.container-number"] == "3"
    assert new.attrs["Config"]["Image"] == template.attrs["Config"]["Image"]
    assert new.attrs["Config"]["Cmd"] == template.attrs["Config"]["Cmd"]
    assert list(new.attrs["NetworkSettings"]["Networks"]) == list(template.attrs["NetworkSettings"]["Networks"])
    assert new.attrs["HostConfig"]["Memory"] == template.attrs["HostConfig"]["Memory"]
    client.close()

    after = snapshot()
    again = high_cpu(env=env, dry_run=False, service="backend", replicas=3, sample_interval_s=0.5)
    assert _actions(again)["scale-service"]["planned"] == [] and not _actions(again)["scale-service"]["changed"]
    assert snapshot() == after


def test_scale_above_max_replicas_is_refused(sandbox_env) -> None:  # noqa: ANN001
    from runbook.engine.errors import BadInput

    with pytest.raises(BadInput, match="max_replicas"):
        high_cpu(env="sandbox", service="backend", replicas=4)


def test_memory_leak_names_the_grower_and_restarts_it_once(
    sandbox_state, project: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    hook = ["head", "-n", "2", "/proc/1/status"]  # the playbook's heap-profile hook: an argument list, no shell
    env = derive(sandbox_state, tmp_path, monkeypatch, "leaky", {"services": {"celery-worker": {
        "min_replicas": 1, "max_replicas": 2, "writer": True, "heap_profile_command": hook}}})
    grower = MemoryGrower(project).start()
    time.sleep(0.5)
    since = datetime.now(UTC)  # the alert began after the grower started
    snapshot = project_containers(project)
    before = snapshot()

    dry = memory_leak(env=env, dry_run=True, samples=4, interval_s=0.6, since=since, heap_profile=True)
    assert snapshot() == before, "the dry run changed a container"
    [profile] = [f for f in dry["findings"] if f["title"].startswith("heap profile of")]
    assert profile["title"] == f"heap profile of {grower.name} (exit 0)"
    assert profile["blocks"][0]["text"].startswith("Name:\tsh\n")
    leaks = [f for f in dry["findings"] if " leaks " in f["title"]]
    assert [f["subject"] for f in leaks] == [f"container {grower.name}"]
    table = next(f for f in dry["findings"] if f["title"].startswith("memory growth of"))["blocks"][0]
    rows = {r[0]: r for r in table["rows"]}
    assert rows[grower.name][5] > 0 and rows[grower.name][9] == "yes"
    assert all(r[9] == "" for name, r in rows.items() if name != grower.name), "a steady container was named"
    restart = _actions(dry)["restart-leakers"]
    assert [c["subject"] for c in restart["planned"]] == [f"container {grower.name}"] and not restart["changed"]

    real = memory_leak(env=env, dry_run=False, samples=4, interval_s=0.6, since=since)
    restart = _actions(real)["restart-leakers"]
    assert restart["changed"] and restart["verified"], restart
    changed = {row[1]: row for row in snapshot() - before}
    assert list(changed) == [grower.name] and changed[grower.name][2] == "running"

    again = memory_leak(env=env, dry_run=False, service="celery-worker", samples=4, interval_s=0.6, since=since)
    assert not any(a["changed"] or a["planned"] for a in again["actions"]), "restarted twice for one alert"
    table = next(f for f in again["findings"] if f["title"].startswith("memory growth of"))["blocks"][0]
    assert {r[1] for r in table["rows"]} == {"celery-worker"}, "service= did not narrow the sampling"


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append({"path": self.path, "json": json.loads(body)})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict]]]:
    """A loopback incident-channel receiver; its URL carries a token, like Slack's."""
    received: list[dict] = []
    handler = type("Receiver", (_Receiver,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/T0KEN-Secret-4242", received
    server.shutdown()
    server.server_close()


def test_service_outage_finds_the_stopped_backend_starts_it_and_notifies(
    sandbox_state, sandbox_env, project: str, webhook, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    url, received = webhook
    name = derive(sandbox_state, tmp_path, monkeypatch, "outage",
                  {"incident_webhook": {"url": {"env": "TEST_INCIDENT_WEBHOOK"}, "timeout_s": 3}})
    monkeypatch.setenv("TEST_INCIDENT_WEBHOOK", url)
    stopped = StoppedService(project, service="backend").start()
    snapshot = project_containers(project)
    before = snapshot()

    quiet = service_outage(env=name, dry_run=True, notify=False)
    assert received == [] and "incident webhook: not notified (notify=False)" in quiet["notes"]

    dry = service_outage(env=name, dry_run=True)
    assert snapshot() == before, "the dry run changed a container"
    critical = {f["title"] for f in dry["findings"] if f["severity"] == "critical"}
    assert "backend: none of its 1 container(s) is running" in critical
    assert any(t.startswith("backend health endpoint fails") for t in critical)
    start = _actions(dry)["start-service-containers"]
    assert [c["subject"] for c in start["planned"]] == [f"container {stopped.name}"] and not start["changed"]
    assert len(received) == 1 and received[0]["json"]["dry_run"] is True
    assert "DRY RUN, nothing changed; would: start container pafar-backend-1" in received[0]["json"]["text"]

    real = service_outage(env=name, dry_run=False)
    start = _actions(real)["start-service-containers"]
    assert start["changed"] and start["verified"] and "answers" in start["detail"], start
    assert len(received) == 2 and "applied: start container pafar-backend-1; verified: True" in \
        received[1]["json"]["text"]
    assert {row[1] for row in snapshot() - before} == {stopped.name}

    again = service_outage(env=name, dry_run=False)
    assert not any(a["changed"] or a["planned"] for a in again["actions"])
    # the service is fine again; the sandbox's host is this machine, whose load is whatever else runs here
    assert not [f for f in again["findings"] if f["severity"] == "critical" and not f["subject"].startswith("host ")]
    assert len(received) == 2, "notified although nothing was wrong"
    assert "T0KEN-Secret-4242" not in json.dumps([quiet, dry, real, again])


def test_docker_api_that_does_not_answer_is_a_finding(
    sandbox_state, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    sock_path = tmp_path / "deaf.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sock_path))
    srv.listen(16)  # accepts (the kernel's backlog) and never answers
    try:
        name = derive(sandbox_state, tmp_path, monkeypatch, "deafdocker",
                      {"docker": {"base_url": f"unix://{sock_path}", "timeout_s": 2}}, drop=("ssh_hosts",))
        started = time.monotonic()
        doc = high_cpu(env=name, dry_run=True, sample_interval_s=0.5)
        elapsed = time.monotonic() - started
    finally:
        srv.close()
    crit = [f for f in doc["findings"] if f["severity"] == "critical"]
    assert [f["title"] for f in crit] == ["docker API of deafdocker unreachable: no answer within 2 s"]
    assert elapsed < 2 + 20, "the docker timeout did not bound the wait"
