"""Notifications: Slack-compatible and generic JSON webhooks per alert route, Grafana annotations per remediation.

A notification never fails a run or an acknowledgement: delivery errors are returned (and logged), with the
webhook URL, which carries its token, masked.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

from runbook.engine.config import Environment, Notifier, Route
from runbook.engine.redact import redact

log = logging.getLogger(__name__)


def post_json(url: str, payload: dict[str, Any], timeout_s: float, headers: dict[str, str] | None = None) -> str:
    """POST JSON; '' on success, else a short secret-free reason."""
    try:
        resp = httpx.post(url, json=payload, timeout=timeout_s, headers=headers or {}, trust_env=False)
    except httpx.HTTPError as exc:
        return redact(f"{type(exc).__name__}: {exc}")[:300]
    if resp.status_code >= 300:
        return f"HTTP {resp.status_code}"
    return ""


def notify_route(route: Route, env: Environment, event: str, text: str, fields: dict[str, Any],
                 link: str | None = None) -> list[str]:
    """Send one event to every notifier of a route; returns the delivery errors (empty: all delivered)."""
    errors: list[str] = []
    for i, n in enumerate(route.notify):
        url = env.resolve_secret(n.url, f"routes[{route.name}].notify.{i}.url")
        error = post_json(url, _payload(n, route, event, text, fields, link), n.timeout_s)
        if error:
            log.warning("notification %s for route %r failed: %s", n.kind, route.name, error)
            errors.append(f"{n.kind}: {error}")
    return errors


def _payload(n: Notifier, route: Route, event: str, text: str, fields: dict[str, Any],
             link: str | None) -> dict[str, Any]:
    text = redact(text)
    if n.kind == "slack":
        suffix = f" <{link}|open the run>" if link else ""
        return {"text": f"[runbook] {route.name}: {text}{suffix}"}
    return {"source": "runbook", "event": event, "route": route.name, "procedure": route.procedure,
            "text": text, "link": link, "fields": {k: redact(str(v)) for k, v in fields.items()}}


def annotate_grafana(env: Environment, text: str, tags: list[str]) -> str:
    """One Grafana annotation (HTTP API); '' on success, else the reason. No Grafana configured: nothing."""
    if env.grafana is None:
        return ""
    headers = {}
    if env.grafana.token:
        headers["Authorization"] = f"Bearer {env.resolve_secret(env.grafana.token, 'grafana.token')}"
    return post_json(f"{env.grafana.url.rstrip('/')}/api/annotations",
                     {"time": int(time.time() * 1000), "tags": ["runbook", *tags], "text": redact(text)},
                     env.grafana.timeout_s, headers)
