"""`runbook run` through a warm executor: create the run on the Prefect server, follow it, read its report back.

When a `runbook serve` or `runbook worker` serves the work pool, a person's run takes the path an alert's run takes:
the executor has every flow imported and starts it the moment the server announces it (event stream), so the CLI
only creates the run, prints progress from the run's log and reads the report the engine stored as run input
(``runbook-report``). Nothing here imports Prefect: plain REST calls, each with a timeout, so the command itself
costs a fraction of a second. Approval works as at the server: the run pauses with its plan, the CLI shows the plan
and asks for ``yes`` (or ``--yes``), and resumes it with the decision.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from runbook.engine.errors import BadInput, RunbookError

WORK_POOL = "runbook"
DEPLOYMENT = "runbook"  # every procedure's deployment: <procedure>/runbook (runbook.app.serve)
REPORT_INPUT_KEY = "runbook-report"
PAUSE_KEY = "approval"
PLAN_INPUT_KEY = "runbook-plan"
WORKER_FRESH_S = 90.0  # an executor heartbeats every 15-30 s: one that missed three is gone
FOLLOW_POLL_S = 0.05
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class RemoteRunError(RunbookError):
    """The Prefect server refused or failed a request of the remote path (mapped to exit 1 by the CLI)."""


@dataclass
class Progress:
    """What the run has said so far; the CLI prints each new log line as it arrives."""

    seen: set[str] = field(default_factory=set)
    since: str | None = None


def warm_executor_ready(http: httpx.Client, work_pool: str = WORK_POOL) -> bool:
    """True when a live executor serves ``work_pool`` (its heartbeat is recent) and the server answers."""
    try:
        resp = http.post(f"/work_pools/{work_pool}/workers/filter", json={"limit": 20})
    except httpx.HTTPError:
        return False
    if resp.status_code != 200:
        return False
    now = datetime.now(UTC)
    for worker in resp.json():
        beat = worker.get("last_heartbeat_time")
        if beat and now - datetime.fromisoformat(beat) < timedelta(seconds=WORKER_FRESH_S):
            return True
    return False


def deployment(http: httpx.Client, procedure: str) -> dict[str, Any]:
    resp = _call(http, "GET", f"/deployments/name/{procedure}/{DEPLOYMENT}")
    if resp.status_code == 404:
        raise BadInput(f"no deployment {procedure}/{DEPLOYMENT} on the Prefect server: run `runbook deploy`")
    return _ok(resp, f"reading deployment {procedure}").json()  # type: ignore[no-any-return]


def coerce_params(schema: dict[str, Any], raw: dict[str, str]) -> dict[str, Any]:
    """``k=v`` strings typed by the deployment's parameter schema: JSON for non-strings (``30`` is a number,
    ``[1, 2]`` a list), the text itself for strings. The server then validates them against the same schema."""
    props = schema.get("properties") or {}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in props:
            known = ", ".join(k for k in props if k not in ("env", "dry_run")) or "none"
            raise BadInput(f"--param {key}: no such parameter (known: {known})")
        if _is_string(props[key]):
            out[key] = value
            continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # not JSON: the server's validation names what was expected
    return out


def _is_string(prop: dict[str, Any]) -> bool:
    kinds = [prop.get("type")] + [p.get("type") for p in prop.get("anyOf", []) if isinstance(p, dict)]
    return "string" in kinds and not {"integer", "number", "boolean", "array", "object"} & set(kinds)


def create_run(http: httpx.Client, dep: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    resp = _call(http, "POST", f"/deployments/{dep['id']}/create_flow_run", json={
        "parameters": parameters, "state": {"type": "SCHEDULED", "name": "Scheduled"},
        "tags": ["cli"],
    })
    if resp.status_code in (409, 422):  # the server's schema validation: name what was wrong
        raise BadInput(f"parameters refused: {_detail(resp)}")
    return _ok(resp, "creating the run").json()  # type: ignore[no-any-return]


def follow(http: httpx.Client, run_id: str, on_log: Callable[[dict[str, Any]], None],
           on_paused: Callable[[dict[str, Any]], None], progress: Progress | None = None,
           timeout_s: float = 3600.0) -> dict[str, Any]:
    """Poll the run's state and new log lines until it is final; ``on_paused`` handles an approval wait."""
    progress = progress or Progress()
    deadline = time.monotonic() + timeout_s
    asked: set[str] = set()
    while True:
        run = _ok(_call(http, "GET", f"/flow_runs/{run_id}"), "reading the run").json()
        _new_logs(http, run_id, progress, on_log)
        state = run.get("state") or {}
        if state.get("type") in TERMINAL:
            _new_logs(http, run_id, progress, on_log)
            return run  # type: ignore[no-any-return]
        details = state.get("state_details") or {}
        if state.get("type") == "PAUSED" and details.get("pause_key") == PAUSE_KEY and state["id"] not in asked:
            asked.add(state["id"])
            on_paused(run)
        if time.monotonic() > deadline:
            raise RemoteRunError(f"run {run_id} still {state.get('name')} after {timeout_s:g} s")
        time.sleep(FOLLOW_POLL_S)


def _new_logs(http: httpx.Client, run_id: str, progress: Progress,
              on_log: Callable[[dict[str, Any]], None]) -> None:
    body: dict[str, Any] = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
    if progress.since:
        body["logs"]["timestamp"] = {"after_": progress.since}
    resp = _call(http, "POST", "/logs/filter", json=body)
    if resp.status_code != 200:
        return  # progress is best effort; the report is what counts
    for line in resp.json():
        if line["id"] in progress.seen:
            continue
        progress.seen.add(line["id"])
        progress.since = line["timestamp"]
        on_log(line)


def waiting_plan(http: httpx.Client, run_id: str) -> str | None:
    """The plan a paused run stored for its approvers (JSON), or None."""
    resp = _call(http, "GET", f"/flow_runs/{run_id}/input/{PLAN_INPUT_KEY}")
    return resp.text if resp.status_code == 200 else None


def resume(http: httpx.Client, run_id: str, approve: bool, approver: str, reason: str = "") -> None:
    """Answer the approval form (the same fields as the Prefect UI's form and `runbook approve`)."""
    resp = _call(http, "POST", f"/flow_runs/{run_id}/resume", json={
        "run_input": {"approve": approve, "approver": approver, "reason": reason[:500]}})
    body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
    if resp.status_code >= 400 or body.get("status") not in (None, "ACCEPT"):
        raise RemoteRunError(f"the server did not take the decision: {_detail(resp)}")


def read_report(http: httpx.Client, run_id: str) -> dict[str, Any] | None:
    """The report the engine stored with the run (None if the run ended before it could write one)."""
    resp = _call(http, "GET", f"/flow_runs/{run_id}/input/{REPORT_INPUT_KEY}")
    if resp.status_code != 200:
        return None
    doc = json.loads(resp.json() if resp.text.startswith('"') else resp.text)
    return doc if isinstance(doc, dict) else None


def _call(http: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        return http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise RemoteRunError(f"Prefect API unreachable ({method} {path}): {type(exc).__name__}: {exc}") from None


def _ok(resp: httpx.Response, what: str) -> httpx.Response:
    if resp.status_code >= 400:
        raise RemoteRunError(f"{what}: the Prefect server answered {resp.status_code}: {_detail(resp)}")
    return resp


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return str(detail)[:500]
