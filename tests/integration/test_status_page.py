"""The status page, driven by an alert through the intake: a ServiceDown-style alert for the stopped backend opens
one incident on the sandbox's Statuspage stand-in (investigating), the run's plan and its verified start move it on
(identified, monitoring), a resent alert changes nothing, and the alert's resolve closes it (resolved), in that
order. The key never appears in what was sent; a page that refuses the key is a warning, not a failed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from runbook.app.review import Review, parse_time
from runbook.engine.clients import docker_api_version
from runbook.engine.config import PROJECT_ROOT
from runbook.engine.decisions import operator_identity
from runbook.engine.statuspage import RECORD_KEY, IncidentRecord, parse_record
from runbook.sandbox import SandboxState
from runbook.sandbox.incidents import StoppedService, remove_containers_except
from tests.intake_harness import alert, routes_yaml, running_intake
from tests.integration.derived_env import derive
from tests.prefect_runs import api_headers, run_history, wait_for

pytestmark = pytest.mark.integration

ALERTNAME = "Outage <!channel> |x| `c` *b* & [l](http://e)\n## injected"  # an alert name any sender may use
HOSTILE = "<script>alert(1)</script> | ## x\n\u2028`rm -rf /` ${HOME} %s {0}"
ROUTE = {"name": "outage-status", "match": {"alertname": ALERTNAME}, "procedure": "service-outage",
         "env": "sandbox", "labels": {"service": {"label": "service", "inventory": "services"}},
         "params": {"deploy_hours": 1}, "policy": {"mode": "approve", "cooldown_s": 0, "approval_timeout_s": 300},
         "notify": [{"kind": "slack", "url": {"env": "RUNBOOK_SANDBOX_INCIDENT_WEBHOOK"}}]}


@pytest.fixture
def project(sandbox_env) -> Iterator[str]:  # noqa: ANN001
    """The Docker URL; afterwards added containers are removed and stopped ones started again."""
    url = sandbox_env.docker.base_url
    client = docker.DockerClient(base_url=url, version=docker_api_version(url, 30), timeout=30)
    label = {"label": "com.docker.compose.project=pafar"}
    keep = {c.id for c in client.containers.list(all=True, filters=label)}
    try:
        yield url
    finally:
        remove_containers_except(url, keep)
        for c in client.containers.list(all=True, filters=label):
            if c.status != "running":
                c.start()
        client.close()


def comms_requests(state: SandboxState) -> list[dict[str, Any]]:
    """Everything the sandbox's status-page and Slack stand-in accepted, in order."""
    port = state.services["comms"].port
    return httpx.get(f"http://127.0.0.1:{port}/_requests", timeout=10, trust_env=False).json()  # type: ignore[no-any-return]


def incident_of(api: str, run_id: str) -> IncidentRecord | None:
    resp = httpx.get(f"{api}/flow_runs/{run_id}/input/{RECORD_KEY}", timeout=10, trust_env=False,
                     headers=api_headers())
    return parse_record(resp.text, IncidentRecord) if resp.status_code == 200 else None


def stored_report(api: str, run_id: str) -> dict[str, Any]:
    """The report the engine stored with the run (run input ``runbook-report``)."""
    value = json.loads(httpx.get(f"{api}/flow_runs/{run_id}/input/runbook-report", timeout=10,
                                 headers=api_headers()).text)
    return json.loads(value) if isinstance(value, str) else value  # type: ignore[no-any-return]


def approve(api: str, run_id: str) -> None:
    """Approve a paused run as `runbook approve RUN --yes` does (the OS user and host are the approver)."""
    env = {**os.environ, "PREFECT_API_URL": api}
    proc = subprocess.run([sys.executable, "-m", "runbook.app.cli", "approve", run_id, "--yes", "--reason",
                           "backend down <!channel> | `x`"], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr


def slack_messages(state: SandboxState, run_id: str) -> list[str]:
    return [r["body"]["text"] for r in comms_requests(state) if r["kind"] == "slack" and run_id in r["body"]["text"]]


def routes_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *routes: dict[str, Any]) -> Path:
    """The routes where both the intake and the run read them (the run finds its route's notifiers by name)."""
    d = tmp_path / "routes-for-runs"
    d.mkdir()
    (d / "routes.yaml").write_text(routes_yaml(*routes))
    monkeypatch.setenv("RUNBOOK_PLAYBOOKS", os.pathsep.join([os.environ["RUNBOOK_PLAYBOOKS"], str(d)]))
    return d


