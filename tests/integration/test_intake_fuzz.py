"""Property-based fuzz of the intake over real HTTP: no 5xx but the deliberate 503, no run from an invalid alert."""

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
    optional={"db": label_values, "job": label_values, "severity": st.sampled_from(["critical", "warning"])},
)
alerts = st.fixed_dictionaries({
    "status": st.sampled_from(["firing", "resolved", "bogus"]),
    "labels": labels,
    "startsAt": st.sampled_from(["2026-11-27T05:16:15.852Z", "yesterday", "2026-11-27T05:16:15Z"]),
    "fingerprint": st.text("0123456789abcdef", min_size=1, max_size=12).map(lambda s: FUZZ_FP + s),
}, optional={"annotations": st.dictionaries(st.sampled_from(["summary", "x"]), st.text(max_size=50), max_size=2),
             "endsAt": st.just("0001-01-01T00:00:00Z")})
webhooks = st.fixed_dictionaries({
    "version": st.sampled_from(["4", "4", "3"]),
    "status": st.sampled_from(["firing", "resolved"]),
    "alerts": st.lists(alerts, min_size=0, max_size=4),
}, optional={"receiver": st.text(max_size=10),
             "groupLabels": st.dictionaries(st.text(max_size=5), st.text(max_size=5))})


def _check(resp_code: int) -> None:
    assert resp_code < 500 or resp_code == 503, f"unexpected {resp_code}"


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=webhooks)
def test_structured_payloads(intake: Intake, doc: dict) -> None:
    _check(intake.post(doc).status_code)


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
