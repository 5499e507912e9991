"""Notifications: Slack-compatible and generic JSON webhooks per alert route, Grafana annotations per remediation.

A notification never fails a run or an acknowledgement: delivery errors are returned (and logged), with the
webhook URL, which carries its token, masked.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import httpx

from runbook.engine.config import Environment, Notifier, Route
from runbook.engine.findings import Report, Severity
from runbook.engine.redact import redact

log = logging.getLogger(__name__)

MAX_FINDINGS = 8  # a chat message people read during an outage: the worst few, and how many more there are
MAX_CHANGES = 10
MAX_LINE = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")


def post_json(url: str, payload: dict[str, Any], timeout_s: float, headers: dict[str, str] | None = None) -> str:
    """POST JSON; '' on success, else a short secret-free reason."""
    try:
        resp = httpx.post(url, json=payload, timeout=timeout_s, headers=headers or {}, trust_env=False)
    except httpx.HTTPError as exc:
        return redact(f"{type(exc).__name__}: {exc}")[:300]
    if resp.status_code >= 300:
        return f"HTTP {resp.status_code}"
    return ""


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """Text from findings, labels or targets as one bounded line, secrets masked: a hostile value cannot add lines
    or run on."""
    flat = _CONTROL.sub(" ", redact(str(text))).strip()
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def slack_escape(text: str) -> str:
    """Slack reads ``<...>`` as links and mentions (``<!channel>``): escape &, < and > in text we did not write."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def findings_lines(report: Report, limit: int = MAX_FINDINGS) -> list[str]:
    """The findings that matter (warning and above), worst first, at most ``limit`` and a count of the rest."""
    shown = sorted((f for f in report.findings if f.severity is not Severity.INFO), key=lambda f: -f.severity.rank)
    lines = [f"- {f.severity.value.upper()}: {one_line(f.title)} ({one_line(f.subject, 80)})" for f in shown[:limit]]
    if len(shown) > limit:
        lines.append(f"- … and {len(shown) - limit} more")
    return lines or ["- nothing above info"]


def changes_lines(report: Report, limit: int = MAX_CHANGES) -> list[str]:
    """The plan (dry run or not yet applied) or what changed, with verification and failures, bounded."""
    lines: list[str] = []
    for a in report.actions:
        done = a.applied if a.applied and not a.dry_run else []
        verb = "changed" if done else "would" if a.planned else ""
        for c in (done or a.planned)[:limit]:
            lines.append(f"- {verb}: {one_line(a.name, 60)}: {one_line(c.action, 60)} {one_line(c.subject, 120)}")
        if len(done or a.planned) > limit:
            lines.append(f"- … and {len(done or a.planned) - limit} more of {one_line(a.name, 60)}")
        if done:
            lines.append(f"  verified: {'yes' if a.verified else 'NO'}")
        for reason in (a.skipped_reason if a.planned and not done else "", a.error):
            if reason:
                lines.append(f"  {one_line(reason)}")
    return lines or ["- no change planned"]


def incident_detail(report: Report) -> str:
    """What the incident channel needs beyond one line: the findings that matter and the plan or what changed."""
    heading = ("Plan (DRY RUN, nothing changed):" if report.dry_run
               else "Changes:" if any(a.applied for a in report.actions) else "Plan:")
    return "\n".join(["Findings (worst first):", *findings_lines(report), heading, *changes_lines(report)])


def notify_route(route: Route, env: Environment, event: str, text: str, fields: dict[str, Any],
                 link: str | None = None, detail: str = "") -> list[str]:
    """Send one event to every notifier of a route; returns the delivery errors (empty: all delivered).
    ``detail`` (findings and plan, several lines) follows the one-line ``text``."""
    errors: list[str] = []
    for i, n in enumerate(route.notify):
        url = env.resolve_secret(n.url, f"routes[{route.name}].notify.{i}.url")
        error = post_json(url, _payload(n, route, event, text, fields, link, detail), n.timeout_s)
        if error:
            log.warning("notification %s for route %r failed: %s", n.kind, route.name, error)
            errors.append(f"{n.kind}: {error}")
    return errors


def _payload(n: Notifier, route: Route, event: str, text: str, fields: dict[str, Any],
             link: str | None, detail: str = "") -> dict[str, Any]:
    text, detail = redact(text), redact(detail)
    if n.kind == "slack":
        suffix = f" <{link}|open the run>" if link else ""
        body = slack_escape(f"[runbook] {route.name}: {text}") + suffix
        return {"text": body + (f"\n{slack_escape(detail)}" if detail else "")}
    return {"source": "runbook", "event": event, "route": route.name, "procedure": route.procedure,
            "text": text, "detail": detail, "link": link, "fields": {k: redact(str(v)) for k, v in fields.items()}}


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
