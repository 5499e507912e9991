"""HTTP checks: status, a `curl -w` style timing breakdown and TLS certificate days left, per configured endpoint.

The runbook's ``curl -w "@curl-format.txt" -o /dev/null -s https://yourdomain.com/api/health`` as data: DNS,
connect, TLS, time to first byte and total, in milliseconds from the start like curl's ``time_*`` variables.
Built on httpx (through httpcore's documented ``trace`` extension for the phase events) rather than a hand-written
HTTP client: the name is resolved first with its own timeout (tasks.network.resolve), then the request goes to the
address with the original Host header and SNI name, so the TLS check verifies the real hostname.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from runbook.engine.config import Environment, HttpCheckConfig
from runbook.engine.findings import TableBlock
from runbook.engine.steps import step
from tasks.probes import HOST, Check, CheckRow, HttpCheckRow, resolve, run_checks

MAX_BODY = 1 << 20


def _cert_days_left(ssl_object: ssl.SSLObject | None) -> tuple[float | None, str]:
    if ssl_object is None:
        return None, ""
    cert = ssl_object.getpeercert()
    if not cert or "notAfter" not in cert:
        return None, ""
    expires = datetime.fromtimestamp(ssl.cert_time_to_seconds(str(cert["notAfter"])), UTC)
    return round((expires - datetime.now(UTC)).total_seconds() / 86400, 1), expires.isoformat()


def check_http(name: str, cfg: HttpCheckConfig, source: str = HOST, source_address: str | None = None,
               ) -> HttpCheckRow:
    """One GET with the phase timings; never raises for a network failure (the row says what failed)."""
    url = urlsplit(cfg.url)
    base = HttpCheckRow(source=source, destination=f"{name} {cfg.url}", kind="http", ok=False, latency_ms=None,
                        result="", name=name, url=cfg.url, expect_status=cfg.expect_status)
    verify: ssl.SSLContext | bool = False  # plain http: no context to build
    if url.scheme == "https":
        verify = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    # built before the clock starts: like curl's time_* values, the phases measure the transfer, not our set-up
    client = httpx.Client(transport=httpx.HTTPTransport(verify=verify, local_address=source_address, retries=0),
                          timeout=cfg.timeout_s, trust_env=False, follow_redirects=False)
    try:
        return _timed_get(client, cfg, source, base)
    finally:
        client.close()


def _timed_get(client: httpx.Client, cfg: HttpCheckConfig, source: str, base: HttpCheckRow) -> HttpCheckRow:
    url = urlsplit(cfg.url)
    host = url.hostname or ""
    started = time.perf_counter()
    dns = resolve(host, cfg.timeout_s, source)
    if not dns.ok:
        return replace(base, dns_ms=dns.latency_ms, result="unresolvable", error=f"cannot resolve {host}: {dns.error}")
    address = dns.result.split(", ")[0]
    netloc = f"{address}:{url.port}" if url.port else address
    target = urlunsplit((url.scheme, netloc, url.path or "/", url.query, ""))
    marks: dict[str, float] = {}

    def trace(event: str, info: dict[str, Any]) -> None:
        marks.setdefault(event, time.perf_counter())

    def ms(event: str) -> float | None:
        return round((marks[event] - started) * 1000, 2) if event in marks else None

    status: int | None = None
    result = error = cert_expires = ""
    cert_days_left: float | None = None
    try:
        request = client.build_request("GET", target, headers={"Host": url.netloc.rsplit("@", 1)[-1],
                                                               "User-Agent": "runbook-http-check"},
                                       extensions={"trace": trace, "sni_hostname": host})
        response = client.send(request, stream=True)
        try:
            stream = response.extensions.get("network_stream")
            ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
            cert_days_left, cert_expires = _cert_days_left(ssl_object)
            size = 0
            for chunk in response.iter_raw():
                size += len(chunk)
                if size > MAX_BODY:
                    break
            status = response.status_code
        finally:
            response.close()
    except httpx.TimeoutException as exc:
        result, error = "timeout", f"{type(exc).__name__}: no answer within {cfg.timeout_s:g} s"
    except httpx.ConnectError as exc:
        text = str(exc)
        result = ("tls" if "CERTIFICATE" in text.upper() or "SSL" in text.upper()
                  else "refused" if "refused" in text.lower() else "error")
        error = text[:300] or type(exc).__name__
    except httpx.HTTPError as exc:
        result, error = "error", f"{type(exc).__name__}: {exc}"[:300]
    total = round((time.perf_counter() - started) * 1000, 2)
    ok = False
    if status is not None:
        ok = status == cfg.expect_status
        result = f"HTTP {status}"
        if not ok:
            error = f"expected HTTP {cfg.expect_status}, got {status}"
    return replace(
        base, ok=ok, status=status, result=result, error=error, dns_ms=dns.latency_ms,
        connect_ms=ms("connection.connect_tcp.complete"), tls_ms=ms("connection.start_tls.complete"),
        ttfb_ms=ms("http11.receive_response_headers.complete") or ms("http2.receive_response_headers.complete"),
        total_ms=total, latency_ms=total, cert_days_left=cert_days_left, cert_expires=cert_expires)


@step
def check_http_endpoints(env: Environment, names: list[str] | None = None,
                         max_parallel: int = 8) -> list[HttpCheckRow]:
    """Every configured HTTP check (or the named ones) from this host, concurrently, in playbook order."""

    checks: list[Check] = [(HOST, f"{n} {c.url}", "http", partial(check_http, n, c))
                           for n, c in env.http_checks.items() if names is None or n in names]
    return http_rows(run_checks(checks, max_parallel))


def http_rows(rows: Iterable[CheckRow]) -> list[HttpCheckRow]:
    """The HTTP checks among check rows (a check that raised is an HttpCheckRow without timings, see probes.row)."""
    return [r for r in rows if isinstance(r, HttpCheckRow)]


def breakdown_table(rows: Iterable[CheckRow]) -> TableBlock:
    """The curl -w view of HTTP check rows: ms from the start of each request, like curl's time_* variables."""

    def ms(v: float | None) -> str:
        return "" if v is None else f"{v:.1f}"

    return TableBlock(
        title="response time breakdown (ms since start, like curl -w)",
        columns=["source", "endpoint", "status", "dns", "connect", "tls", "ttfb", "total", "cert days left"],
        rows=[[r.source, r.destination, r.status if r.status is not None else r.result,
               ms(r.dns_ms), ms(r.connect_ms), ms(r.tls_ms), ms(r.ttfb_ms), ms(r.total_ms),
               "" if r.cert_days_left is None else r.cert_days_left] for r in http_rows(rows)])
