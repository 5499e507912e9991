"""Property-based fuzz of the intake over real HTTP: no 5xx but the deliberate 503, a webhook is answered alert by
alert (every alert has its result, an invalid one is rejected alone), no run from an invalid alert."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.intake_harness import Intake, running_intake

pytestmark = pytest.mark.integration

FUZZ_FP = "f0f0"  # every generated fingerprint starts with this, so the store can be asked about them alone


@pytest.fixture(scope="module")
def intake(sandbox_state, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Intake]:  # noqa: ANN001
    with running_intake(sandbox_state, tmp_path_factory.mktemp("fuzz"), executor=False) as it:
        yield it


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)
label_values = st.text(max_size=60).filter(lambda v: v != "main")
labels = st.fixed_dictionaries(
    {"alertname": st.sampled_from(["DatabaseConnectionHigh", "DbCooldownTest", "DbApproveTest", "Other"])},
    optional={"db": label_values, "job": label_values, "severity": st.sampled_from(["critical", "warning"]),
              "service.name": label_values, "k8s.pod.name": label_values},  # UTF-8 names (Prometheus 3)
).flatmap(lambda fixed: st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=20), max_size=3)
          .map(lambda extra: {**extra, **fixed}))
VALID_STATUS, VALID_STARTS = {"firing", "resolved"}, {"2026-11-27T05:16:15.852Z", "2026-11-27T05:16:15Z"}
alerts = st.fixed_dictionaries({
    "status": st.sampled_from(["firing", "resolved", "bogus"]),
    "labels": labels | st.none(),
    "startsAt": st.sampled_from([*sorted(VALID_STARTS), "yesterday"]),
    "fingerprint": st.text("0123456789abcdef", min_size=1, max_size=12).map(lambda s: FUZZ_FP + s),
}, optional={"annotations": st.dictionaries(st.sampled_from(["summary", "x"]), st.text(max_size=50), max_size=2)
             | st.none(),
             "endsAt": st.just("0001-01-01T00:00:00Z"),
             "values": json_values})  # Grafana's extra fields: ignored whatever they hold
webhooks = st.fixed_dictionaries({
    "version": st.sampled_from(["4", "4", "1", "3"]),
    "status": st.sampled_from(["firing", "resolved"]),
    "alerts": st.lists(alerts | json_values, min_size=0, max_size=4),
}, optional={"receiver": st.text(max_size=10),
             "groupLabels": st.dictionaries(st.text(max_size=5), st.text(max_size=5)) | st.none(),
             "commonLabels": st.none()})


def _check(resp_code: int) -> None:
    assert resp_code < 500 or resp_code == 503, f"unexpected {resp_code}"


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=webhooks)
def test_structured_payloads(intake: Intake, doc: dict) -> None:
    resp = intake.post(json.dumps(doc).encode())  # Python's JSON: Infinity and NaN literals included
    _check(resp.status_code)
    if doc["version"] == "3":
        assert resp.status_code == 422
        return
    assert resp.status_code in (200, 503)
    if resp.status_code == 503:
        return
    body = resp.json()
    assert body["alerts"] == len(doc["alerts"]) == body["accepted"] + body["rejected"]
    assert {r["index"] for r in body["results"]} == set(range(len(doc["alerts"]))), "an alert without a result"
    for r in body["results"]:
        sent = doc["alerts"][r["index"]]
        if not isinstance(sent, dict) or sent.get("status") not in VALID_STATUS \
                or sent.get("startsAt") not in VALID_STARTS:
            assert r["outcome"] == "rejected" and r["code"], r


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=json_values)
def test_arbitrary_json(intake: Intake, doc: object) -> None:
    resp = intake.post(json.dumps(doc).encode())
    _check(resp.status_code)
    assert resp.status_code != 200 or isinstance(doc, dict)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes(intake: Intake, raw: bytes) -> None:
    _check(intake.post(raw).status_code)


def test_no_run_was_created_from_any_invalid_alert(intake: Intake) -> None:
    rows = intake.app.state.store._db.execute(  # the intake's own record of what it accepted
        "SELECT status, count(*) FROM occurrences WHERE fingerprint LIKE ? GROUP BY status", (FUZZ_FP + "%",)
    ).fetchall()
    assert [tuple(r) for r in rows] == []
