"""Log analysis: the runbook's four Kibana queries, with counts, top messages and a time histogram.

With Elasticsearch configured, the queries go verbatim (as ``query_string``, Kibana's Lucene syntax) through the
official elasticsearch 8 client, all four in one multi-search request. ``elasticsearch.media_type: plain-json`` is an
explicit per-environment opt-in for OpenSearch-compatible servers (runbook.engine.clients.PlainJsonNode).

Without Elasticsearch, the same four questions are answered from the compose project's container logs (Docker
API) when a docker endpoint is configured and from the playbook's ``log_files`` read over SSH, each line parsed as
JSON (structured logging) or as text with a leading ISO timestamp; otherwise the result says that no log source is
configured.
"""

from __future__ import annotations

import json
import re
import shlex
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import elasticsearch

from runbook.engine.clients import docker_client, search, ssh
from runbook.engine.config import Environment
from runbook.engine.errors import BadInput, TargetUnreachable
from runbook.engine.params import NAME_PATTERN
from runbook.engine.steps import step
from tasks.containers import PROJECT_LABEL, SERVICE_LABEL

Record = dict[str, Any]
SERVICE_NAME = re.compile(NAME_PATTERN)


@dataclass(frozen=True)
class LogQuery:
    name: str
    title: str
    query: str  # the runbook's Kibana query; {slow_ms} is the playbook's thresholds.slow_response_ms
    window: timedelta
    interval: str  # date_histogram fixed_interval
    matches: Callable[[Record, int], bool]  # the same question for a parsed log line (no Elasticsearch)


RUNBOOK_QUERIES: dict[str, LogQuery] = {q.name: q for q in (
    LogQuery("errors", "Error Analysis", "level:ERROR AND @timestamp:[now-1h TO now]", timedelta(hours=1), "5m",
             lambda r, _: r["level"] == "ERROR"),
    LogQuery("slow_responses", "Performance Issues", "response_time:>{slow_ms} AND @timestamp:[now-1h TO now]",
             timedelta(hours=1), "5m", lambda r, slow_ms: (r["response_time"] or 0) > slow_ms),
    LogQuery("auth_failures", "Authentication Failures",
             'message:"authentication failed" AND @timestamp:[now-24h TO now]', timedelta(hours=24), "1h",
             lambda r, _: "authentication failed" in r["message"].lower()),
    LogQuery("payment_errors", "Payment Issues", "service:payment AND level:ERROR AND @timestamp:[now-1h TO now]",
             timedelta(hours=1), "5m", lambda r, _: r["service"] == "payment" and r["level"] == "ERROR"),
)}


def query_text(q: LogQuery, slow_ms: int, service: str | None = None) -> str:
    """The Kibana query as sent; ``service`` (validated: a playbook-style name) narrows it to one service."""
    text = q.query.format(slow_ms=int(slow_ms))
    if service is not None:
        if not SERVICE_NAME.match(service):
            raise BadInput(f"service {service!r}: expected a service name like 'backend'")
        text = f'({text}) AND service:"{service}"'
    return text


def _result(q: LogQuery, query: str, source: str) -> dict[str, Any]:
    return {"name": q.name, "title": q.title, "query": query, "source": source, "count": 0, "hits": [],
            "top_messages": [], "histogram": [], "error": ""}


def _search_body(q: LogQuery, query: str, size: int) -> dict[str, Any]:
    return {
        "query": {"query_string": {"query": query}}, "size": size, "track_total_hits": True,
        "sort": [{"@timestamp": {"order": "desc"}}],
        "_source": ["@timestamp", "level", "service", "message", "response_time", "host"],
        "aggs": {"top_messages": {"terms": {"field": "message.keyword", "size": 5}},
                 "histogram": {"date_histogram": {"field": "@timestamp", "fixed_interval": q.interval,
                                                  "min_doc_count": 1}}},
    }


