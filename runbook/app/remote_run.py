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
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from runbook.engine.errors import BadInput, RunbookError
from runbook.engine.prefect_env import AUTH_ENV, AUTH_FILE, SERVER_AUTH_ENV, auth_header, env_auth_string
from runbook.engine.run_inputs import PAUSE_KEY, PLAN_INPUT_KEY, REPORT_INPUT_KEY

WORK_POOL = "runbook"
PROCEDURE_TAG = "procedure"  # on every procedure's deployment (runbook.app.serve registers them)
APPROVAL_TAG = "approval:required"  # on the deployment of a procedure that needs approval to apply
WORKER_FRESH_S = 90.0  # an executor heartbeats every 15-30 s: one that missed three is gone
FOLLOW_POLL_S = 0.05  # the run's state without its event stream: one small read; the run ends within a poll
WATCHED_POLL_S = 0.5  # with the event stream open: a safety net for an event missed while subscribing
DETAIL_POLL_S = 0.3  # steps and log lines (two filter queries): progress for a person, not on the critical path
# said by the step lines, or about the engine's own hook (runbook.engine.procedure.publish_after_final_state)
QUIET_LOGS = ("Finished in state", "Beginning flow run", "Created task run", "Executing ", "Running hook ", "Hook ")
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# states whose events `follow` need not act on at once (they wake it without a read of the run): a paused or ended
# run needs acting on; a claim that never comes (CLAIM_TIMEOUT_S) is measured from the safety poll's reads
UNEVENTFUL = {"SCHEDULED", "PENDING", "RUNNING"}
CLAIM_TIMEOUT_S = 10.0  # a live executor claims within milliseconds (event stream) or one poll (15 s) at worst


class RemoteRunError(RunbookError):
    """The Prefect server refused or failed a request of the remote path (mapped to exit 1 by the CLI)."""


class ApiUnauthorized(BadInput):
    """The Prefect API answered 401: the auth string was missing or wrong (bad input, exit 2). The message says
    where to set it and never quotes it."""


class NotClaimed(RunbookError):
    """No executor claimed the run in time, and it was withdrawn (cancelled while still scheduled): nothing ran."""


@dataclass
class Progress:
    """What the run has said so far (log lines, finished steps); the CLI prints each new one as it arrives."""

    seen: set[str] = field(default_factory=set)
    since: str | None = None
    steps_done: set[str] = field(default_factory=set)


def api_client(api: str, timeout_s: float = 10.0, auth: str | None = None) -> httpx.Client:
    """An HTTP client for the Prefect API, sending its auth string (``auth``; by default PREFECT_API_AUTH_STRING,
    as Prefect's own client reads it; "" sends none). A 401 raises ApiUnauthorized from any request.

    A plain-http URL has no TLS to verify, and building a verifying client loads the CA bundle (30-110 ms here, a
    tenth of this command's budget): only an https API gets one."""
    return httpx.Client(base_url=api, timeout=timeout_s, trust_env=False, verify=api.startswith("https://"),
                        headers=auth_header(env_auth_string() if auth is None else auth),
                        event_hooks={"response": [refuse_unauthorized]})


def refuse_unauthorized(resp: httpx.Response) -> None:
    """Turn a 401 into ApiUnauthorized, saying whether an auth string was sent (never which)."""
    if resp.status_code == 401:
        raise ApiUnauthorized(unauthorized_for(resp.request))


def unauthorized_for(req: httpx.Request) -> str:
    """The 401 message for a request the API refused (ours, or Prefect's own client's)."""
    return unauthorized_message(f"{req.url.scheme}://{req.url.netloc.decode()}", sent="authorization" in req.headers)


def unauthorized_message(api: str, sent: bool) -> str:
    """What to do about a 401 from the server at ``api``: where the string comes from and where to set it."""
    what = "refused the auth string sent (401)" if sent else "requires authentication (401) and no auth string was sent"
    return (f"the Prefect server at {api} {what}: set {AUTH_ENV} to the value of the server's {SERVER_AUTH_ENV}. "
            f"Servers runbook starts keep it in the 0600 file {AUTH_FILE} in their state directory: .sandbox/ "
            f"for the sandbox (eval \"$(runbook sandbox env)\" sets it), `runbook serve --state` (default .runbook/), "
            f"~/.local/state/runbook/ for the background server")


