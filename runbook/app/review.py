"""The post-incident review: what an alert's runs did, in order, with the figures, built from what Prefect recorded.

Everything comes from the Prefect API (plain REST, each call with a timeout): the runs tagged with the alert's
occurrence (or fingerprint), their state history, their steps (``plan-*`` is the end of the diagnosis, ``apply-*``
the change and its verification), the report each run stored (findings, changes, decisions and who took them), the
plan shown for approval, the status-page incident and the resolve the intake recorded. Nothing is inferred from
logs. The review is JSON (the intake's /metrics reads it), a markdown document and a Prefect markdown artifact.

Times: the alert's start (``alert-starts-at:`` tag, else the first run's creation); first diagnosis = the first run's
first ``plan-`` step (or its end, when it plans nothing); remediation = the end of the first ``apply-`` step that
changed something; recovery = the end of the first apply whose change was verified, else the alert's resolve.
Text from labels, findings and approvers is one bounded line, masked and markdown-escaped: it cannot add headings,
links, HTML or lines to the review.
"""

from __future__ import annotations

import html
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, Field, ValidationError

from runbook.engine.decisions import PlanView, parse_plan_input
from runbook.engine.errors import BadInput, RunbookError
from runbook.engine.notify import one_line
from runbook.engine.run_inputs import PLAN_INPUT_KEY, REPORT_INPUT_KEY
from runbook.engine.statuspage import (
    OCCURRENCE_PREFIX,
    RECORD_KEY,
    RESOLVED_KEY,
    IncidentRecord,
    ResolvedRecord,
    parse_record,
)

