"""Turns stored occurrences into Prefect flow runs, exactly once, and cancels them when the alert resolves.

Exactly once: the idempotency key is the occurrence key (route + fingerprint + startsAt). Prefect deduplicates
keys per flow, not per deployment, so the route is part of the key; a retry after a crash or a second intake
replica gets the same run back instead of a new one.
Latency: the request handler wakes the dispatcher directly (no polling); a created run is handed to the local
executor, when there is one, so its first task starts within a fraction of a second.
Replicas sharing a PostgreSQL store: each dispatcher claims the occurrences it creates runs for (store.claim), so
two never create one run twice; a sweep every SWEEP_S picks up what a replica that died had accepted or claimed.
Resolves: a run is cancelled while it has not started (or waits for approval). A resolve that arrives while the
run is being created finds no run to cancel; it is recorded on the occurrence, recording the run (mark_created)
sees it, and the dispatcher cancels the run it just created, on the same path, instead of handing it over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import httpx

from runbook.app.intake.policy import run_parameters
from runbook.app.intake.routing import RunRequest
from runbook.app.intake.store import WAITING, Occurrence, Resolved, Store, StoreUnavailable
from runbook.app.remote_run import deployment_filter, unauthorized_message
from runbook.engine.prefect_env import auth_header, env_auth_string

log = logging.getLogger(__name__)

T = TypeVar("T")
CANCELLABLE = {"SCHEDULED", "PENDING", "PAUSED"}
SWEEP_S = 15.0
CLAIM_BATCH = 200  # occurrences claimed at once when no webhook is arriving


@dataclass(frozen=True)
class CancelOutcome:
    detail: str  # what happened, for the resolve's result and the log
    cancelled: bool  # this call cancelled a run (or a dispatch before any run): /metrics counts it, once


class Dispatcher:
    def __init__(self, store: Store, api_url: str, on_created: Callable[[str], None] | None = None,
                 concurrency: int = 8, timeout_s: float = 10.0, auth: str | None = None) -> None:
        """``auth``: the Prefect API's auth string (None: PREFECT_API_AUTH_STRING; "": none)."""
        self.store = store
        self.api_url = api_url.rstrip("/")
        self._headers = auth_header(env_auth_string() if auth is None else auth)
        self.on_created = on_created
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.healthy = False
        self.refused = False  # the API answered 401 to our auth string
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread
        self._wake: asyncio.Event
        self._deployments: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        # an occurrence resolved while its run was being created, once the run is cancelled (or found started):
        # the intake counts the cancel and records the resolve with the run (called on the dispatcher's thread)
        self.on_resolved: Callable[[Occurrence, CancelOutcome], None] | None = None
        # the intake says whether webhooks are arriving (then runs are created one at a time: see _run)
        self.acknowledging: Callable[[], bool] | None = None
        # a test seam: called in a worker thread after a run is created and before it is recorded, so a test can
        # hold the dispatcher there while it sends the alert's resolve (None in production)
        self.after_create: Callable[[Occurrence, str], None] | None = None

    # -------------------------------------------------------------- lifecycle
    # The dispatcher runs its own event loop in its own thread: creating a hundred runs must not sit between the
    # intake's event loop and the next acknowledgement. The async methods below are called from the intake's
    # loop and hop over to the dispatcher's.

    async def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,), daemon=True, name="dispatcher")
        self._thread.start()
        if not await asyncio.to_thread(ready.wait, 10):
            raise RuntimeError("the dispatcher thread did not start")
        await self.check_health()
        self.wake()  # whatever a previous process left pending

    def _thread_main(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._wake = asyncio.Event()
        self._http = httpx.AsyncClient(base_url=self.api_url, timeout=self.timeout_s, trust_env=False,
                                       headers=self._headers)
        self._task = self._loop.create_task(self._run(), name="dispatcher")
        self._health_task = self._loop.create_task(self._watch_health(), name="prefect-health")
        ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def stop(self) -> None:
        if self._loop is None:
            return
        await self._in_loop(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, 10)

    async def _shutdown(self) -> None:
        for t in (self._task, self._health_task):
            if t:
                t.cancel()
        for t in (self._task, self._health_task):
            if t:
                try:
                    await t
                except asyncio.CancelledError:
                    pass
        if self._http:
            await self._http.aclose()

    async def _in_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def wake(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def check_health(self) -> bool:
        return await self._in_loop(self._check_health())

    async def _check_health(self) -> bool:
        """Prefect answers and accepts our auth string (/health answers anyone: ask /admin/version, as cheap), so a
        wrong string makes the intake answer 503 (Alertmanager retries) instead of accepting alerts it cannot run."""
        assert self._http is not None
        try:
            resp = await self._http.get("/admin/version", timeout=2.0)
            if resp.status_code == 401 and not self.refused:  # said once, not every half second
                log.error("%s", self._unauthorized())
            self.refused = resp.status_code == 401
            self.healthy = resp.status_code == 200
        except httpx.HTTPError:
            self.healthy = False
        return self.healthy

    def _unauthorized(self) -> str:
        return unauthorized_message(self.api_url.removesuffix("/api"), sent=bool(self._headers))

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(1.0 if self.healthy else 0.5)
            was = self.healthy
            if await self._check_health() and not was:
                self._wake.set()

    # -------------------------------------------------------------- dispatch

    async def _run(self) -> None:
        wide, narrow = asyncio.Semaphore(self.concurrency), asyncio.Semaphore(1)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), SWEEP_S)
            self._wake.clear()
            while True:
                # acknowledgements first: while webhooks are arriving, runs are created one at a time, a few per
                # claim (then asked again). On one machine the Prefect server spends ~50 ms of CPU on each run
                # it creates; eight at once starved the webhooks' threads of CPU (a storm's ack p99 on a busy
                # machine: 41-110 ms with eight, 33-55 ms with one; the runs were all created as soon, since the
                # server was the bottleneck either way)
                yielding = self.acknowledging is not None and self.acknowledging()
                limit = self.concurrency if yielding else CLAIM_BATCH
                batch = await asyncio.to_thread(self._claim, limit)  # the store's writes never run on the loop
                if not batch:
                    break
                sem = narrow if yielding else wide
                results = await asyncio.gather(*(self._create_recorded(o, sem) for o in batch))
                if not all(results):
                    await asyncio.sleep(1.0)  # Prefect is away: the watcher wakes us when it is back
                    if not self.healthy:
                        break

    def _claim(self, limit: int) -> list[Occurrence]:
        """The next batch to create runs for; then the pending count /healthz reports is taken again (a shared
        store's count includes other replicas' work: it is refreshed here, at least every sweep, never in the
        request path)."""
        try:
            batch = self.store.claim(limit)
        except StoreUnavailable as exc:  # the next wake or sweep tries again
            log.warning("cannot read pending occurrences: %s", exc)
            return []
        with contextlib.suppress(StoreUnavailable):  # the count just grows older: /healthz shows its age
            self.store.refresh_pending()
        return batch

    async def _create_recorded(self, occ: Occurrence, sem: asyncio.Semaphore) -> bool:
        try:
            return await self._create(occ, sem)
        except StoreUnavailable as exc:  # its claim expires, and the same run (idempotency key) is recorded then
            log.warning("the run for %s is not recorded yet: %s", occ.key, exc)
            return False

    async def _create(self, occ: Occurrence, sem: asyncio.Semaphore) -> bool:
        async with sem:
            try:
                deployment_id = await self._deployment_id(occ.procedure)
                req = RunRequest(key=occ.key, route=occ.route, procedure=occ.procedure, env=occ.env,
                                 params=occ.params, target="", fingerprint="", starts_at="",
                                 alertname=occ.alertname, mode=occ.mode)
                body: dict[str, Any] = {
                    "parameters": run_parameters(req),
                    "idempotency_key": f"runbook-alert:{occ.key}",
                    "tags": [*occ.tags, f"occurrence:{occ.key}"],
                    "name": f"{occ.alertname or 'alert'}-{occ.key[:8]}".lower()[:60],
                    "state": {"type": "SCHEDULED", "name": "Scheduled"},
                }
                resp = await self._post(f"/deployments/{deployment_id}/create_flow_run", body)
                run_id = resp["id"]
            except PrefectUnavailable as exc:
                self.healthy = False
                log.warning("cannot create the run for %s yet: %s", occ.key, exc)
                with contextlib.suppress(StoreUnavailable):  # else its claim expires
                    await asyncio.to_thread(self.store.release, occ.key)
                return False
            except PrefectRejected as exc:
                await asyncio.to_thread(self.store.mark, occ.key, "failed", str(exc)[:500])
                log.error("Prefect rejected the run for %s: %s", occ.key, exc)
                return True
            if self.after_create is not None:
                await asyncio.to_thread(self.after_create, occ, run_id)
            # in a thread: a store write (an fsync, a PostgreSQL round trip) on the event loop held every webhook
            # behind it, the storm's ack tail. Recorded before the run is handed over: an alert that resolved
            # meanwhile must not have its run started here.
            resolved_at = await asyncio.to_thread(self.store.mark_created, occ.key, run_id)
            if resolved_at is not None:
                await self._cancel_created(replace(occ, status="created", flow_run_id=run_id,
                                                   resolved_at=resolved_at))
            elif self.on_created:
                self.on_created(run_id)
            return True

    async def _cancel_created(self, occ: Occurrence) -> None:
        """The alert resolved while this run was being created: cancel it as the resolve would have."""
        assert occ.flow_run_id
        try:
            outcome = await self._cancel_run(occ.flow_run_id)
        except (PrefectUnavailable, PrefectRejected) as exc:  # as for a resolve: it carries on, and a resent
            outcome = CancelOutcome(f"could not cancel: {exc}", False)  # resolve tries again
        log.info("alert of %s resolved while its run was being created: %s", occ.key, outcome.detail)
        if self.on_resolved:
            self.on_resolved(occ, outcome)

    async def _deployment_id(self, procedure: str) -> str:
        if procedure not in self._deployments:
            found = await self._post("/deployments/filter", deployment_filter(procedure))
            if not found:
                raise PrefectRejected(f"no deployment of {procedure} on the Prefect server (run `runbook deploy`)")
            self._deployments[procedure] = found[0]["id"]
        return self._deployments[procedure]

    async def cancel(self, resolved: Resolved) -> CancelOutcome:
        """Cancel a resolved occurrence's run if it has not started or waits for approval; say what happened."""
        return await self._in_loop(self._cancel(resolved))

    async def _cancel(self, resolved: Resolved) -> CancelOutcome:
        occ = resolved.occurrence
        if occ.flow_run_id:
            return await self._cancel_run(occ.flow_run_id)
        if occ.status in WAITING:  # claimed and being created (or to be created again): see _create
            return CancelOutcome("run being created: will be cancelled", False)
        if occ.status == "cancelled":
            return CancelOutcome("no run yet: dispatch cancelled", resolved.was == "pending")
        return CancelOutcome(f"no run ({occ.status}): nothing to cancel", False)

    async def _cancel_run(self, flow_run_id: str) -> CancelOutcome:
        run = await self._get(f"/flow_runs/{flow_run_id}")
        state = (run.get("state") or {}).get("type", "")
        if state not in CANCELLABLE:
            return CancelOutcome(f"run {flow_run_id} is {state.lower() or 'unknown'}: left to finish", False)
        await self._post(f"/flow_runs/{flow_run_id}/set_state", {
            "state": {"type": "CANCELLED", "name": "Cancelled", "message": "alert resolved"}, "force": True})
        return CancelOutcome(f"run {flow_run_id} cancelled ({state.lower()})", True)

    # -------------------------------------------------------------- HTTP with mapped errors

    async def _get(self, path: str) -> Any:
        return await self._call("GET", path, None)

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        return await self._call("POST", path, body)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        assert self._http is not None
        started = time.monotonic()
        try:
            resp = await self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise PrefectUnavailable(f"{type(exc).__name__} after {time.monotonic() - started:.1f} s") from None
        if resp.status_code >= 500 or resp.status_code == 429:
            raise PrefectUnavailable(f"HTTP {resp.status_code}")
        if resp.status_code == 401:  # our auth string, not the alert: keep it pending until the string is fixed
            raise PrefectUnavailable(self._unauthorized())
        if resp.status_code >= 400:
            raise PrefectRejected(f"HTTP {resp.status_code}: {resp.text[:300]}")
        return resp.json()


class PrefectUnavailable(Exception):
    """Prefect could not be reached or answered 5xx: retry later, the occurrence stays pending."""


class PrefectRejected(Exception):
    """Prefect refused the request (4xx): retrying will not help."""