def check_access(http: httpx.Client) -> None:
    """One authenticated request (GET /admin/version; /health answers anyone), so a missing or wrong auth string
    is one clear ApiUnauthorized at start rather than failures later. Unreachable: RemoteRunError."""
    request(http, "GET", "/admin/version")


def warm_executor_ready(http: httpx.Client, work_pool: str = WORK_POOL) -> bool:
    """True when a live executor serves ``work_pool`` (its heartbeat is recent) and the server answers."""
    try:
        resp = http.post(f"/work_pools/{work_pool}/workers/filter", json={"limit": 20})
    except httpx.HTTPError:
        return False  # (a 401 raises ApiUnauthorized: the run must not quietly go elsewhere)
    if resp.status_code != 200:
        return False
    now = datetime.now(UTC)
    for worker in resp.json():
        beat = worker.get("last_heartbeat_time")
        if beat and now - datetime.fromisoformat(beat) < timedelta(seconds=WORKER_FRESH_S):
            return True
    return False


def deployment_filter(procedure: str) -> dict[str, Any]:
    """The /deployments/filter body that finds a procedure's deployment: its flow, tagged ``procedure``."""
    return {"flows": {"name": {"any_": [procedure]}}, "deployments": {"tags": {"all_": [PROCEDURE_TAG]}}, "limit": 1}


def deployment(http: httpx.Client, procedure: str) -> dict[str, Any]:
    """The procedure's deployment; BadInput names the known procedures when there is none."""
    found = _ok(request(http, "POST", "/deployments/filter", json=deployment_filter(procedure)),
                f"finding the deployment of {procedure}").json()
    if found:
        return found[0]  # type: ignore[no-any-return]
    flows = request(http, "POST", "/flows/filter", json={"deployments": {"tags": {"all_": [PROCEDURE_TAG]}}})
    known = sorted(f["name"] for f in flows.json()) if flows.status_code == 200 else []
    if known:
        raise BadInput(f"unknown procedure {procedure!r}; known: {', '.join(known)}")
    raise BadInput(f"no deployment of {procedure} on the Prefect server: run `runbook deploy`")


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
    resp = request(http, "POST", f"/deployments/{dep['id']}/create_flow_run", json={
        "parameters": parameters, "state": {"type": "SCHEDULED", "name": "Scheduled"},
        "tags": ["cli"], "idempotency_key": f"cli-{uuid.uuid4()}",
    })
    if resp.status_code in (409, 422):  # the server's schema validation: name what was wrong
        raise BadInput(f"parameters refused: {_detail(resp)}")
    return _ok(resp, "creating the run").json()  # type: ignore[no-any-return]


