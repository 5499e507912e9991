"""What Alertmanager and Grafana really send, through the real intake, Prefect server and executor: each alert is
accepted or rejected on its own, so one odd alert never costs the alerts grouped with it their runs."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.intake_harness import FIXTURES, Intake, alert, db_route, routes_yaml, running_intake

pytestmark = pytest.mark.integration

ROUTES = routes_yaml(
    db_route("pl-grafana", {"alertname": "DatabaseConnectionHigh", "grafana_folder": "Pafar"}),
    db_route("pl-otel", {"alertname": "DatabaseConnectionHigh", "service.name": "pafar-db"},  # UTF-8 label names
             env_label="deployment.environment"),
    db_route("pl-mixed", {"alertname": "MixedGroup"}),
    db_route("pl-redos", {"alertname": "HostDown"}, match_re={"instance": "([a-z0-9]+-?)+"}, labels={}),
)


@pytest.fixture(scope="module")
def intake(sandbox_state, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Intake]:  # noqa: ANN001
    with running_intake(sandbox_state, tmp_path_factory.mktemp("payloads"), routes=ROUTES) as it:
        yield it


def _fixture(name: str) -> dict[str, Any]:
    """A sender's payload with fresh fingerprints and start times (the sandbox's Prefect server outlives a session,
    and an occurrence it has seen would get its earlier run back)."""
    doc = json.loads((FIXTURES.parent / name).read_text())
    now = datetime.now(UTC)
    for i, a in enumerate(doc["alerts"]):
        a["fingerprint"] = secrets.token_hex(8)
        a["startsAt"] = (now + timedelta(milliseconds=i)).isoformat()
    return doc


def _completed(intake: Intake, route: str, fingerprint: str) -> None:
    runs = intake.wait_runs(route, fingerprint)
    assert len(runs) == 1, f"{route}/{fingerprint}: {len(runs)} runs"
    assert intake.wait_state(runs[0]["id"], {"COMPLETED", "FAILED", "CRASHED"}, 120) == "COMPLETED"


def test_alertmanager_025_payload_is_accepted(intake: Intake) -> None:
    resp = intake.post(_fixture("alertmanager/servicedown-firing.json"))
    assert resp.status_code == 200
    body = resp.json()
    assert (body["version"], body["accepted"], body["rejected"]) == ("4", 1, 0)
    assert body["results"][0]["outcome"] == "unrouted"  # no route of this module takes ServiceDown


def test_alertmanager_028_utf8_label_names_route_and_run(intake: Intake) -> None:
    doc = _fixture("alertmanager/utf8-firing-0.28.json")
    resp = intake.post(doc)
    assert resp.status_code == 200, resp.text
    result = resp.json()["results"][0]
    assert (result["route"], result["outcome"]) == ("pl-otel", "run"), result
    _completed(intake, "pl-otel", doc["alerts"][0]["fingerprint"])


def test_grafana_version_1_with_null_maps_runs_every_alert(intake: Intake) -> None:
    doc = _fixture("grafana/firing-v1.json")
    resp = intake.post(doc)
    assert resp.status_code == 200, resp.text
    assert [r["outcome"] for r in resp.json()["results"]] == ["run", "run"]
    for a in doc["alerts"]:
        _completed(intake, "pl-grafana", a["fingerprint"])


def test_a_mixed_group_rejects_the_bad_alerts_alone_and_the_others_run(intake: Intake) -> None:
    doc = alert("MixedGroup", {"db": "main"})
    good = doc["alerts"][0]
    fp_good = [secrets.token_hex(8) for _ in range(2)]
    fp_bad = [secrets.token_hex(8) for _ in range(4)]
    doc["alerts"] = [
        {**good, "fingerprint": fp_good[0]},
        {**good, "fingerprint": fp_bad[0], "labels": {"alertname": "MixedGroup", "db": "main; rm -rf /"}},
        {**good, "fingerprint": fp_bad[1], "labels": {"alertname": "MixedGroup", "db": "m" * 5000}},
        {**good, "fingerprint": fp_bad[2], "labels": {"alertname": "MixedGroup", **{f"l{i}": "x" for i in range(200)}}},
        {**good, "fingerprint": fp_bad[3], "status": "pending"},
        "not an alert",
        {**good, "fingerprint": fp_good[1], "labels": {"alertname": "MixedGroup", "db": "main", "service.name": "x"},
         "annotations": None, "somethingNew": {"deep": [[[[]]]]}},
    ]
    before = {code: intake.metric(f'runbook_intake_alerts_rejected_total{{reason="{code}"}}')
              for code in ("invalid_target", "label_value_too_long", "too_many_labels", "invalid_status",
                           "not_an_object")}
    resp = intake.post(doc)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["alerts"], body["accepted"], body["rejected"]) == (7, 3, 4)  # invalid_target: per route, below
    by_index = {r["index"]: r for r in body["results"]}
    assert by_index[0]["outcome"] == by_index[6]["outcome"] == "run"
    assert by_index[1]["code"] == "invalid_target" and "label db='main; rm -rf /'" in by_index[1]["reason"]
    assert by_index[2]["code"] == "label_value_too_long" and "5000 characters" in by_index[2]["reason"]
    assert by_index[3]["code"] == "too_many_labels"
    assert by_index[4]["code"] == "invalid_status"
    assert by_index[5]["code"] == "not_an_object"
    for code, was in before.items():
        assert intake.metric(f'runbook_intake_alerts_rejected_total{{reason="{code}"}}') == was + 1, code
    for fp in fp_good:
        _completed(intake, "pl-mixed", fp)
    for fp in fp_bad:
        assert intake.runs_for("pl-mixed", fp) == []


def test_more_alerts_than_the_limit_are_rejected_one_by_one_not_as_a_group(intake: Intake) -> None:
    doc = alert("NoRouteTakesThis")
    doc["alerts"] = [{**doc["alerts"][0], "fingerprint": f"{i:08x}"} for i in range(1003)]
    doc["truncatedAlerts"] = 40
    body = intake.post(doc).json()
    assert (body["accepted"], body["rejected"], body["truncated"]) == (1000, 3, 40)
    over = [r for r in body["results"] if r["outcome"] == "rejected"]
    assert [(r["index"], r["code"]) for r in over] == [(i, "too_many_alerts") for i in (1000, 1001, 1002)]
    assert "left out 40 alerts" in body["note"]
    assert intake.metric("runbook_intake_alerts_truncated_total") >= 40


def test_deep_json_is_a_400_and_deep_unused_fields_are_ignored(intake: Intake) -> None:
    deep = intake.post(b"[" * 100_000 + b"]" * 100_000)
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]
    inside = json.dumps(alert("NoRouteTakesThis"))[:-1] + ', "extra": ' + "[" * 50_000 + "]" * 50_000 + "}"
    assert intake.post(inside.encode()).status_code == 400
    fine = alert("NoRouteTakesThis")
    fine["alerts"][0]["extra"] = json.loads("[" * 500 + "]" * 500)
    assert intake.post(fine).json()["accepted"] == 1
    assert intake.metric('runbook_intake_requests_rejected_total{reason="malformed_json"}') >= 2


def test_the_redos_pattern_against_a_hostile_label_is_answered(intake: Intake) -> None:
    """``([a-z0-9]+-?)+`` held Python's re for 6.1 s at 27 characters, doubling per character; with RE2 a
    40-character value is answered like any other (bounded here only by the client's generous timeout)."""
    hostile = intake.post(alert("HostDown", {"instance": "a" * 40 + "!"}), timeout=30)
    assert hostile.json()["results"][0]["outcome"] == "unrouted"
    assert httpx.get(f"{intake.url}/healthz", timeout=30).status_code == 200
    plain = intake.post(alert("HostDown", {"instance": "web-01"}), timeout=30)
    assert plain.json()["results"][0]["route"] == "pl-redos"


def test_real_alertmanager_posts_a_mixed_group_and_the_good_alerts_run(intake: Intake, sandbox_state) -> None:  # noqa: ANN001
    """The sandbox's Alertmanager 0.25, with the sandbox receiver's max_alerts, groups four alerts into one
    webhook; the two bad ones are rejected, the two good ones run."""
    am = sandbox_state.services["alertmanager"]
    config_path = Path(am.paths["config"])
    original = config_path.read_text()
    cfg = yaml.safe_load(original)
    for r in cfg["receivers"]:
        hooks = r.get("webhook_configs") or [{"send_resolved": False}]
        r["webhook_configs"] = [{**hooks[0], "url": f"{intake.url}/alerts", "max_alerts": 200,
                                 "http_config": {"authorization": {"type": "Bearer", "credentials": intake.token}}}]
    config_path.write_text(yaml.safe_dump(cfg))
    httpx.post(f"http://127.0.0.1:{am.port}/-/reload", timeout=10).raise_for_status()
    job = f"mixed-{secrets.token_hex(4)}"  # a fresh group
    ends = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    since = time.time()
    labels = [{"db": "main", "instance": "i1"}, {"db": "main", "instance": "i2"},
              {"db": "$(reboot)", "instance": "i3"}, {"db": "m" * 5000, "instance": "i4"}]
    try:
        httpx.post(f"http://127.0.0.1:{am.port}/api/v2/alerts", timeout=10, json=[
            {"labels": {"alertname": "MixedGroup", "job": job, **extra}, "annotations": {"summary": "mixed"},
             "endsAt": ends} for extra in labels]).raise_for_status()
        deadline = time.monotonic() + 60
        rows: list[tuple[str, str]] = []
        while time.monotonic() < deadline and len(rows) < 2:
            rows = intake.app.state.store._db.execute(
                "SELECT fingerprint, params FROM occurrences WHERE route = 'pl-mixed' AND alertname = 'MixedGroup' "
                "AND received_at >= ?", (since,)).fetchall()
            rows = [r for r in rows if json.loads(r[1]).get("database") == "main"]
            time.sleep(0.3)
        fingerprints = {r[0] for r in rows}
        assert len(fingerprints) == 2, rows
        for fp in fingerprints:
            _completed(intake, "pl-mixed", fp)
    finally:
        config_path.write_text(original)
        httpx.post(f"http://127.0.0.1:{am.port}/-/reload", timeout=10)
    assert intake.metric('runbook_intake_alerts_rejected_total{reason="label_value_too_long"}') >= 1
    assert intake.metric('runbook_intake_alerts_rejected_total{reason="invalid_target"}') >= 1


def test_healthz_reports_pending_without_reading_the_store(intake: Intake) -> None:
    health = httpx.get(f"{intake.url}/healthz", timeout=10).json()
    assert health["pending"] == intake.app.state.store.pending_count() >= 0

