"""The building blocks of a connectivity check: a name lookup with its own timeout, one result row, and a
bounded parallel runner that turns a check that raises into a failed row (never a lost one).

Shared by tasks/network.py (the TCP/DNS matrix) and tasks/http_checks.py (the HTTP breakdown).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace

import docker.errors
import requests

from runbook.engine.errors import TargetUnreachable

HOST = "host"


# getaddrinfo cannot be interrupted; lookups run here so a hung resolver only costs a parked thread.
_RESOLVER = ThreadPoolExecutor(max_workers=16, thread_name_prefix="resolve")


@dataclass(frozen=True)
class CheckRow:
    """One check: where it was tried from, what it tried to reach, what happened and why (``error``)."""

    source: str
    destination: str
    kind: str  # tcp | dns | http | docker
    ok: bool
    latency_ms: float | None
    result: str
    error: str = ""


@dataclass(frozen=True)
class HttpCheckRow(CheckRow):
    """An HTTP check: status and the curl -w style phases, in ms from the start of the request."""

    name: str = ""
    url: str = ""
    status: int | None = None
    expect_status: int = 200
    dns_ms: float | None = None
    connect_ms: float | None = None
    tls_ms: float | None = None
    ttfb_ms: float | None = None
    total_ms: float | None = None
    cert_days_left: float | None = None
    cert_expires: str = ""


Check = tuple[str, str, str, Callable[[], CheckRow]]
"""(source, destination, kind, the check): what ``run_checks`` runs."""


def row(source: str, destination: str, kind: str, ok: bool, latency_ms: float | None, result: str,
        error: str = "") -> CheckRow:
    """A check's row, the latency rounded to 0.01 ms; a failed HTTP check is an HttpCheckRow without timings."""
    cls = HttpCheckRow if kind == "http" else CheckRow
    return cls(source, destination, kind, ok, None if latency_ms is None else round(latency_ms, 2), result, error)


def is_reserved_invalid(name: str) -> bool:
    """RFC 6761: names under .invalid never exist; resolvers should answer negatively at once."""
    return name.rstrip(".").lower().endswith(".invalid") or name.rstrip(".").lower() == "invalid"


def resolve(name: str, timeout_s: float, source: str = HOST) -> CheckRow:
    """Resolve ``name`` on this host with a timeout: addresses and how long the lookup took."""
    started = time.perf_counter()
    if is_reserved_invalid(name):
        return row(source, name, "dns", False, 0.0, "NXDOMAIN", "name does not exist (reserved .invalid domain)")
    try:  # an address literal needs no lookup (curl reports ~0 ms for it too)
        return row(source, name, "dns", True, 0.0, str(ipaddress.IPv4Address(name)))
    except ValueError:
        pass
    fut = _RESOLVER.submit(socket.getaddrinfo, name, None, socket.AF_INET, socket.SOCK_STREAM)
    try:
        infos = fut.result(timeout=timeout_s)
    except FutureTimeout:
        return row(source, name, "dns", False, timeout_s * 1000, "timeout", f"no answer within {timeout_s:g} s")
    except socket.gaierror as exc:
        elapsed = (time.perf_counter() - started) * 1000
        return row(source, name, "dns", False, elapsed, "NXDOMAIN" if exc.errno == socket.EAI_NONAME else "error",
                   exc.strerror or str(exc))
    elapsed = (time.perf_counter() - started) * 1000
    addresses = sorted({str(i[4][0]) for i in infos})
    return row(source, name, "dns", True, elapsed, ", ".join(addresses))


def run_checks(checks: Sequence[Check], max_parallel: int = 32) -> list[CheckRow]:
    """Run every check concurrently (bounded); a check that raises becomes a failed row, never a lost one."""
    if not checks:
        return []
    rows: list[CheckRow] = []
    with ThreadPoolExecutor(max_workers=min(max_parallel, len(checks)), thread_name_prefix="netcheck") as pool:
        futures: list[tuple[tuple[str, str, str], Future[CheckRow]]] = [
            ((src, dst, kind), pool.submit(fn)) for src, dst, kind, fn in checks]
        for (src, dst, kind), fut in futures:
            try:
                rows.append(replace(fut.result(), source=src, destination=dst))
            except TargetUnreachable as exc:
                rows.append(row(src, dst, kind, False, None, "unreachable", exc.reason))
            except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
                # a container that went away (404) or stopped (409) between listing and exec: that check's row
                rows.append(row(src, dst, kind, False, None, "error", f"{type(exc).__name__}: {exc}"[:300]))
    return rows