class RunWatch:
    """The run's own events (its state changes) from the server's event stream, a websocket, so that `follow`
    learns the run ended the moment the server says so instead of reading the run every 50 ms: ~15 reads a run
    that cost the server 7 ms of CPU each on the machine the run needs. Best effort: while the stream is not open
    (refused, a proxy without websockets, a drop), `follow` polls as before. The auth string goes in the
    protocol's auth message (and the header, for a proxy in front); every wait on the socket is bounded."""

    def __init__(self, api: str, auth: str | None, run_id: str) -> None:
        self.changed = threading.Event()  # set on each event of the run, when the stream ends, and by poke()
        self._events = 0  # events of the run received (and stream ends), counted by the watching thread only
        self._reported = 0  # ... as wait() last reported them
        self.open = threading.Event()  # subscribed: events of the run from now on arrive
        self.ended = threading.Event()  # the server said the run entered a final state
        self.final: dict[str, Any] | None = None  # that final state, as its event gives it (type, name, message)
        self.latest: str | None = None  # the state type of the run's latest event
        self._url = re.sub(r"^http", "ws", api.rstrip("/")) + "/events/out"
        self._auth, self._run_id = auth, run_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="run-events", daemon=True)

    def start(self) -> RunWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        try:
            from websockets.sync.client import connect  # here: its import (~60 ms) runs while the run does

            with connect(self._url, subprotocols=["prefect"],  # type: ignore[list-item]
                         additional_headers=auth_header(self._auth), proxy=None, open_timeout=5,
                         close_timeout=1) as ws:
                ws.send(json.dumps({"type": "auth", "token": self._auth}))
                if json.loads(ws.recv(timeout=5)).get("type") != "auth_success":
                    return
                now = datetime.now(UTC)
                ws.send(json.dumps({"type": "filter", "backfill": False, "filter": {
                    "occurred": {"since": (now - timedelta(minutes=1)).isoformat(),
                                 "until": (now + timedelta(days=1)).isoformat()},
                    "resource": {"id": [f"prefect.flow-run.{self._run_id}"]},
                    "event": {"exclude_name": ["prefect.flow-run.heartbeat"]}}}))  # states, not liveness
                self.open.set()
                while not self._stop.is_set():
                    try:
                        message = json.loads(ws.recv(timeout=1))
                    except TimeoutError:
                        continue
                    resource = (message.get("event") or {}).get("resource") or {}
                    self.latest = resource.get("prefect.state-type")
                    if resource.get("prefect.state-type") in TERMINAL:  # (the event's name is the state's name)
                        self.final = {"type": resource["prefect.state-type"],
                                      "name": resource.get("prefect.state-name"),
                                      "message": resource.get("prefect.state-message")}
                        self.ended.set()
                    self._events += 1
                    self.changed.set()
        except Exception:  # noqa: BLE001, S110 - no stream: follow polls, as it does without one
            pass
        finally:
            self.open.clear()
            self._events += 1
            self.changed.set()

    def wait(self, at_most_s: float) -> bool:
        """Until the run's next event, a poke, ``at_most_s`` or one poll interval (a short one while the stream is
        not open), whichever comes first. True when an event of the run (or the stream's end) came meanwhile."""
        self.changed.wait(min(at_most_s, WATCHED_POLL_S if self.open.is_set() else FOLLOW_POLL_S))
        self.changed.clear()
        events = self._events
        fresh, self._reported = events != self._reported, events
        return fresh

    def poke(self) -> None:
        """Wake ``wait`` without an event (a progress read came back)."""
        self.changed.set()


@dataclass(frozen=True)
class Finished:
    # the flow run as the server has it, in its final state; when the event stream said it ended and its report
    # is there, only its id and that final state (type, name, message), as the event gave them: not read again
    run: dict[str, Any]
    report: dict[str, Any] | None  # the report the engine stored with it (None: it ended without one)


def follow(http: httpx.Client, run_id: str, on_log: Callable[[dict[str, Any]], None],
           on_paused: Callable[[dict[str, Any]], None], on_step: Callable[[Step], None] | None = None,
           progress: Progress | None = None, timeout_s: float = 3600.0, watch: RunWatch | None = None) -> Finished:
    """Follow the run until it is final, then read its report: its state (read again on each of its events from
    ``watch`` that may need acting on, else every 50 ms), its finished steps (task runs) and new log lines (every
    0.3 s from 0.3 s after it was created, read in the background: the end of the run is never kept waiting on
    one); ``on_paused`` handles an approval wait. Once it has ended, its last log lines and its report are read
    side by side (beside the state itself when the stream said it ended), and the steps not shown yet come from
    the report."""
    progress = progress or Progress()
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="follow")
    try:
        return _follow(http, run_id, on_log, on_paused, on_step, progress, timeout_s, watch, pool)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a progress read still in flight is not waited for


Details = tuple["Future[list[dict[str, Any]]] | None", "Future[list[dict[str, Any]]]"]  # task runs, log lines


