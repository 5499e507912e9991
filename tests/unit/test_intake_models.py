"""Webhook validation per alert (runbook.app.intake.models): what the senders really send is accepted, an odd alert
is rejected on its own with its reason, and only what is not a webhook at all is refused whole."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from runbook.app.intake.models import (
    MAX_ANNOTATION_VALUE,
    MAX_LABEL_NAME,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    NotAWebhook,
    Rejection,
    parse_alert,
    parse_webhook,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def _alert(**changes: Any) -> dict[str, Any]:
    a = copy.deepcopy(_load("alertmanager/servicedown-firing.json")["alerts"][0])
    a.update(changes)
    return a


@pytest.mark.parametrize("name", ["alertmanager/servicedown-firing.json", "alertmanager/servicedown-resolved.json",
                                  "alertmanager/utf8-firing-0.28.json", "grafana/firing-v1.json"])
def test_the_senders_payloads_are_accepted_whole(name: str) -> None:
    doc = _load(name)
    hook = parse_webhook(doc)
    assert hook.rejected == []
    assert [a.fingerprint for _, a in hook.alerts] == [a["fingerprint"] for a in doc["alerts"]]


def test_utf8_label_names_and_grafana_extras_reach_routing_unchanged() -> None:
    am = parse_webhook(_load("alertmanager/utf8-firing-0.28.json")).alerts[0][1]
    assert am.labels["service.name"] == "pafar-db" and am.labels["k8s.pod.name"] == "pafar-db-0"
    grafana = parse_webhook(_load("grafana/firing-v1.json"))
    assert grafana.version == "1"
    assert grafana.alerts[1][1].annotations == {}  # "annotations": null


def test_null_maps_are_empty_and_unused_fields_are_not_checked() -> None:
    doc = _load("alertmanager/servicedown-firing.json")
    doc.update(groupLabels=None, commonLabels=None, commonAnnotations=None, groupKey=["odd"], receiver=None,
               status="whatever", somethingNew={"nested": [[[1]]]})
    doc["alerts"][0].update(annotations=None, endsAt=None, generatorURL=None, silenceURL=5)
    hook = parse_webhook(doc)
    assert hook.rejected == [] and hook.alerts[0][1].annotations == {}
    doc["alerts"][0]["labels"] = None
    assert parse_webhook(doc).alerts[0][1].labels == {}
    assert parse_webhook({"version": "4", "alerts": None}).total == 0


@pytest.mark.parametrize(("change", "code"), [
    ({"labels": {f"l{i}": "x" for i in range(MAX_LABELS + 1)}}, "too_many_labels"),
    ({"labels": {"alertname": "X", "db": "a" * (MAX_LABEL_VALUE + 1)}}, "label_value_too_long"),
    ({"labels": {"alertname": "X", "n" * (MAX_LABEL_NAME + 1): "x"}}, "label_name_too_long"),
    ({"labels": {"alertname": "X", "": "x"}}, "invalid_label"),
    ({"labels": {"alertname": 5}}, "invalid_label"),
    ({"labels": ["alertname"]}, "invalid_label"),
    ({"annotations": {"summary": "s" * (MAX_ANNOTATION_VALUE + 1)}}, "annotation_value_too_long"),
    ({"annotations": {f"a{i}": "x" for i in range(200)}}, "too_many_annotations"),
    ({"annotations": {"summary": {"text": "x"}}}, "invalid_annotation"),
    ({"status": "bogus"}, "invalid_status"),
    ({"startsAt": "yesterday"}, "invalid_starts_at"),
    ({"startsAt": None}, "invalid_starts_at"),
    ({"fingerprint": "not-hex!"}, "invalid_fingerprint"),
    ({"fingerprint": 12}, "invalid_fingerprint"),
])
def test_an_alert_out_of_bounds_is_rejected_alone_with_its_reason(change: dict[str, Any], code: str) -> None:
    doc = _load("alertmanager/servicedown-firing.json")
    good = doc["alerts"][0]
    doc["alerts"] = [good, _alert(**change), {**good, "fingerprint": "abcdef01"}]
    hook = parse_webhook(doc)
    assert [i for i, _ in hook.alerts] == [0, 2], "the valid alerts beside it are kept"
    assert len(hook.rejected) == 1
    rejected = hook.rejected[0]
    assert (rejected.index, rejected.code) == (1, code)
    assert len(rejected.detail) < 400, "the reason is bounded, whatever the input"


def test_not_an_object_and_a_missing_fingerprint() -> None:
    assert parse_alert(3, ["x"]) == Rejection(3, "not_an_object", "an alert must be a JSON object, got a list")
    alert = parse_alert(0, _alert(fingerprint=None))
    assert not isinstance(alert, Rejection)
    assert alert.fingerprint == parse_alert(0, _alert(fingerprint=None)).fingerprint  # type: ignore[union-attr]


def test_more_alerts_than_the_limit_keeps_the_first_and_rejects_the_rest_one_by_one() -> None:
    doc = _load("alertmanager/servicedown-firing.json")
    doc["alerts"] = [{**doc["alerts"][0], "fingerprint": f"{i:08x}"} for i in range(7)]
    doc["truncatedAlerts"] = 12
    hook = parse_webhook(doc, max_alerts=5)
    assert [i for i, _ in hook.alerts] == [0, 1, 2, 3, 4]
    assert [(r.index, r.code, r.fingerprint) for r in hook.rejected] == [
        (5, "too_many_alerts", "00000005"), (6, "too_many_alerts", "00000006")]
    assert "only the first 5 alerts" in hook.rejected[0].detail
    assert hook.truncated == 12 and hook.total == 7


@pytest.mark.parametrize(("doc", "said"), [
    ([], "expected a JSON object, got a list"),
    ("alerts", "expected a JSON object, got a string"),
    ({"alerts": []}, "unsupported webhook version None"),
    ({"version": "3", "alerts": []}, "unsupported webhook version '3'"),
    ({"version": True, "alerts": []}, "unsupported webhook version True"),
    ({"version": "4", "alerts": "nope"}, "'alerts' must be a list, got a string"),
    ({"version": "4", "alerts": {"0": {}}}, "'alerts' must be a list, got an object"),
])
def test_only_what_is_not_a_webhook_is_refused_whole(doc: object, said: str) -> None:
    with pytest.raises(NotAWebhook, match=said.replace("(", r"\(")):
        parse_webhook(doc)
