"""What an alert's resolve does beyond cancelling a waiting run: it is recorded with the occurrence's run and the
run's status-page incident is resolved.

The resolve is written first (run input ``runbook-alert-resolved``, written once: a resent resolve finds it and does
nothing twice), then the incident is looked up; the engine checks the same records in the other order after opening
an incident, so an incident opened while the alert resolved is closed by one side or the other. A status-page
failure is a line in the result and the log, never an error for Alertmanager.
"""

from __future__ import annotations

import logging
from datetime import datetime

import httpx

from runbook.app.intake.store import Occurrence
from runbook.engine.config import Playbooks
from runbook.engine.errors import ConfigError
from runbook.engine.redact import redact
from runbook.engine.statuspage import (
    RECORD_KEY,
    RESOLVED_KEY,
    IncidentRecord,
    ResolvedRecord,
    StatusPageError,
    incident_update,
    parse_record,
    provider,
    subject_of,
)

log = logging.getLogger(__name__)
ALREADY_RESOLVED = "resolve already recorded"


def record_resolve(http: httpx.Client, playbooks: Playbooks, occ: Occurrence, at: datetime) -> str:
    """Record the resolve with the occurrence's run and resolve its incident; says what happened."""
    if not occ.flow_run_id:
        return "no run: nothing to record"
    resp = http.post(f"/flow_runs/{occ.flow_run_id}/input",
                     json={"key": RESOLVED_KEY, "value": ResolvedRecord(at=at).model_dump_json()})
    if resp.status_code == 409:
        return ALREADY_RESOLVED
    if resp.status_code >= 300:
        return f"could not record the resolve: HTTP {resp.status_code}"
    got = http.get(f"/flow_runs/{occ.flow_run_id}/input/{RECORD_KEY}")
    record = parse_record(got.text, IncidentRecord) if got.status_code == 200 else None
    if record is None:
        return "no status-page incident"
    try:
        env = playbooks.environment(occ.env)
        if env.status_page is None:
            return f"incident {record.incident_id}: environment {occ.env} has no status_page any more"
        provider(env).update(record.incident_id,
                             incident_update(env.status_page, subject_of(occ.params, occ.env), "resolved"))
    except (StatusPageError, ConfigError) as exc:
        reason = redact(str(exc))[:300]
        log.warning("status page: incident %s not resolved: %s", record.incident_id, reason)
        return f"status page: incident {record.incident_id} NOT resolved: {reason}"
    return f"status page: incident {record.incident_id} resolved"
