"""The status page (the runbook's "Update status page"): a small provider adapter and the records that make it
idempotent.

A provider is anything with ``create``, ``update`` and ``status`` (the ``StatusPage`` protocol); ``Statuspage`` speaks
Atlassian Statuspage's REST shape, the common one. Every request has its own timeout, and every failure is a
``StatusPageError`` whose message carries no secret: callers turn it into a warning finding, never a failed run.

One incident per alert occurrence: the incident's id is stored with the occurrence's flow run (run input
``runbook-status-page``, written once: the server refuses a second write), so a retry, a resend or a run resumed after
approval updates that incident instead of opening another. The intake records the alert's resolve beside it
(``runbook-alert-resolved``), so a run still diagnosing when the alert resolved opens nothing afterwards.
No Prefect import: the intake reads and writes these records over the REST API, the engine through its client.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

import httpx
from pydantic import BaseModel, Field, ValidationError

from runbook.engine.config import Environment, Route, StatusPageConfig
from runbook.engine.errors import RunbookError
from runbook.engine.redact import redact

IncidentStatus = Literal["investigating", "identified", "monitoring", "resolved"]
RANK: dict[str, int] = {"investigating": 0, "identified": 1, "monitoring": 2, "resolved": 3}
# the page's component while the incident is in each status (Statuspage's component status names)
COMPONENT_STATUS: dict[str, str] = {"investigating": "major_outage", "identified": "major_outage",
                                    "monitoring": "degraded_performance", "resolved": "operational"}
# what customers read: nothing internal (no container, host or finding text ever reaches a public page)
PUBLIC_TEXT: dict[str, str] = {
    "investigating": "We are investigating a problem with {service}.",
    "identified": "The cause has been identified and a fix is being put in place for {service}.",
    "monitoring": "A fix has been applied to {service}; we are monitoring the recovery.",
    "resolved": "{service} has recovered. This incident has been resolved.",
}
RECORD_KEY = "runbook-status-page"
RESOLVED_KEY = "runbook-alert-resolved"
OCCURRENCE_PREFIX = "occurrence:"
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
M = TypeVar("M", bound=BaseModel)


class StatusPageError(RunbookError):
    """A status-page request failed or was refused; the message is secret-free and short."""


class IncidentUpdate(BaseModel):
    """What a provider is asked to show: the public name, status, text and the components' statuses."""

    name: str
    status: IncidentStatus
    body: str
    components: dict[str, str] = Field(default_factory=dict, description="component id -> component status")


class IncidentRecord(BaseModel):
    """Stored with the occurrence's run once its incident exists."""

    provider: str
    page_id: str
    incident_id: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class ResolvedRecord(BaseModel):
    """Stored with the occurrence's run by the intake when the alert resolves (first, so a run still diagnosing
    sees it; written once, so a resent resolve does nothing twice)."""

    at: datetime


class StatusPage(Protocol):
    """A status-page provider: open an incident, move it on, read where it stands."""

    def create(self, update: IncidentUpdate) -> str: ...

    def update(self, incident_id: str, update: IncidentUpdate) -> None: ...

    def status(self, incident_id: str) -> str: ...


class Statuspage:
    """Atlassian Statuspage's REST API (v1): incidents under ``/v1/pages/{page_id}``, ``Authorization: OAuth key``."""

    name = "statuspage"

    def __init__(self, url: str, page_id: str, api_key: str, timeout_s: float) -> None:
        self.base = f"{url.rstrip('/')}/v1/pages/{page_id}"
        self.page_id = page_id
        self._headers = {"Authorization": f"OAuth {api_key}"}
        self.timeout_s = timeout_s

    def create(self, update: IncidentUpdate) -> str:
        doc = self._call("POST", "/incidents", {"incident": _incident_body(update)})
        return _checked_id(doc.get("id"))

    def update(self, incident_id: str, update: IncidentUpdate) -> None:
        self._call("PATCH", f"/incidents/{_checked_id(incident_id)}", {"incident": _incident_body(update)})

    def status(self, incident_id: str) -> str:
        return str(self._call("GET", f"/incidents/{_checked_id(incident_id)}", None).get("status", ""))

    def _call(self, method: str, path: str, body: dict[str, object] | None) -> dict[str, object]:
        try:
            resp = httpx.request(method, self.base + path, json=body, headers=self._headers,
                                 timeout=self.timeout_s, trust_env=False)
        except httpx.HTTPError as exc:
            raise StatusPageError(redact(f"{method} {path}: {type(exc).__name__}: {exc}")[:300]) from None
        if resp.status_code >= 300:
            raise StatusPageError(f"{method} {path}: HTTP {resp.status_code}")
        try:
            doc = resp.json()
        except ValueError:
            raise StatusPageError(f"{method} {path}: the answer is not JSON") from None
        if not isinstance(doc, dict):
            raise StatusPageError(f"{method} {path}: the answer is not an incident")
        return doc


def _incident_body(update: IncidentUpdate) -> dict[str, object]:
    body: dict[str, object] = {"name": update.name, "status": update.status, "body": update.body}
    if update.components:
        body["components"] = dict(update.components)
        body["component_ids"] = list(update.components)
    return body


def _checked_id(value: object) -> str:
    """An incident id goes into a URL path: only what Statuspage's ids look like."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise StatusPageError("the status page answered without a usable incident id")
    return value


def provider(env: Environment) -> StatusPage:
    """The environment's provider, its key resolved (MissingSecret when absent)."""
    cfg = env.status_page
    if cfg is None:
        raise StatusPageError(f"environment {env.name!r} has no status_page")
    key = env.resolve_secret(cfg.api_key, "status_page.api_key")
    return Statuspage(cfg.url, cfg.page_id, key, cfg.timeout_s)


def wanted(env: Environment, route: Route | None, procedure: str) -> bool:
    """Whether a run of ``procedure`` through ``route`` updates the status page: the route's ``status_page`` if set,
    else whether the environment lists the procedure."""
    if env.status_page is None:
        return False
    if route is not None and route.status_page is not None:
        return route.status_page
    return procedure in env.status_page.procedures


def incident_update(cfg: StatusPageConfig, service: str, status: IncidentStatus) -> IncidentUpdate:
    """The public incident for ``service`` in ``status`` (its component, if mapped, marked accordingly)."""
    component = cfg.components.get(service)
    return IncidentUpdate(name=f"{cfg.incident_name}: {service}", status=status,
                          body=PUBLIC_TEXT[status].format(service=service),
                          components={component: COMPONENT_STATUS[status]} if component else {})


def subject_of(params: Mapping[str, Any], env_name: str) -> str:
    """What a run is about, on the public page: its service (or database) parameter, else its environment."""
    for key in ("service", "database"):
        value = params.get(key)
        if isinstance(value, str) and value:
            return value
    return env_name


def occurrence_of(tags: list[str]) -> str | None:
    """The alert occurrence a run was created for (the intake's ``occurrence:KEY`` tag)."""
    return next((t.removeprefix(OCCURRENCE_PREFIX) for t in tags if t.startswith(OCCURRENCE_PREFIX)), None)


def parse_record(raw: str, model: type[M]) -> M | None:
    """A record stored with a run (Prefect keeps inputs JSON-encoded, sometimes twice); None when not one of ours."""
    try:
        value: Any = json.loads(raw)
        if isinstance(value, str):
            value = json.loads(value)
        return model.model_validate(value)
    except (ValueError, ValidationError):
        return None
