"""The OpenSearch-compatible log store: osmem-server (PyPI; a bundled in-memory server binary, not written here).

No Elasticsearch or OpenSearch can be installed on these machines (../shared/PEERS.md). osmem answers the runbook's
four Kibana queries and the terms/date_histogram aggregations, but rejects the official client's
``application/vnd.elasticsearch+json`` media types; the generated environment therefore sets
``elasticsearch.media_type: plain-json`` (an explicit opt-in, never the default).

``seed_logs`` writes Pafar-style documents into ``logstash-pafar-YYYY.MM.DD`` indices with ``@timestamp`` relative
to now, some outside each query's window, and returns which ids each query must find. `up` seeds once; tests
re-seed so that "the last hour" is measured from their own now.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from runbook.engine.daemon import http_ok

from . import net
from .base import Requirement, Service, ServiceRecord
from .daemon import start_daemon
from .errors import SandboxError

INDEX_PREFIX = "logstash-pafar-"
INDEX_PATTERN = INDEX_PREFIX + "*"
MAPPING = {"properties": {
    "@timestamp": {"type": "date"},
    "level": {"type": "keyword"},
    "service": {"type": "keyword"},
    "message": {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}},
    "response_time": {"type": "long"},
    "host": {"type": "keyword"},
}}


def osmem_binary() -> str:
    """The server binary bundled in the osmem-server wheel ('' when the package is not installed)."""
    try:
        from osmem_server import OsmemError, resolve_binary
    except ImportError:
        return ""
    try:
        binary: str = resolve_binary()
    except OsmemError:
        return ""
    return binary


@dataclass(frozen=True)
class LogDoc:
    id: str
    minutes_ago: float
    level: str
    service: str
    message: str
    response_time: int


# The seeded documents. Comments say which of the runbook's queries must find each one.
LOG_DOCS: tuple[LogDoc, ...] = (
    LogDoc("err-db-1", 10, "ERROR", "backend", "database connection timeout", 120),       # errors
    LogDoc("err-db-2", 20, "ERROR", "backend", "database connection timeout", 130),       # errors
    LogDoc("pay-err-1", 30, "ERROR", "payment", "payment gateway error: card declined", 800),  # errors, payment
    LogDoc("pay-err-2", 40, "ERROR", "payment", "payment gateway timeout", 6200),         # errors, payment, slow
    LogDoc("slow-1", 15, "INFO", "backend", "GET /api/bookings", 7300),                    # slow
    LogDoc("slow-2", 25, "WARN", "nginx", "upstream response slow", 5001),                 # slow
    LogDoc("edge-5000", 12, "INFO", "backend", "GET /api/bookings", 5000),                 # none: >5000 is strict
    LogDoc("ok-1", 5, "INFO", "backend", "GET /api/health", 12),                           # none
    LogDoc("pay-ok", 35, "INFO", "payment", "payment captured", 300),                      # none: not an error
    LogDoc("auth-1", 10, "WARN", "backend", "authentication failed for user alice", 40),   # auth
    LogDoc("auth-2", 120, "WARN", "backend", "authentication failed for user bob", 35),    # auth
    LogDoc("auth-3", 20 * 60, "WARN", "backend", "authentication failed for user carol", 38),  # auth
    LogDoc("auth-other", 50, "INFO", "backend", "failed authentication token refresh", 20),  # none: not the phrase
    LogDoc("old-err", 3 * 60, "ERROR", "backend", "database connection timeout", 110),    # none: outside 1 h
    LogDoc("old-pay", 2 * 60, "ERROR", "payment", "payment gateway error: card declined", 9000),  # none: > 1 h
    LogDoc("old-auth", 30 * 60, "WARN", "backend", "authentication failed for user dave", 41),  # none: > 24 h
    LogDoc("future-err", -30, "ERROR", "backend", "clock skewed host", 10),                # none: after now
)

EXPECTED: dict[str, frozenset[str]] = {
    "errors": frozenset({"err-db-1", "err-db-2", "pay-err-1", "pay-err-2"}),
    "slow_responses": frozenset({"pay-err-2", "slow-1", "slow-2"}),
    "auth_failures": frozenset({"auth-1", "auth-2", "auth-3"}),
    "payment_errors": frozenset({"pay-err-1", "pay-err-2"}),
}
"""Which seeded ids each of the runbook's four queries (tasks.logs.RUNBOOK_QUERIES) must return."""


def seed_logs(url: str, now: datetime | None = None, timeout: float = 10.0) -> dict[str, frozenset[str]]:
    """Delete the logstash-pafar-* indices and write LOG_DOCS relative to ``now``; returns EXPECTED."""
    now = now or datetime.now(UTC)
    with httpx.Client(base_url=url, timeout=timeout, trust_env=False,
                      headers={"Content-Type": "application/json"}) as http:
        existing = http.get(f"/_cat/indices/{INDEX_PATTERN}", params={"format": "json"})
        for row in existing.json() if existing.status_code == 200 else []:
            http.delete(f"/{row['index']}")
        lines: list[str] = []
        created: set[str] = set()
        for doc in LOG_DOCS:
            ts = now - timedelta(minutes=doc.minutes_ago)
            index = f"{INDEX_PREFIX}{ts:%Y.%m.%d}"
            if index not in created:
                res = http.put(f"/{index}", json={"mappings": MAPPING})
                if res.status_code >= 300:
                    raise SandboxError(f"opensearch: creating {index} failed: {res.status_code} {res.text[:300]}")
                created.add(index)
            lines.append(json.dumps({"index": {"_index": index, "_id": doc.id}}))
            lines.append(json.dumps({
                "@timestamp": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "level": doc.level,
                "service": doc.service, "message": doc.message, "response_time": doc.response_time,
                "host": "app-1"}))
        res = http.post("/_bulk", params={"refresh": "true"}, content="\n".join(lines) + "\n",
                        headers={"Content-Type": "application/x-ndjson"})
        body = res.json() if res.status_code < 300 else {}
        if res.status_code >= 300 or body.get("errors"):
            raise SandboxError(f"opensearch: bulk seed failed: {res.status_code} {res.text[:500]}")
    return EXPECTED


class OpenSearch(Service):
    name = "opensearch"
    requirements = (Requirement(osmem_binary() or "osmem-server", "osmem-server",
                                f"{sys.executable} -m pip install -e '.[sandbox]'", kind="Python"),)

    def start(self, state: Path, port: int, peers: dict[str, ServiceRecord] | None = None) -> ServiceRecord:
        d = self.fresh_dir(state)
        listen = f"{net.LOOPBACK}:{port}"
        binary = osmem_binary()
        cmd = [binary, "--addr", listen, "--no-stdin-watch", "--no-ja"]
        record = start_daemon(self.name, cmd, port=port, log=d / "osmem.log", cwd=d, health_url=f"http://{listen}/",
                              markers=[binary, listen], paths={"dir": str(d)})
        try:
            seed_logs(f"http://{listen}")
        except (httpx.HTTPError, SandboxError):
            self.stop(record)
            raise
        return record

    def is_healthy(self, record: ServiceRecord) -> bool:
        return http_ok(f"http://{net.LOOPBACK}:{record.port}/")

    def playbook_fragment(self, record: ServiceRecord) -> dict[str, Any]:
        return {"elasticsearch": {"url": f"http://{net.LOOPBACK}:{record.port}", "index_pattern": INDEX_PATTERN,
                                  "timeout_s": 5, "media_type": "plain-json"}}


SERVICE = OpenSearch()