FINGERPRINT_PREFIX = "fingerprint:"
STARTS_AT_PREFIX = "alert-starts-at:"
ALERT_PREFIX = "alert:"
ROUTE_PREFIX = "route:"
MAX_RUNS = 50
MAX_LINES = 12  # findings / changes listed per run
_OCCURRENCE = re.compile(r"^[0-9a-f]{32}$")
_FINGERPRINT = re.compile(r"^[0-9a-fA-F]{1,64}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_APPROVED = re.compile(r"^approved by (?P<who>[^()]+) \((?P<how>[^()]*)\)(?:: (?P<why>.*))?$", re.S)
_REFUSED = re.compile(r"^approval not given(?: by (?P<who>[^:]+))?: (?P<why>.*)$", re.S)
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#!|~])")  # never at a line's start here: no - + or digits needed
M = TypeVar("M", bound=BaseModel)
Kind = Literal["alert", "state", "diagnosis", "approval-asked", "approval", "change", "verify", "status-page",
               "recovered", "resolved"]


class ReviewError(RunbookError):
    """The Prefect API could not be read, or nothing matches what was asked for."""


class Event(BaseModel):
    at: datetime
    kind: Kind
    text: str
    run_id: str = ""
    state: str = Field("", description="kind 'state': the state's name, as Prefect recorded it")


class RunSummary(BaseModel):
    id: str
    name: str
    procedure: str
    state: str
    created: datetime | None
    findings: list[str] = Field(default_factory=list)
    changes: list[str] = Field(default_factory=list)
    decisions: list[str] = Field(default_factory=list)


class Figures(BaseModel):
    time_to_first_diagnosis_s: float | None = None
    time_to_remediate_s: float | None = None
    time_to_recover_s: float | None = None
    time_to_resolve_s: float | None = None


class Review(BaseModel):
    occurrence: str
    alertname: str
    fingerprint: str
    route: str
    procedure: str
    alert_started: datetime
    diagnosed_at: datetime | None = None
    remediated_at: datetime | None = None
    recovered_at: datetime | None = None
    recovery: str = Field("", description="how recovery is known: a verified change, or the alert's resolve")
    resolved_at: datetime | None = None
    status_page_incident: str = ""
    figures: Figures
    runs: list[RunSummary]
    timeline: list[Event]
    generated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def name(self) -> str:
        """The files' and the artifact's name."""
        return f"incident-review-{self.occurrence[:32]}"


# ------------------------------------------------------------------ finding the runs


def find_runs(http: httpx.Client, ident: str) -> list[dict[str, Any]]:
    """The runs one alert occurrence caused, oldest first. ``ident``: an occurrence key (32 hex), a flow run id
    (its occurrence's runs, or that run alone) or an alert fingerprint (its most recent occurrence)."""
    ident = ident.strip()
    if _UUID.fullmatch(ident):
        run = _get(http, f"/flow_runs/{ident}", f"flow run {ident}")
        occurrence = _tag(run.get("tags") or [], OCCURRENCE_PREFIX)
        return _by_tag(http, f"{OCCURRENCE_PREFIX}{occurrence}") if occurrence else [run]
    if _OCCURRENCE.fullmatch(ident):
        runs = _by_tag(http, f"{OCCURRENCE_PREFIX}{ident}")
        if runs:
            return runs
    if _FINGERPRINT.fullmatch(ident):
        runs = _by_tag(http, f"{FINGERPRINT_PREFIX}{ident}")
        if runs:
            latest = max(runs, key=lambda r: (_tag(r.get("tags") or [], STARTS_AT_PREFIX) or "", r["created"]))
            occurrence = _tag(latest.get("tags") or [], OCCURRENCE_PREFIX)
            return [r for r in runs if _tag(r.get("tags") or [], OCCURRENCE_PREFIX) == occurrence]
    if not (_UUID.fullmatch(ident) or _OCCURRENCE.fullmatch(ident) or _FINGERPRINT.fullmatch(ident)):
        raise BadInput(f"{one_line(ident, 80)!r} is not a flow run id, an occurrence key or an alert fingerprint")
    raise BadInput(f"no run found for {ident} (an occurrence key, an alert fingerprint or a flow run id)")


def _by_tag(http: httpx.Client, tag: str) -> list[dict[str, Any]]:
    resp = _call(http, "POST", "/flow_runs/filter",
                 {"flow_runs": {"tags": {"all_": [tag]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": MAX_RUNS})
    runs: list[dict[str, Any]] = resp.json()
    return sorted(runs, key=lambda r: r["created"])


# ------------------------------------------------------------------ building


def build_review(http: httpx.Client, runs: list[dict[str, Any]]) -> Review:
    """The review of these runs (one occurrence's), from their states, steps and stored records."""
    if not runs:
        raise ReviewError("no runs to review")
    tags = runs[0].get("tags") or []
    occurrence = _tag(tags, OCCURRENCE_PREFIX) or str(runs[0]["id"])
    started_tag = _tag(tags, STARTS_AT_PREFIX)
    alert_started = parse_time(started_tag) if started_tag else parse_time(runs[0]["created"])
    timeline = [Event(at=alert_started, kind="alert",
                      text=f"{one_line(_tag(tags, ALERT_PREFIX) or '?')} started firing")]
    summaries: list[RunSummary] = []
    diagnosed: list[datetime] = []
    changed: list[datetime] = []
    verified: list[tuple[datetime, str]] = []
    resolved_at: datetime | None = None
    incident = ""
    procedure = ""
    for run in runs:
        run_id = str(run["id"])
        states = _call(http, "GET", "/flow_run_states/", params={"flow_run_id": run_id}).json()
        states.sort(key=lambda s: s["timestamp"])
        steps = _call(http, "POST", "/task_runs/filter", {
            "flow_runs": {"id": {"any_": [run_id]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 200}).json()
        report = _report(http, run_id)
        plan = _plan(http, run_id)
        procedure = procedure or str((report or {}).get("procedure") or _flow_name(http, run))
        for s in states:
            message = f" ({one_line(s['message'], 120)})" if s.get("message") else ""
            timeline.append(Event(at=parse_time(s["timestamp"]), kind="state", run_id=run_id, state=s["name"],
                                  text=one_line(s["name"], 40) + message))
        summary = _summarise(run, states, report)
        summaries.append(summary)
        plan_steps = [t for t in steps if str(t.get("name", "")).startswith("plan-") and t.get("start_time")]
        end = next((parse_time(s["timestamp"]) for s in states if s["type"] in {"COMPLETED", "FAILED", "CRASHED"}),
                   None)
        diag_at = parse_time(plan_steps[0]["start_time"]) if plan_steps else end
        if diag_at is not None and report is not None:
            diagnosed.append(diag_at)
            timeline.append(Event(at=diag_at, kind="diagnosis", run_id=run_id,
                                  text=f"{len(report.get('findings') or [])} finding(s), worst "
                                       f"{one_line(str(report.get('worst_severity', '?')), 20)}"
                                       + "".join(f"; {f}" for f in summary.findings[:3])))
        if plan is not None:
            timeline.append(Event(at=plan.asked_at, kind="approval-asked", run_id=run_id,
                                  text=f"approval asked for {len(plan.changes)} change(s): "
                                       + "; ".join(one_line(c, 120) for c in plan.changes[:5])))
            decided = _resumed_at(states)
            for line in summary.decisions:
                if decided is not None:
                    timeline.append(Event(at=decided, kind="approval", run_id=run_id, text=line))
        for event in _changes(steps, report, run_id):
            timeline.append(event)
            if event.kind == "change":
                changed.append(event.at)
            elif event.kind == "verify" and event.text.endswith("verified: yes"):
                verified.append((event.at, run_id))
        record = _input(http, run_id, RECORD_KEY, IncidentRecord)
        if record is not None:
            incident = incident or record.incident_id
            timeline.append(Event(at=record.created_at, kind="status-page", run_id=run_id,
                                  text=f"incident {record.incident_id} opened"))
        resolved = _input(http, run_id, RESOLVED_KEY, ResolvedRecord)
        if resolved is not None:
            resolved_at = min(resolved_at or resolved.at, resolved.at)
    recovered_at, recovery = (min(verified)[0], f"verified by run {min(verified)[1]}") if verified else (
        (resolved_at, "the alert resolved") if resolved_at else (None, ""))
    if recovered_at is not None:
        timeline.append(Event(at=recovered_at, kind="recovered", text=recovery))
    if resolved_at is not None:
        timeline.append(Event(at=resolved_at, kind="resolved", text="the alert resolved"))
    timeline.sort(key=lambda e: (e.at, e.kind == "alert"))

    def since(t: datetime | None) -> float | None:
        return round((t - alert_started).total_seconds(), 3) if t else None

    first = min(diagnosed) if diagnosed else None
    remediated = min(changed) if changed else None
    return Review(
        occurrence=occurrence, alertname=one_line(_tag(tags, ALERT_PREFIX) or "", 100),
        fingerprint=_tag(tags, FINGERPRINT_PREFIX) or "", route=_tag(tags, ROUTE_PREFIX) or "",
        procedure=procedure, alert_started=alert_started, diagnosed_at=first, remediated_at=remediated,
        recovered_at=recovered_at, recovery=recovery, resolved_at=resolved_at, status_page_incident=incident,
        figures=Figures(time_to_first_diagnosis_s=since(first), time_to_remediate_s=since(remediated),
                        time_to_recover_s=since(recovered_at), time_to_resolve_s=since(resolved_at)),
        runs=summaries, timeline=timeline,
    )


def _summarise(run: dict[str, Any], states: list[dict[str, Any]], report: dict[str, Any] | None) -> RunSummary:
    findings = sorted((f for f in (report or {}).get("findings") or [] if f.get("severity") != "info"),
                      key=lambda f: f.get("severity") != "critical")
    changes = [f"{one_line(a.get('name', ''), 60)}: {one_line(c.get('action', ''), 40)} "
               f"{one_line(c.get('subject', ''), 120)}"
               for a in (report or {}).get("actions") or [] for c in (a.get("applied") or [])]
    # who approved, how and why (the report's note), or who refused and why (the runner's decision line)
    decisions = [one_line(line) for line in (report or {}).get("notes") or [] if _APPROVED.match(line)]
    decisions += [one_line(line) for line in (report or {}).get("audit") or [] if _REFUSED.match(line)]
    state = (run.get("state") or {}).get("name") or (states[-1]["name"] if states else "?")
    return RunSummary(
        id=str(run["id"]), name=one_line(run.get("name") or "", 80), procedure=str((report or {}).get("procedure", "")),
        state=one_line(state, 40), created=parse_time(run["created"]) if run.get("created") else None,
        findings=[f"{one_line(f.get('severity', ''), 10).upper()}: {one_line(f.get('title', ''))}"
                  for f in findings[:MAX_LINES]],
        changes=changes[:MAX_LINES], decisions=decisions)


def _changes(steps: list[dict[str, Any]], report: dict[str, Any] | None, run_id: str) -> list[Event]:
    """Each applied change and its verification, at the end of the apply step that made them."""
    ends = {str(t["name"]).removeprefix("apply-"): parse_time(t["end_time"]) for t in steps
            if str(t.get("name", "")).startswith("apply-") and t.get("end_time")}
    events: list[Event] = []
    for a in (report or {}).get("actions") or []:
        at = ends.get(str(a.get("name")))
        if at is None or not a.get("applied"):
            continue
        for c in a["applied"]:
            events.append(Event(at=at, kind="change", run_id=run_id,
                                text=f"{one_line(a['name'], 60)}: {one_line(c.get('action', ''), 40)} "
                                     f"{one_line(c.get('subject', ''), 120)}"))
        detail = f" ({one_line(a['detail'], 160)})" if a.get("detail") else ""
        error = f"; FAILED: {one_line(a['error'], 160)}" if a.get("error") else ""
        outcome = "yes" if a.get("verified") else "no"
        events.append(Event(at=at, kind="verify", run_id=run_id,
                            text=f"{one_line(a['name'], 60)}{detail}{error}; verified: {outcome}"))
    return events


def _resumed_at(states: list[dict[str, Any]]) -> datetime | None:
    """When the run left its approval wait: the first state after its first PAUSED one."""
    for before, after in zip(states, states[1:], strict=False):
        if before["type"] == "PAUSED" and after["type"] != "PAUSED":
            return parse_time(after["timestamp"])
    return None


def _report(http: httpx.Client, run_id: str) -> dict[str, Any] | None:
    resp = _call(http, "GET", f"/flow_runs/{run_id}/input/{REPORT_INPUT_KEY}", ok=(200, 404))
    if resp.status_code != 200:
        return None
    try:
        value = json.loads(resp.text)
        value = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _plan(http: httpx.Client, run_id: str) -> PlanView | None:
    resp = _call(http, "GET", f"/flow_runs/{run_id}/input/{PLAN_INPUT_KEY}", ok=(200, 404))
    return parse_plan_input(resp.text) if resp.status_code == 200 else None


def _input(http: httpx.Client, run_id: str, key: str, model: type[M]) -> M | None:
    resp = _call(http, "GET", f"/flow_runs/{run_id}/input/{key}", ok=(200, 404))
    return parse_record(resp.text, model) if resp.status_code == 200 else None


def _flow_name(http: httpx.Client, run: dict[str, Any]) -> str:
    resp = _call(http, "GET", f"/flows/{run['flow_id']}", ok=(200, 404))
    return str(resp.json().get("name", "")) if resp.status_code == 200 else ""


# ------------------------------------------------------------------ rendering and publishing


def md(text: str) -> str:
    """Text we did not write, safe inside markdown: one line, masked, HTML and markdown syntax escaped."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(one_line(text, 300), quote=False))


def to_markdown(review: Review) -> str:
    f = review.figures

    def secs(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f} s"

    lines = [f"# Post-incident review: {md(review.alertname or review.occurrence)}", "",
             f"Procedure **{md(review.procedure)}**, route **{md(review.route or '-')}**, occurrence "
             f"`{review.occurrence}`" + (f", fingerprint `{review.fingerprint}`" if review.fingerprint else ""), "",
             "| figure | value |", "| --- | --- |",
             f"| alert started | {review.alert_started.isoformat()} |",
             f"| time to first diagnosis | {secs(f.time_to_first_diagnosis_s)} |",
             f"| time to remediation | {secs(f.time_to_remediate_s)} |",
             f"| time to recovery | {secs(f.time_to_recover_s)}"
             + (f" ({md(review.recovery)})" if review.recovery else "") + " |",
             f"| time to resolve | {secs(f.time_to_resolve_s)} |",
             f"| status page incident | {md(review.status_page_incident or 'none')} |", "",
             "## Timeline", "", "| time (UTC) | what | run |", "| --- | --- | --- |"]
    lines += [f"| {e.at.astimezone(UTC).strftime('%H:%M:%S.%f')[:-3]} | {e.kind}: {md(e.text)} | "
              f"{e.run_id[:8]} |" for e in review.timeline]
    for r in review.runs:
        lines += ["", f"## Run {md(r.name)} (`{r.id}`): {md(r.state)}", ""]
        lines += [f"- finding: {md(x)}" for x in r.findings] or ["- no finding above info"]
        lines += [f"- changed: {md(x)}" for x in r.changes]
        lines += [f"- decision: {md(x)}" for x in r.decisions]
    return "\n".join(lines) + "\n"


def write_files(review: Review, directory: Path) -> tuple[Path, Path]:
    """``<name>.md`` and ``<name>.json`` under ``directory`` (created 0700: reviews name hosts and people)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    md_path, json_path = directory / f"{review.name}.md", directory / f"{review.name}.json"
    for path, text in ((md_path, to_markdown(review)), (json_path, review.model_dump_json(indent=2))):
        tmp = path.with_suffix(path.suffix + ".partial")
        tmp.write_text(text)
        tmp.replace(path)
    return md_path, json_path


def publish_artifact(http: httpx.Client, review: Review) -> None:
    """The markdown as a Prefect artifact on the last run (keyed, so a new version replaces it in the UI)."""
    _call(http, "POST", "/artifacts/", {
        "key": review.name, "type": "markdown", "data": to_markdown(review),
        "description": "post-incident review", "flow_run_id": review.runs[-1].id if review.runs else None})


def load_reviews(directory: Path, limit: int = 10_000) -> list[Review]:
    """The reviews written under ``directory``, newest last (the intake's /metrics starts from them)."""
    paths = sorted(directory.glob("incident-review-*.json"), key=lambda p: p.stat().st_mtime)[-limit:]
    out: list[Review] = []
    for path in paths:
        try:
            out.append(Review.model_validate_json(path.read_text()))
        except (OSError, ValidationError):
            continue
    return out


def runs_final(runs: list[dict[str, Any]]) -> bool:
    return all((r.get("state") or {}).get("type") in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} for r in runs)


# ------------------------------------------------------------------ helpers


def _call(http: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None,
          params: dict[str, str] | None = None, ok: tuple[int, ...] = (200, 201)) -> httpx.Response:
    try:
        resp = http.request(method, path, json=body, params=params)
    except httpx.HTTPError as exc:
        raise ReviewError(f"Prefect API: {type(exc).__name__} on {method} {path}") from None
    if resp.status_code not in ok:
        raise ReviewError(f"Prefect API: HTTP {resp.status_code} on {method} {path}")
    return resp


def _get(http: httpx.Client, path: str, what: str) -> dict[str, Any]:
    resp = _call(http, "GET", path, ok=(200, 404))
    if resp.status_code == 404:
        raise BadInput(f"no {what}")
    doc: dict[str, Any] = resp.json()
    return doc


def _tag(tags: list[str], prefix: str) -> str | None:
    return next((t.removeprefix(prefix) for t in tags if t.startswith(prefix)), None)


def parse_time(value: str) -> datetime:
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)
