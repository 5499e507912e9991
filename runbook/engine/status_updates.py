"""Driving the status page from a run: investigating when the diagnosis finds something down, identified when a
remediation is planned, monitoring when it is applied and verified. The intake resolves it when the alert resolves.

Only runs an alert started (tag ``occurrence:KEY``) open incidents: an incident needs the alert's resolve to close
it, and an operator re-running a diagnosis must not announce a second outage. Statuses only move forward (a run
resumed after approval repeats its diagnosis, which must not set "identified" back to "investigating"). Nothing here
fails a run: every failure becomes a warning finding saying the page was not updated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.exceptions import PrefectHTTPStatusError
from pydantic import BaseModel

from runbook.engine.approval import read_run_input
from runbook.engine.config import Environment, Route
from runbook.engine.errors import ConfigError
from runbook.engine.findings import Finding, Report, Severity
from runbook.engine.redact import redact
from runbook.engine.statuspage import (
    RANK,
    RECORD_KEY,
    RESOLVED_KEY,
    IncidentRecord,
    IncidentStatus,
    ResolvedRecord,
    StatusPageError,
    incident_update,
    occurrence_of,
    parse_record,
    provider,
    wanted,
)

M = TypeVar("M", bound=BaseModel)


@dataclass
class StatusPageDriver:
    """One run's view of its occurrence's incident."""

    env: Environment
    report: Report
    run_id: UUID | None
    subject: str
    decide: Callable[[str], None]
    active: bool = False

    @classmethod
    def for_run(cls, env: Environment, report: Report, route: Route | None, tags: list[str], run_id: UUID | None,
                subject: str, decide: Callable[[str], None]) -> StatusPageDriver:
        driver = cls(env, report, run_id, subject, decide)
        if not wanted(env, route, report.procedure):
            return driver
        if occurrence_of(tags) is None or run_id is None:
            report.notes.append("status page: not updated (this run was not started by an alert, whose resolve "
                                "would close the incident)")
            return driver
        driver.active = True
        return driver

    def diagnosed(self) -> None:
        """Open the incident (investigating) when the diagnosis found something critical."""
        if self.report.worst is Severity.CRITICAL:
            self._advance("investigating", create=True)

    def planned(self, changes: int) -> None:
        if changes:
            self._advance("identified")

    def applied(self, changed: bool, verified: bool) -> None:
        if changed and verified:
            self._advance("monitoring")

    def _advance(self, status: IncidentStatus, create: bool = False) -> None:
        if not self.active:
            return
        try:
            self._move(status, create)
        except (StatusPageError, ConfigError, PrefectHTTPStatusError, httpx.HTTPError) as exc:
            self.active = False  # one warning per run, not one per stage
            reason = redact(str(exc))[:300]
            self.report.add(Finding(
                title=f"status page not updated ({status}): {reason}", severity=Severity.WARNING,
                subject="status page", aggregation_key="status-page"))
            self.decide(f"status page: not updated ({status}): {reason}")

    def _move(self, status: IncidentStatus, create: bool) -> None:
        assert self.run_id is not None and self.env.status_page is not None
        with get_client(sync_client=True) as client:
            if _read(client, self.run_id, RESOLVED_KEY, ResolvedRecord) is not None:
                self.decide(f"status page: left alone ({status}): the alert has already resolved")
                self.active = False
                return
            record = _read(client, self.run_id, RECORD_KEY, IncidentRecord)
            if record is None and not create:
                return  # no incident was opened (nothing was down): nothing to move on
            page = provider(self.env)
            update = incident_update(self.env.status_page, self.subject, status)
            if record is None:
                incident_id = page.create(update)
                record = IncidentRecord(provider=self.env.status_page.provider, page_id=self.env.status_page.page_id,
                                        incident_id=incident_id)
                client.create_flow_run_input(self.run_id, RECORD_KEY, record.model_dump_json())
                self.decide(f"status page: incident {incident_id} opened ({status})")
                # the intake writes the resolve before it looks for an incident: one that resolved while this was
                # being opened is seen here, and closed here
                if _read(client, self.run_id, RESOLVED_KEY, ResolvedRecord) is not None:
                    page.update(incident_id, incident_update(self.env.status_page, self.subject, "resolved"))
                    self.decide(f"status page: incident {incident_id} resolved (the alert resolved meanwhile)")
                    self.active = False
                return
            current = page.status(record.incident_id)
            if RANK.get(current, -1) >= RANK[status]:
                self.decide(f"status page: incident {record.incident_id} already {current}")
                return
            page.update(record.incident_id, update)
            self.decide(f"status page: incident {record.incident_id} {current or '?'} -> {status}")


def _read(client: SyncPrefectClient, run_id: UUID, key: str, model: type[M]) -> M | None:
    """A record stored with the run (run input), or None when there is none."""
    raw = read_run_input(client, run_id, key)
    return None if raw is None else parse_record(raw, model)
