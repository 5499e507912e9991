"""The alert intake: Alertmanager's (and Grafana's) webhook in, exactly one Prefect run per alert occurrence and
route out.

Prefect's own webhooks exist only in Prefect Cloud, hence this small ASGI app. Alertmanager does not retry a 4xx,
so a whole request is refused only when it is not a webhook at all: 401 without the bearer token (compared in
constant time), 413 over the body limit (counted while streaming), 400 not JSON (or nested past the parser's depth),
422 not a webhook (not an object, no alerts list, unknown version). 503 (retried by Alertmanager; nothing stored)
while the Prefect API cannot be reached or too many webhooks are being processed. Anything else is a 200, and each
alert in it is accepted or rejected on its own (models.parse_webhook), with the reason in the body and in
/metrics: one odd alert never loses its group. Accepted occurrences are written durably before the 200 and the
dispatcher turns them into runs.
Parsing, routing and the store's fsync run in a worker thread: the event loop only moves bytes, so a big webhook
does not hold up /healthz or the next acknowledgement.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.requests import ClientDisconnect

from runbook.app.catalog import PROCEDURES
from runbook.app.intake.aftermath import Aftermath
from runbook.app.intake.dispatch import CancelOutcome, Dispatcher, PrefectRejected, PrefectUnavailable
from runbook.app.intake.limits import Limits, RateLimitedLog
from runbook.app.intake.metrics import CONTENT_TYPE_LATEST, Metrics
from runbook.app.intake.models import NotAWebhook, ParsedWebhook, parse_webhook
from runbook.app.intake.pgstore import PostgresStore
from runbook.app.intake.policy import Decision, decide
from runbook.app.intake.routing import RunRequest, build_request, matching_routes, occurrence_key
from runbook.app.intake.store import Occurrence, Resolved, SqliteStore, Store, StoreUnavailable
from runbook.app.review import Review, load_reviews
from runbook.engine.config import Playbooks, Route, load_playbooks
from runbook.engine.errors import BadInput, ConfigError
from runbook.engine.notify import notify_route
from runbook.engine.redact import redact

log = logging.getLogger(__name__)

ACK_QUIET_S = 0.5  # webhooks count as still arriving this long after the last was answered (see _acknowledging)

# what routing and storing a webhook yields: the results in webhook order, the resolves whose runs may need
# cancelling, and the decisions that tripped a breaker
Stored = tuple[list[dict[str, Any]], list[tuple[dict[str, Any], Resolved]], list[Decision]]


@dataclass
class IntakeSettings:
    token: str
    prefect_api_url: str
    state_dir: Path
    state_dsn: str | None = field(default=None, repr=False)  # PostgreSQL shared by replicas; a secret
    prefect_api_auth: str | None = field(default=None, repr=False)  # None: PREFECT_API_AUTH_STRING
    playbook_dirs: list[Path] | None = None
    on_created: Callable[[str], None] | None = None
    limits: Limits = field(default_factory=Limits)


def open_store(state_dir: Path, dsn: str | None = None) -> Store:
    """PostgreSQL when a state DSN is configured (several replicas share it), else the SQLite file in
    ``state_dir`` (one intake). Here, where the intake is wired, so the two stores need not import each other."""
    if dsn:
        return PostgresStore(dsn)
    return SqliteStore(state_dir / "intake.sqlite")


def create_app(settings: IntakeSettings) -> FastAPI:
    """Wire the intake: its playbooks (routes checked against the catalog), store, dispatcher, metrics, endpoints."""
    playbooks = load_playbooks(settings.playbook_dirs)
    _check_routes(playbooks)
    store = open_store(settings.state_dir, settings.state_dsn)
    intake = Intake(settings.token, playbooks, store,
                    Dispatcher(store, settings.prefect_api_url, on_created=settings.on_created,
                               auth=settings.prefect_api_auth), settings.limits,
                    reviews_dir=settings.state_dir / "reviews")
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
    limits: Limits = field(default_factory=Limits)
    metrics: Metrics = field(default_factory=Metrics)
    reviews_dir: Path | None = None  # post-incident reviews written on resolve (None: none written)
    _background: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._expected = f"Bearer {self.token}".encode()
        self._routes = {r.name: r for r in self.playbooks.routes}
        self._deciding = threading.Lock()  # decide + accept of one webhook at a time: cooldowns see each other
        self._in_flight = 0
        self._notes = RateLimitedLog(log)
        self._aftermath = Aftermath(self.dispatcher.api_url, self.playbooks, self.reviews_dir, self._observe)
        self.dispatcher.on_resolved = self._resolved_while_created
        self.dispatcher.acknowledging = self._acknowledging
        self._answered_at = 0.0  # monotonic time the last webhook was answered
        if self.reviews_dir is not None:  # /metrics' incident histograms start from the reviews already written
            for review in load_reviews(self.reviews_dir):
                self._observe(review)

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        await self.dispatcher.start()
        self._aftermath.start()
        # Everything imported and wired so far lives as long as the process: out of the collector's sight. A full
        # collection otherwise walked it all (Prefect's and pydantic's objects) and held every thread meanwhile:
        # 120 ms on an idle machine, 600 ms on a busy one, the storm's worst acknowledgement.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await asyncio.to_thread(self._aftermath.stop)
            await self.dispatcher.stop()
            self.store.close()

    async def healthz(self) -> JSONResponse:
        ok = self.dispatcher.healthy
        # no store query: the count is kept by the store (SQLite: live; PostgreSQL: every replica's, as of its age)
        return JSONResponse({"status": "ok" if ok else "degraded", "prefect_api": ok,
                             "pending": self.store.pending_count(),
                             "pending_age_s": round(self.store.pending_age_s(), 1)}, status_code=200 if ok else 503)

    async def prometheus_metrics(self) -> PlainTextResponse:
        return PlainTextResponse(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def alerts(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            return await self._handle(request)
        finally:
            self.metrics.latency.observe(time.perf_counter() - started)

    def _refuse(self, request: Request, code: int, reason: str, detail: str, close: bool = False,
                **extra: Any) -> JSONResponse:
        """A whole request refused: counted, one rate-limited log line, and ``close`` when its body was not read
        (the connection is not worth keeping for the rest of it)."""
        self.metrics.requests_rejected.labels(reason).inc()
        peer = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        self._notes.note(reason, f"refused a request from {peer}: {code} {reason}: {detail}")
        headers = {"connection": "close"} if close else {}
        if code == 503:
            headers["retry-after"] = "1"
        return JSONResponse({"error": detail, **extra}, status_code=code, headers=headers)

    async def _handle(self, request: Request) -> JSONResponse:
        limits = self.limits
        auth = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(auth, self._expected):
            return self._refuse(request, 401, "unauthorized", "missing or wrong bearer token", close=True)
        declared = request.headers.get("content-length")
        too_large = f"body over {limits.max_body} bytes"
        if declared and declared.isdigit() and int(declared) > limits.max_body:
            return self._refuse(request, 413, "too_large", too_large, close=True)
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_body:
                    return self._refuse(request, 413, "too_large", too_large, close=True)
        except ClientDisconnect:  # the sender went away (or missed the body deadline): one line, no traceback
            return self._refuse(request, 400, "aborted", f"connection closed after {len(body)} bytes of the body")
        if self._in_flight >= limits.max_in_flight:
            return self._refuse(request, 503, "busy", f"{limits.max_in_flight} webhooks in progress; retry")
        self._in_flight += 1
        self.metrics.in_flight.inc()
        try:
            return await self._handle_webhook(request, bytes(body))
        finally:
            self._in_flight -= 1
            self._answered_at = time.monotonic()
            self.metrics.in_flight.dec()

    async def _handle_webhook(self, request: Request, body: bytes) -> JSONResponse:
        try:
            # one trip to a worker thread: decode, then (Prefect known to be up) route and store. Each hop between
            # the loop and a worker waits for the other thread to be scheduled and take the GIL: on a busy machine
            # that wait, not the work, was the acknowledgement's tail
            hook, stored = await asyncio.to_thread(self._decode_and_store, body)
            if stored is None:  # Prefect looked away: ask it before anything is stored
                if not await self.dispatcher.check_health():
                    why = "refuses our auth string (see the intake's log)" if self.dispatcher.refused \
                        else "unreachable"
                    return self._refuse(request, 503, "prefect_unavailable", f"Prefect API {why}; retry later")
                stored = await asyncio.to_thread(self._route_and_store, hook)
        except Undecodable as exc:
            return self._refuse(request, exc.code, exc.reason, exc.detail)
        except StoreUnavailable as exc:  # nothing was acknowledged: Alertmanager sends it again
            return self._refuse(request, 503, "store_unavailable", str(exc))
        return JSONResponse(await self._process(hook, stored))

    def _decode_and_store(self, body: bytes) -> tuple[ParsedWebhook, Stored | None]:
        """In a worker thread: the webhook decoded, and routed and stored unless Prefect is thought to be away
        (then None: the caller asks Prefect first, and a malformed body is still refused before a 503)."""
        try:
            hook = _decode(body, self.limits.max_alerts)
        except NotAWebhook as exc:
            raise Undecodable(422, "not_a_webhook", f"not an Alertmanager or Grafana webhook: {exc}") from None
        except RecursionError:
            raise Undecodable(400, "malformed_json", "JSON nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise Undecodable(400, "malformed_json", f"not JSON: {str(exc)[:200]}") from None
        return hook, (self._route_and_store(hook) if self.dispatcher.healthy else None)

    async def _process(self, hook: ParsedWebhook, stored: Stored) -> dict[str, Any]:
        results, resolves, tripped = stored
        for entry, resolved in resolves:  # the cancellations talk to Prefect: back on the loop, via the dispatcher
            entry["detail"] = await self._cancel(resolved)
            # status page, review: on a thread of their own
            self._aftermath.resolved(resolved.occurrence, datetime.now(UTC))
        for d in tripped:
            self._notify_later(d.request, "breaker", d.reason)
        if any(r["outcome"] == "run" for r in results):
            self.dispatcher.wake()
        out: dict[str, Any] = {"version": hook.version, "alerts": hook.total, "accepted": len(hook.alerts),
                               "rejected": len(hook.rejected), "results": results}
        if hook.truncated:
            out["truncated"] = hook.truncated
            out["note"] = (f"the sender left out {hook.truncated} alerts of this group (its max_alerts): they "
                           "were never received")
        return out

    def _route_and_store(self, hook: ParsedWebhook) -> Stored:
        """Route, validate, decide and store every accepted alert (in a worker thread): the results in webhook
        order, the resolutions whose runs may need cancelling, and the decisions that tripped a breaker."""
        metrics, store = self.metrics, self.store
        results: list[dict[str, Any]] = []
        resolves: list[tuple[dict[str, Any], Resolved]] = []
        firing: list[tuple[RunRequest, Route, int]] = []
        metrics.truncated.inc(hook.truncated)
        for r in hook.rejected:
            metrics.rejected.labels(r.code).inc()
            results.append({"index": r.index, "fingerprint": r.fingerprint, "outcome": "rejected", "code": r.code,
                            "reason": redact(r.detail)})
        routed = [(index, alert, matching_routes(self.playbooks.routes, alert.labels)) for index, alert in hook.alerts]
        resent = store.known_keys([occurrence_key(route.name, alert) for _, alert, routes in routed
                                   if alert.status != "resolved" for route in routes])  # one query, not one each
        for index, alert, routes in routed:
            metrics.received.labels(alert.status).inc()
            if not routes:
                metrics.unrouted.inc()
                results.append({"index": index, "fingerprint": alert.fingerprint, "outcome": "unrouted"})
                continue
            for route in routes:
                entry: dict[str, Any] = {"index": index, "fingerprint": alert.fingerprint, "route": route.name}
                if alert.status == "resolved":
                    resolved = store.mark_resolved(occurrence_key(route.name, alert))
                    entry["outcome"] = "resolved"
                    if resolved is None:
                        entry["detail"] = "no run was started for this occurrence"
                    else:
                        resolves.append((entry, resolved))
                    results.append(entry)
                    continue
                if occurrence_key(route.name, alert) in resent:  # a resend: nothing to validate or decide
                    metrics.deduplicated.inc()
                    results.append({**entry, "outcome": "duplicate"})
                    continue
                try:
                    firing.append((build_request(route, alert, self.playbooks), route, index))
                except (BadInput, ConfigError) as exc:  # a label naming a target that does not pass the rules
                    metrics.rejected.labels("invalid_target").inc()
                    results.append({**entry, "outcome": "rejected", "code": "invalid_target",
                                    "reason": redact(str(exc))})
        tripped: list[Decision] = []
        if firing:
            with self._deciding, store.deciding({req.procedure for req, _, _ in firing}) as tx:
                decisions = decide([(req, route) for req, route, _ in firing], tx)
                rows = [(i, (d.request, "pending" if d.outcome == "run" else "suppressed", d.reason))
                        for i, d in enumerate(decisions) if d.outcome in ("run", "cooldown")]
                for (i, _), new in zip(rows, tx.accept([row for _, row in rows]), strict=True):
                    if not new:  # another writer stored it first (the store's locks make this a safety net)
                        decisions[i] = replace(decisions[i], outcome="duplicate", breaker_tripped=False,
                                               reason="this alert occurrence already has its run")
            for d, (_, _, index) in zip(decisions, firing, strict=True):
                entry = {"index": index, "fingerprint": d.request.fingerprint, "route": d.request.route,
                         "outcome": d.outcome}
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
                    tripped.append(d)
                results.append(entry)
        return results, resolves, tripped

    def _acknowledging(self) -> bool:
        """Webhooks are arriving: one is being handled, or the last was answered within ACK_QUIET_S (a sender
        posting batch after batch leaves gaps of a millisecond between them). Read by the dispatcher's thread."""
        return self._in_flight > 0 or time.monotonic() - self._answered_at < ACK_QUIET_S

    def _observe(self, review: Review) -> None:
        self.metrics.observe_review(review.procedure, review.figures.time_to_remediate_s,
                                    review.figures.time_to_recover_s)

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

    async def _cancel(self, resolved: Resolved) -> str:
        try:
            outcome = await self.dispatcher.cancel(resolved)
        except (PrefectUnavailable, PrefectRejected) as exc:  # the run carries on; say so
            return f"could not cancel: {exc}"
        if outcome.cancelled:
            self.metrics.cancelled.inc()
        return outcome.detail

    def _resolved_while_created(self, occ: Occurrence, outcome: CancelOutcome) -> None:
        """The dispatcher cancelled (or found started) the run of an alert that resolved while the run was being
        created: count it as the resolve would have, and record the resolve with the run (its review too)."""
        if outcome.cancelled:
            self.metrics.cancelled.inc()
        at = datetime.fromtimestamp(occ.resolved_at, UTC) if occ.resolved_at else datetime.now(UTC)
        self._aftermath.resolved(occ, at)


class Undecodable(Exception):
    """The body is not a webhook (malformed JSON, another document): the whole request is refused with this."""

    def __init__(self, code: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.reason, self.detail = code, reason, detail


def _decode(body: bytes, max_alerts: int) -> ParsedWebhook:
    """JSON, then the webhook alert by alert (CPU work: called in a worker thread). Raises ValueError for
    malformed JSON, NotAWebhook (a ValueError) for a JSON document that is not a webhook, RecursionError for JSON
    nested past the parser's depth."""
    return parse_webhook(json.loads(body), max_alerts)


def _check_routes(playbooks: Playbooks) -> None:
    for route in playbooks.routes:
        if route.procedure not in PROCEDURES:
            raise ConfigError(f"route {route.name!r}: unknown procedure {route.procedure!r} "
                              f"(known: {', '.join(PROCEDURES)})")