def _follow(http: httpx.Client, run_id: str, on_log: Callable[[dict[str, Any]], None],
            on_paused: Callable[[dict[str, Any]], None], on_step: Callable[[Step], None] | None,
            progress: Progress, timeout_s: float, watch: RunWatch | None, pool: ThreadPoolExecutor) -> Finished:
    started = time.monotonic()
    deadline = started + timeout_s
    asked: set[str] = set()
    scheduled_since: dict[str, float] = {}  # per state: a run resumed after approval is scheduled again
    details_due = started + DETAIL_POLL_S  # a run just created has no steps or log lines to show yet
    details: Details | None = None  # the progress read in flight
    read_due = 0.0  # with the stream open: the run is read on its events, and at least every WATCHED_POLL_S
    run: dict[str, Any] = {}
    state: dict[str, Any] = {}
    while True:
        lines: list[dict[str, Any]] = []  # log lines read with the final state: printed after the last steps
        last = None
        ended = False
        if watch is not None and watch.ended.is_set():  # the server said it ended: read all that is left at once
            ended = True
            watch.ended.clear()
            details = None  # a progress read in flight is left to finish unseen: the reads below cover it
            last = _read_last(http, run_id, progress, pool, lines)
            final = watch.final
            if final is not None and last[0].result() is not None:  # ended with its report: no need to read it
                return _finish(http, run_id, {"id": run_id, "state": final}, last, lines, progress, on_log, on_step)
        if ended or time.monotonic() >= read_due:
            run = _ok(request(http, "GET", f"/flow_runs/{run_id}"), "reading the run").json()
            state = run.get("state") or {}
            read_due = time.monotonic() + WATCHED_POLL_S
        if last is not None and state.get("type") not in TERMINAL:  # e.g. crashed, then rescheduled for a retry
            last[1].result()
            for line in lines:
                on_log(line)
            last = None
        waiting_since = scheduled_since.setdefault(str(state.get("id")), time.monotonic())
        if state.get("type") == "SCHEDULED" and time.monotonic() - waiting_since > CLAIM_TIMEOUT_S:
            if _withdraw(http, run_id):
                raise NotClaimed(f"no executor claimed run {run_id} within {CLAIM_TIMEOUT_S:g} s (withdrawn)")
            read_due = 0.0
            continue  # claimed meanwhile: follow it
        if state.get("type") in TERMINAL:
            if last is None:
                last = _read_last(http, run_id, progress, pool, lines)
            return _finish(http, run_id, run, last, lines, progress, on_log, on_step)
        pause = state.get("state_details") or {}
        if state.get("type") == "PAUSED" and pause.get("pause_key") == PAUSE_KEY and state["id"] not in asked:
            if _form_ready(http, run_id, pause):
                asked.add(state["id"])
                on_paused(run)
            read_due = 0.0  # the answer, or the form once it is stored, shows at the next read
        if details is not None and all(f is None or f.done() for f in details):
            _show_details(details, progress, on_log, on_step)
            details, details_due = None, time.monotonic() + DETAIL_POLL_S
        if details is None and time.monotonic() >= details_due:
            details = _read_details(http, run_id, progress, on_step is not None, pool, watch)
            details_due = float("inf")  # due again once this one is shown
        if time.monotonic() > deadline:
            raise RemoteRunError(f"run {run_id} still {state.get('name')} after {timeout_s:g} s")
        if watch is None:
            time.sleep(FOLLOW_POLL_S)
            read_due = 0.0
        elif not watch.open.is_set():  # no stream: poll as without one
            watch.wait(FOLLOW_POLL_S)
            read_due = 0.0
        elif watch.wait(max(0.0, min(details_due, read_due) - time.monotonic())) and watch.latest not in UNEVENTFUL:
            read_due = 0.0  # an event of the run that may need acting on (paused, cancelling, ended)


def _read_last(http: httpx.Client, run_id: str, progress: Progress, pool: ThreadPoolExecutor,
               lines: list[dict[str, Any]]) -> tuple[Future[Any], Future[Any]]:
    """Start reading what is left of an ended run, side by side: its report, and its last log lines into ``lines``."""
    return pool.submit(read_report, http, run_id), pool.submit(_new_logs, http, run_id, progress, lines.append)


