"""In a real headless browser, the Prefect UI shows a finished run's report and a paused run's approval form."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flows.db_slowness import db_slowness
from runbook.sandbox.incidents import DbIncident
from tests.browser import Browser
from tests.prefect_runs import api_headers, api_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


def test_finished_run_shows_its_report_artifact(sandbox_state, browser: Browser, tmp_path: Path) -> None:  # noqa: ANN001
    doc = db_slowness(env="sandbox")
    api = sandbox_state.prefect_api_url
    ui = api.removesuffix("/api")
    arts = httpx.post(f"{api}/artifacts/filter", headers=api_headers(), timeout=10,
                      json={"artifacts": {"flow_run_id": {"any_": [doc["flow_run_id"]]}}}).json()
    report = next(a for a in arts if a["type"] == "markdown")
    browser.login(ui, sandbox_state.prefect_api_auth)
    browser.goto(f"{ui}/artifacts/artifact/{report['id']}")
    try:
        text = browser.wait_for_text("db-slowness on", "sandbox", "DRY RUN", "Findings", "Remediations")
    finally:
        browser.screenshot(tmp_path / "report.png")
    assert "connections to pafar" in text


def test_paused_run_shows_the_approval_form(sandbox_state, app_dsn: str, browser: Browser,  # noqa: ANN001
                                           tmp_path: Path) -> None:
    from prefect import tags
    from prefect.flow_runs import resume_flow_run

    api = sandbox_state.prefect_api_url
    ui = api.removesuffix("/api")
    incident = DbIncident(app_dsn, slow_runs=0, runaway=False).start()
    result: dict = {}
    from prefect.settings import temporary_settings

    def run() -> None:  # a thread starts with a fresh context: give it the sandbox server again
        with temporary_settings(updates=api_settings(api)), tags("mode:approve", "approval-timeout-s:120"):
            result["doc"] = db_slowness(env="sandbox", dry_run=False, long_query_s=1, idle_in_transaction_s=1)

    try:
        time.sleep(1.3)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        run_id = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and run_id is None:
            runs = httpx.post(f"{api}/flow_runs/filter", headers=api_headers(), timeout=10, json={
                "flow_runs": {"tags": {"all_": ["mode:approve"]}, "state": {"type": {"any_": ["PAUSED"]}}},
                "sort": "START_TIME_DESC", "limit": 1}).json()
            run_id = runs[0]["id"] if runs else None
            time.sleep(0.3)
        assert run_id, "the run never paused"
        browser.login(ui, sandbox_state.prefect_api_auth)
        browser.goto(f"{ui}/runs/flow-run/{run_id}")
        try:
            browser.wait_for_text("Paused")
            deadline = time.monotonic() + 20
            while not browser.click_text("Resume") and time.monotonic() < deadline:
                time.sleep(0.3)
            text = browser.wait_for_text("Approve remediation", "terminate", "Approve", "Approver", "Reason")
        finally:
            browser.screenshot(tmp_path / "approval.png")
        assert f"pid {incident.blocker_pid}" in text
        resume_flow_run(run_id, run_input={"approve": False, "approver": "test", "reason": "ui test"})
        t.join(60)
        assert "not applied: ui test" in str(result["doc"]["actions"])
    finally:
        incident.stop()