def _fill(out: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    if "error" in body:
        err = body["error"]
        reason = err.get("reason") or err.get("type") if isinstance(err, dict) else err
        out["error"] = f"{body.get('status', '')} {reason}".strip()[:300]
        return out
    out["count"] = body["hits"]["total"]["value"]
    out["hits"] = [{"id": h["_id"], "index": h["_index"], **h.get("_source", {})} for h in body["hits"]["hits"]]
    aggs = body.get("aggregations", {})
    out["top_messages"] = [(b["key"], b["doc_count"]) for b in aggs.get("top_messages", {}).get("buckets", [])]
    out["histogram"] = [(b.get("key_as_string") or b["key"], b["doc_count"])
                        for b in aggs.get("histogram", {}).get("buckets", [])]
    return out


def search_logs(env: Environment, names: list[str] | None = None, service: str | None = None,
                size: int = 20) -> dict[str, dict[str, Any]]:
    """Run the named runbook queries (all four by default) in one multi-search request; raises TargetUnreachable.

    One ``_msearch`` round trip, like a Kibana dashboard: the cluster runs the searches side by side, there is one
    request timeout for all, and a query the cluster rejects fails alone (its ``error``), not the others.
    """
    assert env.elasticsearch is not None
    queries = [RUNBOOK_QUERIES[n] for n in (names or list(RUNBOOK_QUERIES))]
    slow_ms = env.thresholds.slow_response_ms
    texts = [query_text(q, slow_ms, service) for q in queries]
    results = [_result(q, text, "elasticsearch") for q, text in zip(queries, texts, strict=True)]
    header = {"index": env.elasticsearch.index_pattern, "ignore_unavailable": True, "allow_no_indices": True}
    searches: list[dict[str, Any]] = []
    for q, text in zip(queries, texts, strict=True):
        searches += [header, _search_body(q, text, size)]
    with search(env) as client:
        try:
            responses = client.msearch(searches=searches).body["responses"]
        except elasticsearch.ApiError as exc:
            for r in results:
                r["error"] = f"{exc.meta.status} {exc.message}"[:300]
            return {r["name"]: r for r in results}
    return {r["name"]: _fill(r, body) for r, body in zip(results, responses, strict=True)}


# ------------------------------------------------------------------ without Elasticsearch: container logs

_LEVEL = re.compile(r"\b(ERROR|CRITICAL|FATAL|WARN(?:ING)?|INFO|DEBUG)\b")
_RESPONSE_TIME = re.compile(r"\bresponse_time[=:]\s*(\d+)")


def parse_line(line: str, default_service: str, timestamp: datetime | None) -> Record:
    """A log line as a record: JSON lines keep their fields; text lines give level, response_time=N, message."""
    stripped = line.strip()
    if stripped.startswith("{"):
        try:
            doc = json.loads(stripped)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            ts = doc.get("@timestamp") or doc.get("timestamp")
            parsed = None
            if isinstance(ts, str):
                try:
                    parsed = datetime.fromisoformat(ts.replace("Z", "+00:00"))
                except ValueError:
                    parsed = None
            rt = doc.get("response_time")
            return {"timestamp": parsed or timestamp, "level": str(doc.get("level", "")).upper(),
                    "service": str(doc.get("service") or default_service), "message": str(doc.get("message", "")),
                    "response_time": int(rt) if isinstance(rt, int | float) else None}
    level = _LEVEL.search(stripped)
    rt_match = _RESPONSE_TIME.search(stripped)
    lvl = level.group(1) if level else ""
    return {"timestamp": timestamp, "level": {"WARNING": "WARN", "CRITICAL": "ERROR", "FATAL": "ERROR"}.get(lvl, lvl),
            "service": default_service, "message": stripped, "response_time": int(rt_match.group(1)) if rt_match
            else None}


def match_records(records: list[Record], slow_ms: int, now: datetime, names: list[str] | None = None,
                  service: str | None = None, source: str = "container logs") -> dict[str, dict[str, Any]]:
    """The runbook's queries over parsed records (same windows, same conditions as the Kibana queries)."""
    out: dict[str, dict[str, Any]] = {}
    for name in names or list(RUNBOOK_QUERIES):
        q = RUNBOOK_QUERIES[name]
        res = _result(q, query_text(q, slow_ms, service), source)
        found = [r for r in records if r["timestamp"] is not None and now - q.window <= r["timestamp"] <= now
                 and (service is None or r["service"] == service) and q.matches(r, slow_ms)]
        found.sort(key=lambda r: r["timestamp"], reverse=True)
        res["count"] = len(found)
        res["hits"] = [{**r, "timestamp": r["timestamp"].isoformat()} for r in found[:20]]
        res["top_messages"] = Counter(r["message"][:200] for r in found).most_common(5)
        minutes = 60 if q.window > timedelta(hours=1) else 5
        buckets = Counter(r["timestamp"].replace(minute=r["timestamp"].minute // minutes * minutes if minutes < 60
                                                 else 0, second=0, microsecond=0) for r in found)
        res["histogram"] = [(k.isoformat(), v) for k, v in sorted(buckets.items())]
        out[name] = res
    return out


def read_container_records(env: Environment, hours: float = 24, tail: int = 5000) -> list[Record]:
    """Every project container's log lines of the last ``hours`` (Docker timestamps), parsed."""

    assert env.docker is not None
    since = datetime.now(UTC) - timedelta(hours=hours)
    records: list[Record] = []
    with docker_client(env) as client:
        containers = client.containers.list(all=True, filters={
            "label": [f"{PROJECT_LABEL}={env.docker.compose_project}"]})
        for c in containers:
            service = (c.labels or {}).get(SERVICE_LABEL, c.name)
            raw = client.api.logs(c.id, stdout=True, stderr=True, timestamps=True, tail=tail, since=since)
            for line in raw.decode("utf-8", errors="replace").splitlines():
                stamp, _, text = line.partition(" ")
                ts = _docker_time(stamp)
                records.append(parse_line(text if ts else line, service, ts))
    return records


_LEADING_TIME = re.compile(r"^\[?(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?)\]?\s")


def line_time(line: str) -> datetime | None:
    """An ISO-8601 timestamp at the start of a text log line (no zone means UTC)."""
    m = _LEADING_TIME.match(line)
    if not m:
        return None
    text = m.group(1).replace(",", ".").replace(" ", "T").replace("Z", "+00:00")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def read_log_file_records(env: Environment) -> tuple[list[Record], list[str]]:
    """The configured log files' last lines over SSH (``tail -n N -- PATH``), parsed; unreachable hosts are noted.

    The path is validated by the playbook schema and shell-quoted: an SSH command is always a remote shell line.
    """

    records: list[Record] = []
    notes: list[str] = []
    for name, cfg in env.log_files.items():
        command = f"tail -n {int(cfg.max_lines)} -- {shlex.quote(cfg.path)}"
        host = env.ssh_hosts.get(cfg.ssh_host)
        timeout = host.timeout_s if host else 5.0
        try:
            with ssh(env, cfg.ssh_host) as client:  # an unknown ssh_host raises ConfigError naming the known ones
                _, stdout, stderr = client.exec_command(command, timeout=timeout)
                text = stdout.read().decode("utf-8", errors="replace")
                status = stdout.channel.recv_exit_status()
                err = stderr.read().decode("utf-8", errors="replace").strip()
        except TargetUnreachable as exc:
            notes.append(f"log file {name} ({cfg.ssh_host}:{cfg.path}) not read: {exc}")
            continue
        except TimeoutError:
            notes.append(f"log file {name} ({cfg.ssh_host}:{cfg.path}) not read: no output within {timeout:g} s")
            continue
        if status != 0:
            notes.append(f"log file {name} ({cfg.ssh_host}:{cfg.path}) not read: {err[:200] or f'exit {status}'}")
            continue
        lines = text.splitlines()
        records.extend(parse_line(line, cfg.service, line_time(line)) for line in lines)
        notes.append(f"log file {name}: {len(lines)} lines from {cfg.ssh_host}:{cfg.path}")
    return records, notes


def _docker_time(value: str) -> datetime | None:
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", value)
    if not m:
        return None
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(m.group(1) + (m.group(2) or ".0")[:7] + tz)


@step
def analyze_logs(env: Environment, names: list[str] | None = None, service: str | None = None,
                 size: int = 20) -> dict[str, Any]:
    """The runbook's log queries from the best source configured: ``{"source", "results", "notes"}``.

    Elasticsearch when configured (an unreachable cluster raises TargetUnreachable: a finding, not a fallback
    that would hide the outage); else container logs through the Docker API; else nothing, and the notes say so.
    """
    if env.elasticsearch is not None:
        return {"source": "elasticsearch", "results": search_logs(env, names, service, size), "notes": []}
    records: list[Record] = []
    notes: list[str] = []
    sources: list[str] = []
    if env.docker is not None:
        found = read_container_records(env)
        records += found
        sources.append("container logs")
        notes.append(f"no Elasticsearch configured: {len(found)} container log lines (Docker API, last 24 h)")
    if env.log_files:
        found, file_notes = read_log_file_records(env)
        records += found
        sources.append("log files over SSH")
        notes += file_notes
    if not sources:
        return {"source": "none", "results": {},
                "notes": ["no Elasticsearch, docker endpoint or log file is configured: log queries skipped"]}
    source = " + ".join(sources)
    return {"source": source, "notes": notes,
            "results": match_records(records, env.thresholds.slow_response_ms, datetime.now(UTC), names, service,
                                     source)}