def test_alert_opens_moves_on_and_resolves_one_incident_and_tells_the_channel(
    sandbox_state: SandboxState, project: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    routes = routes_dir(tmp_path, monkeypatch, ROUTE)
    stopped = StoppedService(project, service="backend").start()
    labels = {"service": "backend", "instance": HOSTILE, "job": "x" * 4000}
    firing = alert(ALERTNAME, labels, fingerprint="5a9e01")
    resolved = alert(ALERTNAME, labels, fingerprint="5a9e01", status="resolved",
                     starts_at=firing["alerts"][0]["startsAt"])
    with running_intake(sandbox_state, tmp_path, routes="routes: []\n",
                        playbook_dirs=[PROJECT_ROOT / "playbooks" / "pafar.yaml", sandbox_state.playbook_dir,
                                       routes]) as it:
        assert it.post(firing).json()["results"][0]["outcome"] == "run"
        (run,) = it.wait_runs("outage-status", "5a9e01")
        wait_for(lambda: it.wait_state(run["id"], {"PAUSED", "COMPLETED", "FAILED"}) == "PAUSED", 120,
                 "the run to wait for approval")
        approve(it.api_url, run["id"])
        assert it.wait_state(run["id"], {"COMPLETED", "FAILED", "CRASHED"}, timeout_s=180) == "COMPLETED"
        assert it.post(firing).json()["results"][0]["outcome"] == "duplicate"  # a resend: no second incident
        record = incident_of(it.api_url, run["id"])
        assert record is not None, "no incident recorded with the run"
        assert it.post(resolved).json()["results"][0]["outcome"] == "resolved"
        wait_for(lambda: any(r["kind"] == "resolve" and r["incident_id"] == record.incident_id
                             for r in comms_requests(sandbox_state)), 60, "the incident's resolve")
        assert it.post(resolved).json()["results"][0]["outcome"] == "resolved"  # a resent resolve
        occurrence = next(t for t in run["tags"] if t.startswith("occurrence:")).removeprefix("occurrence:")
        review_json = tmp_path / "intake" / "reviews" / f"incident-review-{occurrence}.json"
        wait_for(review_json.is_file, 120, "the post-incident review")
        wait_for(lambda: it.metric("runbook_incident_time_to_recover_seconds_count") > 0, 30, "the review's figures")
        remediate_count = it.metric('runbook_incident_time_to_remediate_seconds_count{procedure="service-outage"}')
        recover_count = it.metric('runbook_incident_time_to_recover_seconds_count{procedure="service-outage"}')
    everything = comms_requests(sandbox_state)
    mine = [r for r in everything if r["incident_id"] == record.incident_id]
    assert [(r["kind"], r["body"]["status"]) for r in mine] == [
        ("create", "investigating"), ("update", "identified"), ("update", "monitoring"), ("resolve", "resolved")]
    assert all(r["body"]["components"] == {"backend-api": s} for r, s in zip(
        mine, ["major_outage", "major_outage", "degraded_performance", "operational"], strict=True))
    assert mine[0]["body"]["name"] == "Service disruption: backend"

    # the incident channel: the route's waiting and finished messages and service-outage's own summary
    texts = slack_messages(sandbox_state, run["id"])
    waiting = next(t for t in texts if "WAITING FOR APPROVAL" in t)
    finished = next(t for t in texts if "finished: Remediated" in t)
    summary = next(t for t in texts if t.startswith("[runbook] service outage: backend on sandbox"))
    for text in (waiting, finished, summary):
        assert "Findings (worst first):" in text
        assert "- CRITICAL: backend: none of its 1 container(s) is running (service backend)" in text
        assert "<!channel>" not in text, "a label value reached Slack unescaped"
    assert f"- start-service-containers: start container {stopped.name}" in waiting
    assert f"- changed: start-service-containers: start container {stopped.name}" in finished
    assert "verified: yes" in finished and "verified: yes" in summary
    assert "Alert: Outage &lt;!channel&gt; |x| `c` *b* &amp; [l](http://e) ## injected" in finished
    assert "## injected" not in waiting.split("\n", 2)[2], "a label value added a line"
    key = sandbox_state.env_vars()["RUNBOOK_SANDBOX_STATUSPAGE_KEY"]
    token = sandbox_state.env_vars()["RUNBOOK_SANDBOX_INCIDENT_WEBHOOK"].rsplit("/", 1)[1]
    assert key not in json.dumps(everything) and token not in json.dumps(everything)

    # the post-incident review the intake wrote on resolve: its timeline is the run's own story
    review = Review.model_validate_json(review_json.read_text())
    api = httpx.Client(base_url=sandbox_state.prefect_api_url, timeout=10, trust_env=False, headers=api_headers())
    states = [(s["name"], parse_time(s["timestamp"])) for s in run_history(api, run["id"])]
    assert [(e.state, e.at) for e in review.timeline if e.kind == "state"] == states
    assert [s for s, _ in states].count("Suspended") == 1 and states[-1][0] == "Remediated"
    kinds = [e.kind for e in review.timeline]
    for earlier, later in [("alert", "diagnosis"), ("diagnosis", "approval-asked"), ("approval-asked", "approval"),
                           ("approval", "change"), ("change", "verify"), ("verify", "resolved")]:
        assert kinds.index(earlier) < kinds.index(later), (earlier, later, kinds)
    decided = next(e for e in review.timeline if e.kind == "approval")
    assert decided.text.startswith(f"approved by {operator_identity()} (") and "&lt;" not in decided.text
    resumed = next(at for (name, at), (prev, _) in zip(states[1:], states, strict=False) if prev == "Suspended")
    assert decided.at == resumed
    assert f"start-service-containers: start container {stopped.name}" in [
        e.text for e in review.timeline if e.kind == "change"]
    assert review.status_page_incident == record.incident_id and review.recovery == f"verified by run {run['id']}"
    f = review.figures
    assert None not in (f.time_to_first_diagnosis_s, f.time_to_remediate_s, f.time_to_recover_s, f.time_to_resolve_s)
    assert 0 <= f.time_to_first_diagnosis_s <= f.time_to_remediate_s <= f.time_to_recover_s <= f.time_to_resolve_s
    markdown = review_json.with_suffix(".md").read_text()
    artifact = api.post("/artifacts/filter", json={"artifacts": {"key": {"any_": [review.name]}}}).json()
    assert artifact and artifact[0]["data"] == markdown and artifact[0]["flow_run_id"] == run["id"]
    assert "<!channel>" not in markdown and "<script>" not in markdown
    assert not [line for line in markdown.splitlines() if line.startswith("## injected")], "a label made a heading"
    assert key not in markdown and key not in review_json.read_text()
    assert remediate_count == recover_count == 1  # this intake's state dir is new: one review, one observation

    # a restarted intake starts its histograms from the reviews in its state directory
    with running_intake(sandbox_state, tmp_path, routes="routes: []\n", executor=False) as restarted:
        assert restarted.metric('runbook_incident_time_to_recover_seconds_count{procedure="service-outage"}') == 1

    # the same review from the CLI, by the alert's fingerprint
    env = {**os.environ, "PREFECT_API_URL": sandbox_state.prefect_api_url}
    cli = subprocess.run([sys.executable, "-m", "runbook.app.cli", "incident", "review", "5a9e01", "--output", "json",
                          "--out", str(tmp_path / "cli"), "--no-artifact"], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert cli.returncode == 0, cli.stderr
    again = Review.model_validate_json(cli.stdout)
    assert [(e.kind, e.at, e.text) for e in again.timeline] == [(e.kind, e.at, e.text) for e in review.timeline]
    assert (tmp_path / "cli" / f"{review.name}.md").is_file()


def test_a_page_that_refuses_the_key_is_a_warning_and_the_outage_is_still_remediated(
    sandbox_state: SandboxState, project: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    envdir = tmp_path / "env"
    envdir.mkdir()
    monkeypatch.setenv("TEST_WRONG_STATUSPAGE_KEY", "wrong-key-0123456789")
    derive(sandbox_state, envdir, monkeypatch, "badpage",
           {"status_page": {"api_key": {"env": "TEST_WRONG_STATUSPAGE_KEY"}}})
    StoppedService(project, service="backend").start()
    route = {**ROUTE, "name": "outage-badpage", "env": "badpage", "match": {"alertname": "BadPageTest"},
             "policy": {"mode": "auto", "cooldown_s": 0}, "notify": []}
    with running_intake(sandbox_state, tmp_path, routes=routes_yaml(route), playbook_dirs=[envdir]) as it:
        it.post(alert("BadPageTest", {"service": "backend"}, fingerprint="bad0a9e"))
        (run,) = it.wait_runs("outage-badpage", "bad0a9e")
        assert it.wait_state(run["id"], {"COMPLETED", "FAILED", "CRASHED"}, timeout_s=180) == "COMPLETED"
        final = httpx.get(f"{it.api_url}/flow_runs/{run['id']}", timeout=10,
                          headers=api_headers()).json()["state"]["name"]
        report = stored_report(it.api_url, run["id"])
    assert final == "Remediated", report["outcome"]
    warnings = [f["title"] for f in report["findings"] if f["subject"] == "status page"]
    assert warnings == ["status page not updated (investigating): POST /incidents: HTTP 401"], warnings
    assert incident_of(it.api_url, run["id"]) is None
    assert "wrong-key-0123456789" not in json.dumps(report)
