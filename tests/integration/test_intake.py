"""The alert intake against the sandbox's real Prefect server and PostgreSQL: exactly once, policies, approvals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from runbook.app.remote_run import api_client, deployment
from runbook.sandbox.incidents import DbIncident
from tests.intake_harness import Intake, alert, running_intake
from tests.prefect_runs import api_headers, run_artifacts

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def intake(sandbox_state, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Intake]:  # noqa: ANN001
    with running_intake(sandbox_state, tmp_path_factory.mktemp("intake")) as it:
        yield it


def test_auth_size_json_and_shape_are_checked_in_order(intake: Intake) -> None:
    good = alert("DatabaseConnectionHigh", {"db": "main"})
    assert intake.post(good, token="").status_code == 401
    assert intake.post(good, token="wrong-token-wrong-token").status_code == 401
    assert intake.post(b"{not json").status_code == 400
    assert intake.post({"version": "4", "alerts": "nope"}).status_code == 422
    assert intake.post({**good, "version": "3"}).status_code == 422
    huge = b'{"x": "' + b"a" * (1024 * 1024) + b'"}'
    assert intake.post(huge).status_code == 413

    def chunks() -> Iterator[bytes]:  # no content-length: the limit is counted while streaming
        yield b'{"x": "'
        for _ in range(300):
            yield b"a" * 4096
        yield b'"}'

    assert intake.post(chunks()).status_code == 413
    assert httpx.get(f"{intake.url}/healthz", timeout=5).json()["prefect_api"] is True


def test_one_run_per_occurrence_completes_with_report_and_resends_create_nothing(intake: Intake) -> None:
    payload = alert("DatabaseConnectionHigh", {"db": "main"}, fingerprint="feed0001")
    first = intake.post(payload)
    assert first.status_code == 200
    assert first.json()["results"][0]["outcome"] == "run"
    for _ in range(3):  # Alertmanager resends the same occurrence every group_interval
        again = intake.post(payload)
        assert again.json()["results"][0]["outcome"] == "duplicate"
    runs = intake.wait_runs("db-auto", "feed0001")
    assert len(runs) == 1
    assert intake.wait_state(runs[0]["id"], {"COMPLETED", "FAILED", "CRASHED"}) == "COMPLETED"
    arts = run_artifacts(intake.api_url, runs[0]["id"])
    assert any("# db-slowness on `sandbox`: APPLY" in (a.get("data") or "") for a in arts)
    # a new occurrence of the same alert (new startsAt) is a new run
    later = alert("DatabaseConnectionHigh", {"db": "main"}, fingerprint="feed0001",
                  starts_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat())
    assert intake.post(later).json()["results"][0]["outcome"] == "run"
    deadline = time.monotonic() + 30
    while len(intake.runs_for("db-auto", "feed0001")) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(intake.runs_for("db-auto", "feed0001")) == 2
    metrics = httpx.get(f"{intake.url}/metrics", timeout=5).text
    assert "runbook_intake_alerts_deduplicated_total 3.0" in metrics


@pytest.mark.parametrize("value", ["main; rm -rf /", "$(reboot)", "`id`", "../main", "MAIN", "nosuchdb", "", "main\n"])
def test_hostile_or_unknown_label_values_are_rejected_with_reason_and_no_run(intake: Intake, value: str) -> None:
    resp = intake.post(alert("DatabaseConnectionHigh", {"db": value}, fingerprint="bad0bad0"))
    assert resp.status_code == 200
    result = resp.json()["results"][0]
    assert result["outcome"] == "rejected"
    assert "label db=" in result["reason"]
    assert intake.runs_for("db-auto", "bad0bad0") == []


def test_missing_label_and_unrouted_alert(intake: Intake) -> None:
    r = intake.post(alert("DatabaseConnectionHigh", {}, fingerprint="bad0bad1")).json()["results"][0]
    assert r["outcome"] == "rejected" and "label 'db' is missing" in r["reason"]
    assert intake.post(alert("SomethingElse", {"db": "main"})).json()["results"][0]["outcome"] == "unrouted"


def test_cooldown_holds_a_second_occurrence_for_the_same_target(intake: Intake) -> None:
    first = intake.post(alert("DbCooldownTest", {"db": "main"}, fingerprint="c001")).json()["results"][0]
    second = intake.post(alert("DbCooldownTest", {"db": "main"}, fingerprint="c002")).json()["results"][0]
    assert first["outcome"] == "run" and first["mode"] == "diagnose"
    assert second["outcome"] == "cooldown"
    run = intake.wait_runs("db-cooldown", "c001")[0]
    assert intake.runs_for("db-cooldown", "c002") == []
    assert intake.wait_state(run["id"], {"COMPLETED", "FAILED"}) == "COMPLETED"


def test_breaker_narrows_to_dry_run_after_the_limit(intake: Intake) -> None:
    metrics_before = httpx.get(f"{intake.url}/metrics", timeout=5).text
    modes = []
    for i in range(4):  # the route allows 2 applying runs per hour; db-auto already made some above
        r = intake.post(alert("DatabaseConnectionHigh", {"db": "main"}, fingerprint=f"b00{i}")).json()
        modes.append(r["results"][0].get("mode"))
    assert modes[-1] == "dry_run" and "circuit breaker open" in json.dumps(r)
    runs = intake.wait_runs("db-auto", "b003")
    assert runs and runs[0]["parameters"]["dry_run"] is True
    assert "mode:dry_run" in runs[0]["tags"]
    assert "runbook_intake_breaker_trips_total" in httpx.get(f"{intake.url}/metrics", timeout=5).text
    assert metrics_before != ""


@pytest.fixture
def incident(app_dsn: str, sandbox_state) -> Iterator[DbIncident]:  # noqa: ANN001
    inc = DbIncident(app_dsn, slow_runs=0, runaway=False).start()
    time.sleep(1.3)
    yield inc
    inc.stop()


def _paused_run(intake: Intake, fingerprint: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        runs = intake.runs_for("db-approve", fingerprint)
        if runs and runs[0]["state"]["type"] == "PAUSED":
            return runs[0]
        time.sleep(0.3)
    raise AssertionError(f"no paused run for {fingerprint}: {runs}")


def _approve_cli(intake: Intake, run_id: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": intake.api_url}
    return subprocess.run([sys.executable, "-m", "runbook.app.cli", "approve", run_id, *extra], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def _report(intake: Intake, run_id: str) -> str:
    arts = run_artifacts(intake.api_url, run_id)
    return "\n".join(a.get("data") or "" for a in arts if isinstance(a.get("data"), str))


def test_approve_mode_pauses_then_applies_after_runbook_approve(intake: Intake, incident: DbIncident) -> None:
    intake.post(alert("DbApproveTest", {"db": "main"}, fingerprint="a001"))
    run = _paused_run(intake, "a001")
    assert incident.waiter_results == [], "nothing may change before the approval"
    proc = _approve_cli(intake, run["id"], "--yes", "--reason", "blocker confirmed")
    assert proc.returncode == 0, proc.stderr
    assert intake.wait_state(run["id"], {"COMPLETED", "FAILED"}) == "COMPLETED"
    report = _report(intake, run["id"])
    assert f"pid {incident.blocker_pid}" in report and "changed, verified" in report
    assert "approved by" in report and "blocker confirmed" in report


def test_rejected_approval_changes_nothing(intake: Intake, incident: DbIncident) -> None:
    intake.post(alert("DbApproveTest", {"db": "main"}, fingerprint="a002"))
    run = _paused_run(intake, "a002")
    assert _approve_cli(intake, run["id"], "--reject", "--reason", "not now").returncode == 0
    assert intake.wait_state(run["id"], {"COMPLETED", "FAILED"}) == "COMPLETED"
    assert "not applied: not now" in _report(intake, run["id"])
    assert incident.waiter_results == [], "a rejected approval changed something"


def test_approval_timeout_counts_as_rejection(intake: Intake, incident: DbIncident) -> None:
    intake.post(alert("DbApproveTimeoutTest", {}, fingerprint="a004"))
    run = intake.wait_runs("db-approve-timeout", "a004")[0]
    assert intake.wait_state(run["id"], {"COMPLETED", "FAILED"}, 90) == "COMPLETED"
    assert "no approval within 3 s (a timeout counts as rejection)" in _report(intake, run["id"])
    assert incident.waiter_results == [], "a timed-out approval changed something"


def test_resolved_alert_cancels_a_run_waiting_for_approval(intake: Intake, incident: DbIncident) -> None:
    firing = alert("DbApproveTest", {"db": "main"}, fingerprint="a003")
    intake.post(firing)
    run = _paused_run(intake, "a003")
    resolved = alert("DbApproveTest", {"db": "main"}, fingerprint="a003", status="resolved",
                     starts_at=firing["alerts"][0]["startsAt"])
    result = intake.post(resolved).json()["results"][0]
    assert result["outcome"] == "resolved" and "cancelled (paused)" in result["detail"]
    assert intake.wait_state(run["id"], {"CANCELLED"}) == "CANCELLED"
    time.sleep(2)
    assert incident.waiter_results == [], "a cancelled run changed something"


def test_ui_style_run_from_the_deployment_is_executed(intake: Intake) -> None:
    dep = deployment(api_client(intake.api_url, timeout_s=10), "db-slowness")
    assert dep["parameter_openapi_schema"]["properties"]["dry_run"]["default"] is True
    run = httpx.post(f"{intake.api_url}/deployments/{dep['id']}/create_flow_run", headers=api_headers(), timeout=10,
                     json={"parameters": {"env": "sandbox", "dry_run": True, "top": 3}}).json()
    assert intake.wait_state(run["id"], {"COMPLETED", "FAILED"}) == "COMPLETED"
    bad = httpx.post(f"{intake.api_url}/deployments/{dep['id']}/create_flow_run", headers=api_headers(), timeout=10,
                     json={"parameters": {"env": "sandbox", "dry_run": "maybe"}})
    assert bad.status_code == 409, "the server enforces the parameter schema"


def test_prefect_unreachable_answers_503_and_stores_nothing(sandbox_state, tmp_path: Path) -> None:  # noqa: ANN001
    from runbook.sandbox.net import free_ports

    dead = f"http://127.0.0.1:{free_ports(1)[0]}/api"
    with running_intake(sandbox_state, tmp_path, executor=False, api_url=dead) as it:
        resp = it.post(alert("DatabaseConnectionHigh", {"db": "main"}, fingerprint="dead0001"))
        assert resp.status_code == 503
        assert it.app.state.store.pending() == []
        assert httpx.get(f"{it.url}/healthz", timeout=5).status_code == 503


def test_backup_verification_is_scheduled_from_the_playbook_cron_and_reapplying_changes_nothing(
    intake: Intake, sandbox_env  # noqa: ANN001
) -> None:
    from runbook.app.serve import apply_verification_schedules

    assert sandbox_env.backups and sandbox_env.backups.verify_cron
    apply_verification_schedules(intake.api_url)  # a second application
    dep = deployment(api_client(intake.api_url, timeout_s=10), "backup-verification")
    schedules = [s for s in httpx.get(f"{intake.api_url}/deployments/{dep['id']}/schedules", headers=api_headers(),
                                      timeout=10).json()
                 if s.get("slug") == "verify-sandbox"]
    assert len(schedules) == 1
    assert schedules[0]["schedule"]["cron"] == sandbox_env.backups.verify_cron
    assert schedules[0]["parameters"]["env"] == "sandbox"
    assert schedules[0]["parameters"]["dry_run"] is False, "a scheduled verification records its result"
