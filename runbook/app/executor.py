"""The warm executor: runs deployment flow runs inside a long-lived process that already imported every flow.

A plain Prefect process worker polls its pool, then starts a Python subprocess per run: 6-14 s from
`run_deployment` to the first task here. This executor keeps the flows imported and runs each flow run in a
thread of its own, so an alert's first task starts a fraction of a second after the intake hands it over
(`submit`), with no polling on that path. Runs created elsewhere (the Prefect UI, `runbook run` against a server,
another intake) reach it through Prefect's event stream (a websocket: the `prefect.flow-run.Scheduled` event of a run
in its pool arrives milliseconds after the run is created); a relaxed poll of the work pool stays as the safety net
for missed events and for runs scheduled ahead of time, and sends worker heartbeats so the pool shows as ready.

Several executors may serve one pool (scale-out): a run is claimed by proposing PENDING, which the Prefect
server accepts for exactly one claimer; the others leave it alone. No run outlives its executor unfinished: each
poll also finds the runs of executors that died and finishes them (runbook.app.reconcile), and ``stop`` drains:
it claims nothing more, lets running runs finish within a grace period and hands the rest back to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas import OrchestrationResult, State
from prefect.client.schemas.responses import SetStateStatus
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter
from prefect.exceptions import Abort, Pause
from prefect.flow_engine import run_flow
from prefect.settings import (
    PREFECT_API_AUTH_STRING,
    PREFECT_API_URL,
    temporary_settings,
)
from prefect.states import AwaitingRetry, Failed, Pending

from runbook.app import handback, prefect_shortcuts
from runbook.app.catalog import PROCEDURES
from runbook.app.reconcile import Reconciler, Verdict, claim_message, executor_name
from runbook.app.remote_run import WORK_POOL
from runbook.engine.prefect_env import auth_header
from runbook.engine.redact import redact

log = logging.getLogger(__name__)


EVENTS_RETRY_S = 5.0
# the SCHEDULED states a run of ours enters: created, retried or handed back, resumed after approval (suspended)
SCHEDULED_NAMES = ("Scheduled", "AwaitingRetry", "Resuming")


class Executor:
    def __init__(self, work_pool: str = WORK_POOL, max_runs: int = 16, poll_s: float = 15.0,
                 name: str | None = None, events: bool = True) -> None:
        self.work_pool = work_pool
        self.max_runs = max_runs
        self.poll_s = poll_s
        self._running = 0
        self.name = name or executor_name()
        self._pool = ThreadPoolExecutor(max_workers=max_runs, thread_name_prefix="flow-run")
        self._handoff: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._threads: list[threading.Thread] = []
        self._flows: dict[UUID, object] = {}
        self._claimed: set[str] = set()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified when a run ends (drain waits on it)
        self._events = events
        self._api_url = ""
        self._api_headers: dict[str, str] = {}
        self._events_loop: asyncio.AbstractEventLoop | None = None
        self.events_connected = threading.Event()
        self.polls = 0  # completed polls of the work pool (observable: the event path needs none)
        self.reconciler = Reconciler(work_pool, self.name, self._mine, poll_s)
        self.recovered: list[Verdict] = []  # zombie runs of dead executors this one finished

    # -------------------------------------------------------------- public

    def start(self) -> None:
        """Start the hand-off and poll loops in the caller's Prefect settings context (plus run_settings)."""
        self._api_url = str(PREFECT_API_URL.value() or "")
        self._api_headers = auth_header(PREFECT_API_AUTH_STRING.value())  # what Prefect's own client sends
        prefect_shortcuts.install(self._api_url)
        handback.install()
        with temporary_settings(updates=prefect_shortcuts.run_settings(self._api_url, self._api_headers)):
            ctx = contextvars.copy_context()
        # one heartbeat before anything can be claimed: a run claimed by an executor the pool has never heard of
        # looks like a dead executor's run to the others' reconciler
        ctx.copy().run(self._beat)
        loops = [self._handoff_loop, self._heartbeat_loop, self._poll_loop] + (
            [self._event_loop] if self._events else [])
        for target in loops:
            t = threading.Thread(target=ctx.copy().run, args=(target,), daemon=True, name=target.__name__)
            t.start()
            self._threads.append(t)

    def submit(self, flow_run_id: str) -> None:
        """Hand over a run the caller just created: it starts now, not at the next poll."""
        self._handoff.put(flow_run_id)

    def stop(self, grace_s: float = 30.0) -> list[str]:
        """Drain: claim nothing more, give running runs ``grace_s`` to finish, hand the rest back to the pool
        (``AwaitingRetry``: the next executor, or this one restarted, runs them again; their remediations re-check
        every change) and leave the pool. A run whose final state was accepted is never handed back, even while its
        thread still writes its artifacts (runbook.app.handback). Returns the runs handed back: their threads write
        none of their states any more and apply nothing (the fence before applying), but still run until their next
        state, so a caller that got any should exit the process (the CLI does)."""
        self._draining.set()
        self._stop.set()
        self._handoff.put(None)
        loop = self._events_loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed between the check and the call
                loop.call_soon_threadsafe(_cancel_all, loop)
        for t in self._threads:
            t.join(timeout=10)
        deadline = time.monotonic() + grace_s
        with self._changed:
            while self._claimed and time.monotonic() < deadline:
                self._changed.wait(max(0.0, min(1.0, deadline - time.monotonic())))
            unfinished = sorted(self._claimed)
        handed_back = [run_id for run_id in unfinished if self._hand_back(run_id)]
        self._forget_worker()
        self._pool.shutdown(wait=False, cancel_futures=True)
        return handed_back

    def _hand_back(self, run_id: str) -> bool:
        message = f"executor {self.name} stopped before this run finished: handed back to the pool"

        def write() -> None:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(UUID(run_id), AwaitingRetry(scheduled_time=datetime.now(UTC),
                                                                       message=message), force=True)
        try:
            if not handback.hand_back_unless_final(run_id, write):
                log.info("flow run %s finished while the executor stopped: not handed back", run_id)
                return False
        except Exception as exc:  # Prefect unreachable: the reconciler finds the run when this executor is gone
            log.warning("could not hand back flow run %s: %s", run_id, redact(str(exc))[:200])
            return False
        log.warning("flow run %s handed back to work pool %r", run_id, self.work_pool)
        return True

    def _mine(self) -> set[str]:
        with self._lock:
            return set(self._claimed)

    def _forget_worker(self) -> None:
        """Remove this executor from the pool's workers: its last heartbeat must not make `runbook run` hand a run
        to an executor that is gone (Prefect would show it online for three more heartbeat intervals)."""
        if not self._api_url:
            return
        with contextlib.suppress(httpx.HTTPError):
            httpx.delete(f"{self._api_url}/work_pools/{self.work_pool}/workers/{self.name}", timeout=5,
                         trust_env=False, headers=self._api_headers)

    # -------------------------------------------------------------- loops

    def _handoff_loop(self) -> None:
        ctx = contextvars.copy_context()
        while not self._stop.is_set():
            run_id = self._handoff.get()
            if run_id is None:
                break
            self._pool.submit(ctx.copy().run, self._claim_and_run, run_id)

    def _heartbeat_loop(self) -> None:
        """Heartbeats on a thread of their own: a slow poll or reconcile (hundreds of runs, a busy API) must not
        make the other executors take this one for dead and retry its runs while it still runs them."""
        while not self._stop.wait(self.poll_s):
            self._beat()

    def _beat(self) -> None:
        try:
            with get_client(sync_client=True) as client:
                client.send_worker_heartbeat(self.work_pool, self.name, heartbeat_interval_seconds=self.poll_s)
        except Exception as exc:  # a Prefect outage: beat again next interval
            log.warning("work pool %r heartbeat failed: %s", self.work_pool, redact(str(exc))[:200])

    def _poll_loop(self) -> None:
        ctx = contextvars.copy_context()
        while not self._stop.is_set():
            try:
                with get_client(sync_client=True) as client:
                    due = client.get_scheduled_flow_runs_for_work_pool(
                        self.work_pool, scheduled_before=datetime.now(UTC) + timedelta(seconds=1))
                    self.recovered.extend(self.reconciler.reconcile(client))
                with self._lock:
                    free = self.max_runs - self._running
                for item in due[:max(0, free)]:  # claim only what this process can start now: others share
                    self._pool.submit(ctx.copy().run, self._claim_and_run, str(item.flow_run.id))
                self.polls += 1
            except Exception as exc:  # the poll loop must outlive a Prefect outage; it retries next interval
                log.warning("work pool %r poll failed: %s", self.work_pool, exc)
            self._stop.wait(self.poll_s)

    def _event_loop(self) -> None:
        """Claim a run as soon as the server announces it SCHEDULED in our pool; reconnect after an outage."""
        loop = asyncio.new_event_loop()
        self._events_loop = loop
        try:
            while not self._stop.is_set():
                try:
                    loop.run_until_complete(self._watch_events())
                except asyncio.CancelledError:
                    break
                except Exception as exc:  # a Prefect outage: the poll covers the gap; try again shortly
                    self.events_connected.clear()
                    log.warning("event stream: %s; reconnecting in %.0f s", redact(str(exc))[:200], EVENTS_RETRY_S)
                    self._stop.wait(EVENTS_RETRY_S)
        finally:
            loop.close()

    async def _watch_events(self) -> None:
        ctx = contextvars.copy_context()
        scheduled = EventFilter(event=EventNameFilter(name=[f"prefect.flow-run.{name}" for name in SCHEDULED_NAMES]))
        async with get_events_subscriber(filter=scheduled, reconnect_on_clean_close=True) as events:
            self.events_connected.set()
            async for event in events:
                pools = {r.get("prefect.resource.name") for r in event.related if r.role == "work-pool"}
                if self.work_pool not in pools:
                    continue
                run_id = event.resource.id.removeprefix("prefect.flow-run.")
                with self._lock:
                    free = self.max_runs - self._running
                if free > 0:  # otherwise the poll picks it up when a thread is free
                    self._pool.submit(ctx.copy().run, self._claim_and_run, run_id)

    # -------------------------------------------------------------- one run

    def _claim_and_run(self, run_id: str) -> None:
        with self._lock:
            if run_id in self._claimed or self._draining.is_set():  # one attempt is enough; draining: none
                return
            self._claimed.add(run_id)
        try:
            with handback.holding(run_id):
                self._run_if_ours(run_id)
        finally:
            with self._changed:
                self._claimed.discard(run_id)  # once claimed it is no longer SCHEDULED: no second start
                self._changed.notify_all()

    def _run_if_ours(self, run_id: str) -> None:
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(UUID(run_id))
            flow = self._flow_for(client, flow_run.flow_id)
            if flow is None:
                log.info("run %s is not one of ours: left for another worker", run_id)
                return
            if not (flow_run.state and flow_run.state.is_scheduled()):
                return
            due = flow_run.next_scheduled_start_time or flow_run.expected_start_time
            if due is not None and due > datetime.now(UTC) + timedelta(seconds=1):
                return  # scheduled ahead of time: the poll starts it when it is due
            claim: State[Any] = Pending(message=claim_message(self.name))
            result: OrchestrationResult[Any] = client.set_flow_run_state(flow_run.id, claim)
            if result.status != SetStateStatus.ACCEPT:
                return  # another executor (or a cancel) got there first
            flow_run.state = result.state or claim  # what the server accepted: no second read of the run
        started = time.monotonic()
        with self._lock:
            self._running += 1
        try:
            state: object = run_flow(flow, flow_run=flow_run, return_type="state")  # type: ignore[arg-type]
        except Pause:  # suspended waiting for approval: the thread is free; the answer reschedules the run
            log.info("flow run %s suspended for approval after %.1f s", run_id, time.monotonic() - started)
            return
        except Abort as exc:  # handed back by this executor's drain (or aborted by the server): not ours any more
            log.info("flow run %s stopped after %.1f s: %s", run_id, time.monotonic() - started, exc)
            return
        except Exception as exc:  # the engine failed before the run could record it (e.g. bad parameters)
            message = redact(f"could not start: {type(exc).__name__}: {exc}")[:500]
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(flow_run.id, Failed(message=message), force=True)
            log.warning("flow run %s %s", run_id, message)
            return
        finally:
            with self._lock:
                self._running -= 1
        log.info("flow run %s finished %s in %.1f s", run_id, getattr(state, "name", "?"), time.monotonic() - started)

    def _flow_for(self, client: object, flow_id: UUID) -> object | None:
        if flow_id not in self._flows:
            name = client.read_flow(flow_id).name  # type: ignore[attr-defined]
            info = PROCEDURES.get(name)
            self._flows[flow_id] = info.load_flow() if info else None
        return self._flows[flow_id]


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        task.cancel()


def preload_flows() -> None:
    """Import every procedure's flow now, so the first run pays no import time."""
    for info in PROCEDURES.values():
        info.load_flow()
