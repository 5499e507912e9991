"""The alert intake: Alertmanager's webhook in, exactly one Prefect run per alert occurrence and route out.

Prefect's own webhooks exist only in Prefect Cloud, hence this small ASGI app. Order of checks for POST /alerts:
401 without the bearer token (compared in constant time), 413 over 1 MiB (counted while streaming, so a chunked
body cannot get round it), 400 for malformed JSON, 422 for the wrong shape, 503 while the Prefect API cannot be
reached (Alertmanager retries; nothing is stored, so nothing is lost). Then every alert is routed, validated and
decided; accepted occurrences are written durably before the 200, and the dispatcher turns them into runs.
Per-alert rejections (unknown service, label with shell metacharacters) are in the 200's body and metrics:
Alertmanager retrying them would not help.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError

from runbook.app.catalog import PROCEDURES
from runbook.app.intake.dispatch import Dispatcher, PrefectRejected, PrefectUnavailable
from runbook.app.intake.metrics import CONTENT_TYPE_LATEST, Metrics
from runbook.app.intake.models import Webhook
from runbook.app.intake.policy import decide
from runbook.app.intake.routing import RunRequest, build_request, matching_routes, occurrence_key
from runbook.app.intake.store import Store
from runbook.engine.config import Playbooks, Route, load_playbooks
from runbook.engine.errors import BadInput, ConfigError
from runbook.engine.notify import notify_route
from runbook.engine.redact import redact

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024


@dataclass
class IntakeSettings:
    token: str
    prefect_api_url: str
    state_dir: Path
    playbook_dirs: list[Path] | None = None
    on_created: Callable[[str], None] | None = None


def create_app(settings: IntakeSettings) -> FastAPI:
    """Wire the intake: its playbooks (routes checked against the catalog), store, dispatcher, metrics, endpoints."""
    playbooks = load_playbooks(settings.playbook_dirs)
    _check_routes(playbooks)
    store = Store(settings.state_dir / "intake.sqlite")
    intake = Intake(settings.token, playbooks, store,
                    Dispatcher(store, settings.prefect_api_url, on_created=settings.on_created))
    app = FastAPI(title="runbook alert intake", lifespan=intake.lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.store, app.state.dispatcher, app.state.metrics = store, intake.dispatcher, intake.metrics
    app.get("/healthz")(intake.healthz)
    app.get("/metrics")(intake.prometheus_metrics)
    app.post("/alerts")(intake.alerts)
    return app


@dataclass
class Intake:
    """The intake's state and its endpoints (methods), so each piece can be read, and tested, on its own."""

    token: str
    playbooks: Playbooks
    store: Store
    dispatcher: Dispatcher
    metrics: Metrics = field(default_factory=Metrics)
    _background: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._expected = f"Bearer {self.token}".encode()
        self._routes = {r.name: r for r in self.playbooks.routes}

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        await self.dispatcher.start()
        try:
            yield
        finally:
            await self.dispatcher.stop()
            self.store.close()

    async def healthz(self) -> JSONResponse:
        ok = self.dispatcher.healthy
        return JSONResponse({"status": "ok" if ok else "degraded", "prefect_api": ok,
                             "pending": len(self.store.pending(1000))}, status_code=200 if ok else 503)

    async def prometheus_metrics(self) -> PlainTextResponse:
        return PlainTextResponse(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def alerts(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            return await self._handle(request)
        finally:
            self.metrics.latency.observe(time.perf_counter() - started)

    def _reject(self, code: int, reason: str, detail: str) -> JSONResponse:
        self.metrics.rejected.labels(reason).inc()
        return JSONResponse({"error": detail}, status_code=code)

    async def _handle(self, request: Request) -> JSONResponse:
        auth = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(auth, self._expected):
            return self._reject(401, "unauthorized", "missing or wrong bearer token")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY:
            return self._reject(413, "too_large", f"body over {MAX_BODY} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return self._reject(413, "too_large", f"body over {MAX_BODY} bytes")
        try:
            raw = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return self._reject(400, "malformed_json", f"not JSON: {str(exc)[:200]}")
        try:
            hook = Webhook.model_validate(raw)
        except ValidationError as exc:
            self.metrics.rejected.labels("wrong_shape").inc()
            errors = [f"{'.'.join(map(str, e['loc'])) or '(body)'}: {e['msg']}" for e in exc.errors()[:10]]
            return JSONResponse({"error": "not an Alertmanager v4 webhook", "details": errors}, status_code=422)
        if not self.dispatcher.healthy and not await self.dispatcher.check_health():
            return self._reject(503, "prefect_unavailable", "Prefect API unreachable; retry later")
        return JSONResponse(await self._process(hook))

    async def _process(self, hook: Webhook) -> dict[str, Any]:
        metrics, store = self.metrics, self.store
        results: list[dict[str, Any]] = []
        firing: list[tuple[RunRequest, Route]] = []
        for alert in hook.alerts:
            metrics.received.labels(alert.status).inc()
            routes = matching_routes(self.playbooks.routes, alert.labels)
            if not routes:
                metrics.unrouted.inc()
                results.append({"fingerprint": alert.fingerprint, "outcome": "unrouted"})
                continue
            for route in routes:
                if alert.status == "resolved":
                    results.append(await self._resolve(route, alert))
                    continue
                if store.known(occurrence_key(route.name, alert)):  # a resend: nothing to validate or decide
                    metrics.deduplicated.inc()
                    results.append({"fingerprint": alert.fingerprint, "route": route.name, "outcome": "duplicate"})
                    continue
                try:
                    firing.append((build_request(route, alert, self.playbooks), route))
                except (BadInput, ConfigError) as exc:
                    metrics.rejected.labels("invalid_alert").inc()
                    results.append({"fingerprint": alert.fingerprint, "route": route.name, "outcome": "rejected",
                                    "reason": redact(str(exc))})
        if firing:
            decisions = decide(firing, store)
            to_store = [(d.request, "pending", d.reason) for d in decisions if d.outcome == "run"]
            to_store += [(d.request, "suppressed", d.reason) for d in decisions if d.outcome == "cooldown"]
            store.accept(to_store)
            for d in decisions:
                entry = {"fingerprint": d.request.fingerprint, "route": d.request.route, "outcome": d.outcome}
                if d.reason:
                    entry["reason"] = d.reason
                if d.outcome == "run":
                    metrics.runs.labels(d.request.route).inc()
                    entry["mode"] = d.request.mode
                elif d.outcome == "duplicate":
                    metrics.deduplicated.inc()
                else:
                    metrics.suppressed.labels(d.request.route).inc()
                if d.breaker_tripped:
                    metrics.breaker.labels(d.request.route).inc()
                    self._notify_later(d.request, "breaker", d.reason)
                results.append(entry)
            self.dispatcher.wake()
        return {"accepted": len(hook.alerts), "results": results}

    def _notify_later(self, req: RunRequest, event: str, text: str) -> None:
        """Deliver in a thread after the acknowledgement: a slow webhook must not delay Alertmanager."""
        route = self._routes[req.route]
        if not route.notify:
            return
        env = self.playbooks.environment(req.env)
        task = asyncio.create_task(asyncio.to_thread(
            notify_route, route, env, event, text, {"alertname": req.alertname, **req.params}))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resolve(self, route: Route, alert: Any) -> dict[str, Any]:
        occ = self.store.mark_resolved(occurrence_key(route.name, alert))
        entry: dict[str, Any] = {"fingerprint": alert.fingerprint, "route": route.name, "outcome": "resolved"}
        if occ is None:
            entry["detail"] = "no run was started for this occurrence"
            return entry
        try:
            entry["detail"] = await self.dispatcher.cancel(occ)
            if "cancelled" in entry["detail"]:
                self.metrics.cancelled.inc()
        except (PrefectUnavailable, PrefectRejected) as exc:  # the run carries on; say so
            entry["detail"] = f"could not cancel: {exc}"
        return entry


def _check_routes(playbooks: Playbooks) -> None:
    for route in playbooks.routes:
        if route.procedure not in PROCEDURES:
            raise ConfigError(f"route {route.name!r}: unknown procedure {route.procedure!r} "
                              f"(known: {', '.join(PROCEDURES)})")