def _finish(http: httpx.Client, run_id: str, run: dict[str, Any], last: tuple[Future[Any], Future[Any]],
            lines: list[dict[str, Any]], progress: Progress, on_log: Callable[[dict[str, Any]], None],
            on_step: Callable[[Step], None] | None) -> Finished:
    """The end of a run: its report and last log lines (``last``, read side by side), then its last steps."""
    report = last[0].result()
    last[1].result()
    if on_step is not None:
        _last_steps(http, run_id, report, progress, on_step)
    for line in lines:
        on_log(line)
    return Finished(run, report)


def _read_details(http: httpx.Client, run_id: str, progress: Progress, steps: bool, pool: ThreadPoolExecutor,
                  watch: RunWatch | None) -> Details:
    """Start reading the run's progress, its task runs (with ``steps``) and new log lines, side by side in the
    background; the watch is poked when both are back. The run itself is not read for it: its events say when
    its state changed."""
    task_runs = pool.submit(_read_task_runs, http, run_id) if steps else None
    lines = pool.submit(_read_logs, http, run_id, progress.since)
    if watch is not None:
        both = [f for f in (task_runs, lines) if f is not None]
        for f in both:
            f.add_done_callback(lambda _f: watch.poke() if all(g.done() for g in both) else None)
    return task_runs, lines


def _show_details(details: Details, progress: Progress, on_log: Callable[[dict[str, Any]], None],
                  on_step: Callable[[Step], None] | None) -> None:
    """Print a progress read that came back: finished steps first, then the log lines."""
    task_runs, lines = details
    if task_runs is not None and on_step is not None:
        _show_steps(_quietly(task_runs), progress, on_step)
    _show_logs(_quietly(lines), progress, on_log)


