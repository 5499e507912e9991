"""The warm executor: runs deployment flow runs inside a long-lived process that already imported every flow.

A plain Prefect process worker polls its pool, then starts a Python subprocess per run: 6-14 s from
`run_deployment` to the first task here. This executor keeps the flows imported and runs each flow run in a
thread of its own, so an alert's first task starts a fraction of a second after the intake hands it over
(`submit`), with no polling on that path. It also polls its work pool, at a relaxed interval, for runs created
elsewhere (the Prefect UI, schedules, another intake), and sends worker heartbeats so the pool shows as ready.

Several executors may serve one pool (scale-out): a run is claimed by proposing PENDING, which the Prefect
server accepts for exactly one claimer; the others leave it alone.
"""

from __future__ import annotations

import contextvars
import logging
import os
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas import OrchestrationResult, State
from prefect.client.schemas.responses import SetStateStatus
from prefect.flow_engine import run_flow
from prefect.states import Failed, Pending

from runbook.app.catalog import PROCEDURES
from runbook.engine.redact import redact

log = logging.getLogger(__name__)

WORK_POOL = "runbook"


class Executor:
    def __init__(self, work_pool: str = WORK_POOL, max_runs: int = 16, poll_s: float = 5.0,
                 name: str | None = None) -> None:
        self.work_pool = work_pool
        self.max_runs = max_runs
        self.poll_s = poll_s
        self._running = 0
        self.name = name or f"runbook-{socket.gethostname()}-{os.getpid()}"
        self._pool = ThreadPoolExecutor(max_workers=max_runs, thread_name_prefix="flow-run")
        self._handoff: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._flows: dict[UUID, object] = {}
        self._claimed: set[str] = set()
        self._lock = threading.Lock()

    # -------------------------------------------------------------- public

    def start(self) -> None:
        """Start the hand-off and poll loops in the caller's Prefect settings context."""
        ctx = contextvars.copy_context()
        for target in (self._handoff_loop, self._poll_loop):
            t = threading.Thread(target=ctx.copy().run, args=(target,), daemon=True, name=target.__name__)
            t.start()
            self._threads.append(t)

    def submit(self, flow_run_id: str) -> None:
        """Hand over a run the caller just created: it starts now, not at the next poll."""
        self._handoff.put(flow_run_id)

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        self._handoff.put(None)
        for t in self._threads:
            t.join(timeout=10)
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    # -------------------------------------------------------------- loops

    def _handoff_loop(self) -> None:
        ctx = contextvars.copy_context()
        while not self._stop.is_set():
            run_id = self._handoff.get()
            if run_id is None:
                break
            self._pool.submit(ctx.copy().run, self._claim_and_run, run_id)

    def _poll_loop(self) -> None:

        ctx = contextvars.copy_context()
        while not self._stop.is_set():
            try:
                with get_client(sync_client=True) as client:
                    client.send_worker_heartbeat(self.work_pool, self.name,
                                                 heartbeat_interval_seconds=max(30.0, self.poll_s))
                    due = client.get_scheduled_flow_runs_for_work_pool(
                        self.work_pool, scheduled_before=datetime.now(UTC) + timedelta(seconds=1))
                with self._lock:
                    free = self.max_runs - self._running
                for item in due[:max(0, free)]:  # claim only what this process can start now: others share
                    self._pool.submit(ctx.copy().run, self._claim_and_run, str(item.flow_run.id))
            except Exception as exc:  # the poll loop must outlive a Prefect outage; it retries next interval
                log.warning("work pool %r poll failed: %s", self.work_pool, exc)
            self._stop.wait(self.poll_s)

    # -------------------------------------------------------------- one run

    def _claim_and_run(self, run_id: str) -> None:
        with self._lock:
            if run_id in self._claimed:  # handed over and polled at once: one attempt is enough
                return
            self._claimed.add(run_id)
        try:
            self._run_if_ours(run_id)
        finally:
            with self._lock:
                self._claimed.discard(run_id)  # once claimed it is no longer SCHEDULED: no second start

    def _run_if_ours(self, run_id: str) -> None:
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(UUID(run_id))
            flow = self._flow_for(client, flow_run.flow_id)
            if flow is None:
                log.info("run %s is not one of ours: left for another worker", run_id)
                return
            if not (flow_run.state and flow_run.state.is_scheduled()):
                return
            claim: State[Any] = Pending(message=f"claimed by {self.name}")
            result: OrchestrationResult[Any] = client.set_flow_run_state(flow_run.id, claim)
            if result.status != SetStateStatus.ACCEPT:
                return  # another executor (or a cancel) got there first
            flow_run = client.read_flow_run(flow_run.id)
        started = time.monotonic()
        with self._lock:
            self._running += 1
        try:
            state: object = run_flow(flow, flow_run=flow_run, return_type="state")  # type: ignore[arg-type]
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


def preload_flows() -> None:
    """Import every procedure's flow now, so the first run pays no import time."""
    for info in PROCEDURES.values():
        info.load_flow()
