"""Notifications against loopback receivers: Slack-compatible and JSON webhooks per route with a link to the run,
a breaker trip announced, and a Grafana annotation (HTTP API) for every remediation applied."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from runbook.sandbox.incidents import DbIncident
from tests.intake_harness import alert, running_intake
from tests.integration.derived_env import derive

pytestmark = pytest.mark.integration

ROUTES = """
routes:
  - name: notify-auto
    match: {alertname: NotifyTest}
    procedure: db-slowness
    env: notified
    params: {long_query_s: 1, idle_in_transaction_s: 1}
    policy: {mode: auto, cooldown_s: 0, breaker: {max_remediations: 1, window_s: 3600}}
    notify:
      - {kind: slack, url: {env: TEST_SLACK_URL}}
      - {kind: webhook, url: {env: TEST_HOOK_URL}}
"""


class Receiver:
    """A loopback HTTP server that records every POST (path, JSON body, Authorization header)."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.posts.append((self.path, json.loads(body), self.headers.get("authorization", "")))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, path: str, timeout_s: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [b for p, b, _ in self.posts if p == path]
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"nothing posted to {path}: {self.posts}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def test_run_and_breaker_notifications_and_grafana_annotation(
    sandbox_state, app_dsn: str, receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    monkeypatch.setenv("TEST_SLACK_URL", f"{receiver.url}/slack")
    monkeypatch.setenv("TEST_HOOK_URL", f"{receiver.url}/hook")
    monkeypatch.setenv("TEST_GRAFANA_TOKEN", "grafana-token-123456")
    envdir = tmp_path / "env"
    envdir.mkdir()
    derive(sandbox_state, envdir, monkeypatch, "notified",
           {"grafana": {"url": receiver.url, "token": {"env": "TEST_GRAFANA_TOKEN"}}})
    (envdir / "routes.yaml").write_text(ROUTES)  # the flow finds its route by name to notify it
    incident = DbIncident(app_dsn, slow_runs=0, runaway=False).start()
    try:
        time.sleep(1.3)
        with running_intake(sandbox_state, tmp_path / "intake", routes="routes: []\n",
                            playbook_dirs=[envdir]) as it:
            first = it.post(alert("NotifyTest", {}, fingerprint="ad01"))
            assert first.json()["results"][0]["mode"] == "auto", first.text
            slack = receiver.wait("/slack")[0]
            hook = receiver.wait("/hook")[0]
            annotation = receiver.wait("/api/annotations")[0]
            # a second occurrence: the breaker (1 applying run per hour) narrows it and says so
            second = it.post(alert("NotifyTest", {}, fingerprint="ad02")).json()["results"][0]
            assert second["mode"] == "dry_run" and "circuit breaker open" in second["reason"]
            deadline = time.monotonic() + 30
            while not any(b.get("event") == "breaker" for p, b, _ in receiver.posts if p == "/hook") \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        incident.stop()
    assert slack["text"].startswith("[runbook] notify-auto: db-slowness on notified finished")
    assert "/runs/flow-run/" in slack["text"] and "open the run" in slack["text"]
    assert hook["event"] == "finished" and hook["route"] == "notify-auto" and "/runs/flow-run/" in hook["link"]
    assert "terminate-idle-blockers" in annotation["text"] and f"pid {incident.blocker_pid}" in annotation["text"]
    assert "runbook" in annotation["tags"]
    assert ("/api/annotations", annotation, "Bearer grafana-token-123456") in receiver.posts
    assert any(b.get("event") == "breaker" for p, b, _ in receiver.posts if p == "/hook")