def _quietly(f: Future[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """A progress read's answer, or nothing when it failed (progress is best effort: the report is what counts)."""
    try:
        return f.result()
    except (httpx.HTTPError, RemoteRunError):
        return []


def _form_ready(http: httpx.Client, run_id: str, details: dict[str, Any]) -> bool:
    """The approval form is stored a moment after the run shows PAUSED (the server clears a pause's inputs when
    it accepts it): ask only once it is there, or the answer would be refused."""
    schema = (details.get("run_input_keyset") or {}).get("schema")
    return not schema or request(http, "GET", f"/flow_runs/{run_id}/input/{schema}").status_code == 200


def _withdraw(http: httpx.Client, run_id: str) -> bool:
    """Cancel the run only if it is still SCHEDULED (no force: a run an executor claimed meanwhile is kept)."""
    resp = request(http, "POST", f"/flow_runs/{run_id}/set_state", json={
        "state": {"type": "CANCELLED", "name": "Cancelled", "message": "no executor claimed it: run in the CLI"},
        "force": False})
    return resp.status_code < 400 and resp.json().get("status") == "ACCEPT"


@dataclass(frozen=True)
class Step:
    """A finished step (task run) of the run: its name without Prefect's suffix, final state name, seconds."""

    name: str
    state: str
    seconds: float


def _new_steps(http: httpx.Client, run_id: str, progress: Progress, on_step: Callable[[Step], None]) -> None:
    """Progress while the run goes: its finished task runs (the server records them up to a second late)."""
    _show_steps(_read_task_runs(http, run_id), progress, on_step)


def _read_task_runs(http: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    resp = request(http, "POST", "/task_runs/filter", json={
        "flow_runs": {"id": {"any_": [run_id]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 200})
    return resp.json() if resp.status_code == 200 else []


def _show_steps(task_runs: list[dict[str, Any]], progress: Progress, on_step: Callable[[Step], None]) -> None:
    for task_run in task_runs:
        if (task_run.get("state") or {}).get("type") in TERMINAL and task_run["id"] not in progress.steps_done:
            progress.steps_done.add(task_run["id"])
            name = re.sub(r"-[0-9a-f]{3}$", "", str(task_run.get("name", "?")))  # Prefect's suffix: get_x-901
            on_step(Step(name, (task_run.get("state") or {}).get("name", "?"),
                         float(task_run.get("total_run_time") or 0.0)))


def _last_steps(http: httpx.Client, run_id: str, report: dict[str, Any] | None, progress: Progress,
                on_step: Callable[[Step], None]) -> None:
    """The steps not shown yet once the run has ended: from the report, which lists every step the engine ran
    (no request, and none missing); from the server's task runs for a run that ended without one."""
    steps = (report or {}).get("steps")
    if not isinstance(steps, list):
        _new_steps(http, run_id, progress, on_step)
        return
    for st in steps:
        key = str(st.get("task_run_id") or st.get("name"))
        if key not in progress.steps_done:
            progress.steps_done.add(key)
            on_step(Step(str(st.get("name", "?")), str(st.get("state", "?")), float(st.get("seconds") or 0.0)))


def _new_logs(http: httpx.Client, run_id: str, progress: Progress,
              on_log: Callable[[dict[str, Any]], None]) -> None:
    _show_logs(_read_logs(http, run_id, progress.since), progress, on_log)


def _read_logs(http: httpx.Client, run_id: str, since: str | None) -> list[dict[str, Any]]:
    body: dict[str, Any] = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
    if since:
        body["logs"]["timestamp"] = {"after_": since}
    resp = request(http, "POST", "/logs/filter", json=body)
    return resp.json() if resp.status_code == 200 else []  # progress is best effort; the report is what counts


def _show_logs(lines: list[dict[str, Any]], progress: Progress, on_log: Callable[[dict[str, Any]], None]) -> None:
    for line in lines:
        if line["id"] in progress.seen:
            continue
        progress.seen.add(line["id"])
        progress.since = line["timestamp"]
        if not str(line.get("message", "")).startswith(QUIET_LOGS):
            on_log(line)


def waiting_plan(http: httpx.Client, run_id: str) -> str | None:
    """The plan a paused run stored for its approvers (JSON), or None."""
    resp = request(http, "GET", f"/flow_runs/{run_id}/input/{PLAN_INPUT_KEY}")
    return resp.text if resp.status_code == 200 else None


def resume(http: httpx.Client, run_id: str, approve: bool, approver: str, reason: str = "") -> None:
    """Answer the approval form (the same fields as the Prefect UI's form and `runbook approve`)."""
    resp = request(http, "POST", f"/flow_runs/{run_id}/resume", json={
        "run_input": {"approve": approve, "approver": approver, "reason": reason[:500]}})
    if resp.status_code == 404:
        raise BadInput(f"no flow run {run_id}")
    body = _ok(resp, "answering the approval").json()
    if isinstance(body, dict) and body.get("status") not in (None, "ACCEPT"):  # decided or timed out meanwhile
        why = (body.get("details") or {}).get("reason") or body.get("status")
        raise BadInput(f"run {run_id} is no longer waiting for approval: {why}")


def read_report(http: httpx.Client, run_id: str) -> dict[str, Any] | None:
    """The report the engine stored with the run (None if the run ended before it could write one)."""
    resp = request(http, "GET", f"/flow_runs/{run_id}/input/{REPORT_INPUT_KEY}")
    if resp.status_code != 200:
        return None
    doc = resp.json()
    if isinstance(doc, str):  # Prefect keeps an input as JSON text
        doc = json.loads(doc)
    return doc if isinstance(doc, dict) else None


def request(http: httpx.Client, method: str, path: str, attempts: int = 8, **kwargs: Any) -> httpx.Response:
    """One request; 503/429 are retried as Prefect's own client does (a SQLite-backed server answers 503 while it
    is busy writing). Requests that create something carry an idempotency key, so a retry creates nothing twice."""
    try:
        resp = http.request(method, path, **kwargs)
        for attempt in range(1, attempts):
            if resp.status_code not in (429, 503):
                break
            time.sleep(0.2 * attempt)
            resp = http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise RemoteRunError(f"Prefect API unreachable ({method} {path}): {type(exc).__name__}: {exc}") from None
    return resp


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
