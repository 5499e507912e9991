"""The sandbox "backend": a small real HTTP service exposing the runbook's application metrics.

Run as its own process by runbook.sandbox.backend (``python -m runbook.sandbox.backend_app --port P ...``).
It stands in for the Pafar FastAPI backend where the runbook looks at it from outside: request counts by status,
a latency histogram and active sessions in Prometheus text format (through prometheus_client, the library the
Python ecosystem uses for exactly this), a health endpoint, a slow endpoint and an erroring endpoint, so tests can
produce known request counts and latencies.

A second listener serves HTTPS with a self-signed certificate: the loopback stand-in for the external payment
provider (it answers 401 like api.stripe.com does without an API key), since no traffic may leave the machine.
"""

from __future__ import annotations

import argparse
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry()
REQUESTS = Counter("http_requests", "HTTP requests served", ["method", "handler", "status"], registry=REGISTRY)
LATENCY = Histogram(
    "http_request_duration_seconds", "HTTP request latency", ["handler"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
SESSIONS = Gauge("active_sessions_total", "sessions currently logged in", registry=REGISTRY)

ROUTES = {"/api/health", "/api/slow", "/api/error", "/api/bookings"}


class BackendHandler(BaseHTTPRequestHandler):
    server_version = "pafar-sandbox-backend/1"
    slow_ms: int = 800

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's name)
        pass  # quiet: the metrics are the record

    def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
        url = urlsplit(self.path)
        if url.path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            return
        handler = url.path if url.path in ROUTES else "other"
        started = time.perf_counter()
        status, body = self._route(url.path, parse_qs(url.query))
        self._send(status, json.dumps(body).encode(), "application/json")
        LATENCY.labels(handler).observe(time.perf_counter() - started)
        REQUESTS.labels("GET", handler, str(status)).inc()

    def _route(self, path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, object]]:
        if path == "/api/health":
            return 200, {"status": "ok"}
        if path == "/api/slow":
            ms = min(int((query.get("ms") or [str(self.slow_ms)])[0]), 30_000)
            time.sleep(ms / 1000)
            return 200, {"slept_ms": ms}
        if path == "/api/error":
            return 500, {"error": "payment provider timeout"}
        if path == "/api/bookings":
            return 200, {"bookings": []}
        return 404, {"error": "not found"}

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class PaymentProviderHandler(BaseHTTPRequestHandler):
    """Every request without an API key gets 401, as the real provider answers."""

    server_version = "payments-stand-in/1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps({"error": {"message": "You did not provide an API key."}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tls-port", type=int)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--slow-ms", type=int, default=800)
    ap.add_argument("--sessions", type=int, default=3)
    args = ap.parse_args(argv)
    BackendHandler.slow_ms = args.slow_ms
    SESSIONS.set(args.sessions)
    # Series exist from the first scrape at 0, as instrumentation guides advise: otherwise the first errors
    # create the series at N and rate() over it reads 0 (Prometheus cannot know the counter started at 0).
    for handler, status in (("/api/health", "200"), ("/api/slow", "200"), ("/api/error", "500"),
                            ("/api/bookings", "200")):
        REQUESTS.labels("GET", handler, status)
        LATENCY.labels(handler)
    http = ThreadingHTTPServer(("127.0.0.1", args.port), BackendHandler)
    http.daemon_threads = True
    if args.tls_port:
        tls = ThreadingHTTPServer(("127.0.0.1", args.tls_port), PaymentProviderHandler)
        tls.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
        threading.Thread(target=tls.serve_forever, daemon=True).start()
    http.serve_forever()


if __name__ == "__main__":
    main()
