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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import ValidationError

from runbook.app.catalog import PROCEDURES
from runbook.app.intake.dispatch import Dispatcher, PrefectRejected, PrefectUnavailable
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


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("runbook_intake_alerts_received", "alerts received", ["status"], registry=r)
        self.runs = Counter("runbook_intake_runs_created", "runs requested (one per occurrence and route)",
                            ["route"], registry=r)
        self.deduplicated = Counter("runbook_intake_alerts_deduplicated", "resends of a known occurrence",
                                    registry=r)
        self.suppressed = Counter("runbook_intake_alerts_suppressed", "held back by a cooldown", ["route"],
                                  registry=r)
        self.rejected = Counter("runbook_intake_alerts_rejected", "alerts or requests rejected", ["reason"],
                                registry=r)
        self.unrouted = Counter("runbook_intake_alerts_unrouted", "alerts no route matched", registry=r)
        self.breaker = Counter("runbook_intake_breaker_trips", "runs narrowed to dry run by a breaker", ["route"],
                               registry=r)
        self.cancelled = Counter("runbook_intake_runs_cancelled", "runs cancelled on resolve", registry=r)
        self.latency = Histogram("runbook_intake_request_seconds", "webhook handling time", registry=r,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))


def create_app(settings: IntakeSettings) -> FastAPI:
    metrics = Metrics()
    playbooks = load_playbooks(settings.playbook_dirs)
    _check_routes(playbooks)
    store = Store(settings.state_dir / "intake.sqlite")
    dispatcher = Dispatcher(store, settings.prefect_api_url, on_created=settings.on_created)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await dispatcher.start()
        try:
            yield
        finally:
            await dispatcher.stop()
            store.close()

    app = FastAPI(title="runbook alert intake", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.store, app.state.dispatcher, app.state.metrics = store, dispatcher, metrics
    expected = f"Bearer {settings.token}".encode()

    def reject(code: int, reason: str, detail: str) -> JSONResponse:
        metrics.rejected.labels(reason).inc()
        return JSONResponse({"error": detail}, status_code=code)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        ok = dispatcher.healthy
        return JSONResponse({"status": "ok" if ok else "degraded", "prefect_api": ok,
                             "pending": len(store.pending(1000))}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/alerts")
    async def alerts(request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            return await _handle(request)
        finally:
            metrics.latency.observe(time.perf_counter() - started)

    async def _handle(request: Request) -> JSONResponse:
        auth = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(auth, expected):
            return reject(401, "unauthorized", "missing or wrong bearer token")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY:
            return reject(413, "too_large", f"body over {MAX_BODY} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return reject(413, "too_large", f"body over {MAX_BODY} bytes")
        try:
            raw = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return reject(400, "malformed_json", f"not JSON: {str(exc)[:200]}")
        try:
            hook = Webhook.model_validate(raw)
        except ValidationError as exc:
            metrics.rejected.labels("wrong_shape").inc()
            errors = [f"{'.'.join(map(str, e['loc'])) or '(body)'}: {e['msg']}" for e in exc.errors()[:10]]
            return JSONResponse({"error": "not an Alertmanager v4 webhook", "details": errors}, status_code=422)
        if not dispatcher.healthy and not await dispatcher.check_health():
            return reject(503, "prefect_unavailable", "Prefect API unreachable; retry later")
        return JSONResponse(await _process(hook))

    async def _process(hook: Webhook) -> dict[str, Any]:
        results: list[dict[str, Any]] = []
        firing: list[tuple[RunRequest, Route]] = []
        for alert in hook.alerts:
            metrics.received.labels(alert.status).inc()
            routes = matching_routes(playbooks.routes, alert.labels)
            if not routes:
                metrics.unrouted.inc()
                results.append({"fingerprint": alert.fingerprint, "outcome": "unrouted"})
                continue
            for route in routes:
                if alert.status == "resolved":
                    results.append(await _resolve(route, alert))
                    continue
                if store.known(occurrence_key(route.name, alert)):  # a resend: nothing to validate or decide
                    metrics.deduplicated.inc()
                    results.append({"fingerprint": alert.fingerprint, "route": route.name, "outcome": "duplicate"})
                    continue
                try:
                    firing.append((build_request(route, alert, playbooks), route))
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
                    _notify_later(d.request, "breaker", d.reason)
                results.append(entry)
            dispatcher.wake()
        return {"accepted": len(hook.alerts), "results": results}

    routes_by_name = {r.name: r for r in playbooks.routes}
    background: set[asyncio.Task[Any]] = set()

    def _notify_later(req: RunRequest, event: str, text: str) -> None:
        """Deliver in a thread after the acknowledgement: a slow webhook must not delay Alertmanager."""
        route = routes_by_name[req.route]
        if not route.notify:
            return
        env = playbooks.environment(req.env)
        task = asyncio.create_task(asyncio.to_thread(
            notify_route, route, env, event, text, {"alertname": req.alertname, **req.params}))
        background.add(task)
        task.add_done_callback(background.discard)

    async def _resolve(route: Route, alert: Any) -> dict[str, Any]:
        key = occurrence_key(route.name, alert)
        occ = store.mark_resolved(key)
        entry: dict[str, Any] = {"fingerprint": alert.fingerprint, "route": route.name, "outcome": "resolved"}
        if occ is None:
            entry["detail"] = "no run was started for this occurrence"
            return entry
        try:
            entry["detail"] = await dispatcher.cancel(occ)
            if "cancelled" in entry["detail"]:
                metrics.cancelled.inc()
        except (PrefectUnavailable, PrefectRejected) as exc:  # the run carries on; say so
            entry["detail"] = f"could not cancel: {exc}"
        return entry

    return app


def _check_routes(playbooks: Playbooks) -> None:
    for route in playbooks.routes:
        if route.procedure not in PROCEDURES:
            raise ConfigError(f"route {route.name!r}: unknown procedure {route.procedure!r} "
                              f"(known: {', '.join(PROCEDURES)})")
