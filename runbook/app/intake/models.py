"""What Alertmanager (webhook version 4) and Grafana-managed alerting (version 1) post, validated per alert.

Two levels, because Alertmanager does not retry a 4xx: a request that is not a webhook at all (not an object, no
``alerts`` list, an unknown version) is refused whole; inside a webhook each alert is accepted or rejected on its
own (``parse_webhook``), with a reason code for ``/metrics`` and a sentence for the response, so one odd alert never
loses the alerts grouped with it. What the senders really send is accepted: UTF-8 label names (``service.name``,
Prometheus 3 / Alertmanager 0.28+), ``null`` maps as empty, fields we do not use ignored (not even type-checked).
Sizes are bounded per alert: an alert over a bound is dropped, the rest of the group is not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

VERSIONS = {"4": "Alertmanager", "1": "Grafana"}
MAX_ALERTS = 1000  # per webhook; the rest are rejected one by one (too_many_alerts)
MAX_LABELS = 128
MAX_LABEL_NAME = 256
MAX_LABEL_VALUE = 4096
MAX_ANNOTATIONS = 128
MAX_ANNOTATION_VALUE = 16384


class Alert(BaseModel):
    """One alert, after its bounds were checked: the fields routing and the store use."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = {}
    startsAt: datetime  # noqa: N815 (the senders' field names)
    fingerprint: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{1,64}$")]


@dataclass(frozen=True)
class Rejection:
    """An alert dropped on its own: ``code`` is the /metrics reason, ``detail`` says what was wrong."""

    index: int
    code: str
    detail: str
    fingerprint: str = ""


@dataclass(frozen=True)
class ParsedWebhook:
    version: str
    alerts: list[tuple[int, Alert]]  # (position in the webhook, alert)
    rejected: list[Rejection]
    truncated: int  # alerts the sender left out (Alertmanager's max_alerts)

    @property
    def total(self) -> int:
        return len(self.alerts) + len(self.rejected)


class NotAWebhook(ValueError):
    """The request as a whole is not an Alertmanager or Grafana webhook (a 422: nothing in it can be used)."""


def parse_webhook(raw: object, max_alerts: int = MAX_ALERTS) -> ParsedWebhook:
    """Validate the envelope (raising NotAWebhook) and then every alert on its own."""
    if not isinstance(raw, dict):
        raise NotAWebhook(f"expected a JSON object, got {_kind(raw)}")
    version = raw.get("version")
    if not isinstance(version, str | int) or isinstance(version, bool) or str(version) not in VERSIONS:
        known = ", ".join(f"{v!r} ({who})" for v, who in VERSIONS.items())
        raise NotAWebhook(f"unsupported webhook version {_short(version)} (supported: {known})")
    alerts = raw.get("alerts")
    if alerts is None:
        alerts = []
    if not isinstance(alerts, list):
        raise NotAWebhook(f"'alerts' must be a list, got {_kind(alerts)}")
    accepted: list[tuple[int, Alert]] = []
    rejected: list[Rejection] = []
    for i, item in enumerate(alerts):
        if i >= max_alerts:
            rejected.append(Rejection(i, "too_many_alerts", f"alert {i + 1} of {len(alerts)}: only the first "
                                      f"{max_alerts} alerts of a webhook are processed (set max_alerts in the "
                                      "receiver)", _fingerprint_of(item)))
            continue
        result = parse_alert(i, item)
        if isinstance(result, Rejection):
            rejected.append(result)
        else:
            accepted.append((i, result))
    truncated = raw.get("truncatedAlerts")
    truncated = truncated if isinstance(truncated, int) and not isinstance(truncated, bool) and truncated > 0 else 0
    return ParsedWebhook(str(version), accepted, rejected, truncated)


def parse_alert(index: int, raw: object) -> Alert | Rejection:
    """One alert: its bounds first (cheap, and each has its own reason), then the fields routing needs."""
    if not isinstance(raw, dict):
        return Rejection(index, "not_an_object", f"an alert must be a JSON object, got {_kind(raw)}")
    fp = _fingerprint_of(raw)
    labels, annotations = _map(raw.get("labels")), _map(raw.get("annotations"))
    for kind, value, most, longest in (("label", labels, MAX_LABELS, MAX_LABEL_VALUE),
                                       ("annotation", annotations, MAX_ANNOTATIONS, MAX_ANNOTATION_VALUE)):
        problem = _out_of_bounds(kind, value, most, longest)
        if problem:
            return Rejection(index, *problem, fp)
    assert isinstance(labels, dict) and isinstance(annotations, dict)  # _out_of_bounds checked
    try:
        return Alert.model_validate({"status": raw.get("status"), "labels": labels, "annotations": annotations,
                                     "startsAt": raw.get("startsAt"),
                                     "fingerprint": _derived(labels) if raw.get("fingerprint") is None
                                     else raw["fingerprint"]})
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = str(err["loc"][0]) if err["loc"] else "alert"
        code = {"status": "invalid_status", "startsAt": "invalid_starts_at",
                "fingerprint": "invalid_fingerprint"}.get(field, "invalid_alert")
        return Rejection(index, code, f"{field}: {err['msg']} (got {_short(err.get('input'))})", fp)


def _out_of_bounds(kind: str, value: object, most: int, longest: int) -> tuple[str, str] | None:
    """(reason code, detail) when a label or annotation map is not a bounded map of strings, else None."""
    if not isinstance(value, dict):
        return f"invalid_{kind}", f"{kind}s must be an object, got {_kind(value)}"
    if len(value) > most:
        return f"too_many_{kind}s", f"{len(value)} {kind}s (limit {most})"
    for name, text in value.items():
        if not name or len(name) > MAX_LABEL_NAME:
            return (f"invalid_{kind}" if not name else f"{kind}_name_too_long",
                    f"{kind} name {_short(name)} is {len(name)} characters (1 to {MAX_LABEL_NAME})")
        if not isinstance(text, str):
            return f"invalid_{kind}", f"{kind} {_short(name)} must be a string, got {_kind(text)}"
        if len(text) > longest:
            return f"{kind}_value_too_long", f"{kind} {_short(name)} is {len(text)} characters (limit {longest})"
    return None


def _fingerprint_of(raw: object) -> str:
    """The sender's fingerprint when it is one (hex, bounded), for the response; '' otherwise."""
    fp = raw.get("fingerprint") if isinstance(raw, dict) else None
    if isinstance(fp, str) and 0 < len(fp) <= 64 and all(c in "0123456789abcdefABCDEF" for c in fp):
        return fp
    return "" if fp is None else str(fp)[:80]


def _map(value: object) -> object:
    """``null`` (Grafana and older senders send it for empty maps) is an empty map."""
    return {} if value is None else value


def _derived(labels: dict[str, Any]) -> str:
    """A fingerprint for a sender that sends none (a hand-written webhook): one per label set, as Alertmanager's."""
    return hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _short(value: object) -> str:
    """A value for an error message: bounded, and never a walk through a nested structure."""
    if isinstance(value, dict | list):
        return _kind(value)
    text = repr(value[:80] if isinstance(value, str) else value)
    return text if len(text) <= 80 else text[:77] + "..."
