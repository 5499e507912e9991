"""Connections cannot hold the intake: stalled headers and bodies are timed out, the longest-waiting connection
makes way when the cap is reached, and hostile requests cost a folded log line, never a traceback each.

No timing thresholds here (the latency figures are in bench/bench_intake.py): each test waits for the event it
is about, bounded by a generous client timeout.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from runbook.app.intake.limits import Limits, raise_open_files_limit
from tests.intake_harness import (
    PARTIAL_HEADER,
    Intake,
    IntakeProcess,
    alert,
    closed_by_server,
    db_route,
    intake_subprocess,
    routes_yaml,
    running_intake,
    stall_connections,
)
from tests.prefect_runs import api_headers

pytestmark = pytest.mark.integration

STALLED = 2000
ROUTES = routes_yaml(db_route("conn-real", {"alertname": "RealAlertUnderSiege"}))


@pytest.fixture
def intake_process(sandbox_state, tmp_path: Path) -> Iterator[IntakeProcess]:  # noqa: ANN001
    """`runbook intake` as production runs it, under the common LimitNOFILE=1024 (soft and hard: it cannot raise it),
    so its connection cap (768) is far below the stalled connections."""
    with intake_subprocess(sandbox_state, tmp_path, ROUTES, nofile=1024) as proc:
        yield proc


def test_2000_stalled_connections_leave_a_real_alert_answered(intake_process: IntakeProcess,
                                                             sandbox_state) -> None:  # noqa: ANN001
    url, log_path = intake_process.url, intake_process.log
    raise_open_files_limit()  # this process holds the client end of every stalled connection
    stalled = stall_connections(intake_process.port, STALLED, PARTIAL_HEADER)
    fp = secrets.token_hex(8)
    resp = intake_process.post(alert("RealAlertUnderSiege", {"db": "main"}, fingerprint=fp), timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["results"][0]["outcome"] == "run"
    assert httpx.get(f"{url}/healthz", timeout=60).status_code == 200
    assert closed_by_server(stalled, timeout_s=120) == STALLED, "a stalled connection was left open"
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    closed = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("runbook_intake_connections_closed_total{")}
    assert closed.get("evicted", 0) > 0, closed  # over the cap: the longest-waiting ones made way
    assert closed.get("header_timeout", 0) > 0, closed  # the rest timed out
    api = sandbox_state.prefect_api_url
    with sqlite3.connect(intake_process.store) as db:  # the intake's own record
        (key,) = db.execute("SELECT key FROM occurrences WHERE fingerprint = ?", (fp,)).fetchone()
    deadline = time.monotonic() + 60
    while not (runs := httpx.post(f"{api}/flow_runs/filter", headers=api_headers(), timeout=30, json={
            "flow_runs": {"tags": {"all_": [f"occurrence:{key}"]}}}).json()) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert len(runs) == 1, "the real alert's run was not created"
    # no executor here: leave the server as found
    httpx.delete(f"{api}/flow_runs/{runs[0]['id']}", headers=api_headers(), timeout=30)
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log
    assert "Too many open files" not in log, "the cap and accept batches leave descriptors to spare"
    assert len(log.splitlines()) < 50, f"{len(log.splitlines())} log lines for {STALLED} stalled connections"


@pytest.fixture(scope="module")
def short_deadlines(sandbox_state, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Intake]:  # noqa: ANN001
    limits = Limits(header_timeout_s=2, body_timeout_s=2)
    with running_intake(sandbox_state, tmp_path_factory.mktemp("conn"), routes=ROUTES, executor=False,
                        limits=limits) as it:
        yield it


def _port(intake: Intake) -> int:
    return int(intake.url.rsplit(":", 1)[1])


def _headers(intake: Intake, length: int) -> bytes:
    return (f"POST /alerts HTTP/1.1\r\nHost: intake\r\nAuthorization: Bearer {intake.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


def _wait_metric(intake: Intake, sample: str, value: float, timeout_s: float = 60) -> float:
    deadline = time.monotonic() + timeout_s
    while (got := intake.metric(sample)) < value and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def test_aborted_uploads_log_one_folded_line_and_no_traceback(short_deadlines: Intake,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """(First of the module's tests on this intake: a line folded into an earlier one would not show here.)"""
    it = short_deadlines
    sample = 'runbook_intake_requests_rejected_total{reason="aborted"}'
    before = it.metric(sample)
    with caplog.at_level(logging.WARNING):
        for s in stall_connections(_port(it), 30, _headers(it, 4000) + b'{"version": "4", "alerts": [{"status": "fir'):
            s.close()  # the upload is abandoned half-way
        assert _wait_metric(it, sample, before + 30) == before + 30
        assert httpx.post(f"{it.url}/alerts", content=b"{not json", timeout=30,
                          headers={"Authorization": f"Bearer {it.token}"}).status_code == 400
    aborted = [r for r in caplog.records if "aborted" in r.getMessage()]
    assert 1 <= len(aborted) <= 2, [r.getMessage() for r in aborted]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]


def test_a_stalled_body_is_closed_and_counted(short_deadlines: Intake) -> None:
    it = short_deadlines
    before = it.metric('runbook_intake_connections_closed_total{reason="body_timeout"}')
    socks = stall_connections(_port(it), 3, _headers(it, 500) + b'{"version": "4", "alerts": [')
    assert closed_by_server(socks, timeout_s=60) == 3
    assert _wait_metric(it, 'runbook_intake_connections_closed_total{reason="body_timeout"}', before + 3) == before + 3


def test_a_busy_intake_answers_503_and_alertmanager_retries(sandbox_state, tmp_path: Path) -> None:  # noqa: ANN001
    with running_intake(sandbox_state, tmp_path, routes=ROUTES, executor=False,
                        limits=Limits(max_in_flight=0)) as it:
        resp = it.post(alert("RealAlertUnderSiege", {"db": "main"}))
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
        assert it.app.state.store.pending_count() == 0
