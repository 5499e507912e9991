"""log-analysis and tasks.logs against the sandbox's OpenSearch-compatible server (osmem-server), re-seeded here so
"the last hour" is measured from this test's own now."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flows.log_analysis import log_analysis
from runbook.sandbox.opensearch import EXPECTED, LOG_DOCS, seed_logs
from tasks.logs import RUNBOOK_QUERIES, analyze_logs, match_records, search_logs
from tests.integration.derived_env import derive
from tests.require import require_service

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def seeded(sandbox_env) -> dict[str, frozenset[str]]:  # noqa: ANN001
    return seed_logs(sandbox_env.elasticsearch.url)


def test_the_four_queries_return_exactly_the_seeded_matches(sandbox_env, seeded) -> None:  # noqa: ANN001
    results = search_logs(sandbox_env, size=100)
    assert set(results) == set(RUNBOOK_QUERIES) == set(seeded)
    for name, expected in seeded.items():
        r = results[name]
        assert r["error"] == ""
        assert {h["id"] for h in r["hits"]} == expected, name
        assert r["count"] == len(expected)
        assert sum(c for _, c in r["histogram"]) == len(expected)
    # never the documents outside the window, after now, or at exactly the threshold
    everything = {h["id"] for r in results.values() for h in r["hits"]}
    assert everything.isdisjoint({"old-err", "old-pay", "old-auth", "future-err", "edge-5000", "auth-other"})
    assert results["errors"]["top_messages"][0] == ("database connection timeout", 2)
    assert results["slow_responses"]["query"] == "response_time:>5000 AND @timestamp:[now-1h TO now]"


def test_service_filter_narrows_every_query(sandbox_env, seeded) -> None:  # noqa: ANN001
    results = search_logs(sandbox_env, ["errors", "slow_responses"], service="payment")
    assert {h["id"] for h in results["errors"]["hits"]} == {"pay-err-1", "pay-err-2"}
    assert {h["id"] for h in results["slow_responses"]["hits"]} == {"pay-err-2"}


def test_flow_reports_counts_top_messages_and_histogram(sandbox_env, seeded) -> None:  # noqa: ANN001
    doc = log_analysis(env="sandbox")
    by_title = {f["title"].split(":")[0]: f for f in doc["findings"]}
    assert {k: v["details"]["count"] for k, v in by_title.items()} == {
        "Error Analysis": 4, "Performance Issues": 3, "Authentication Failures": 3, "Payment Issues": 2}
    payment = by_title["Payment Issues"]
    assert payment["severity"] == "warning"
    tables = {b["title"]: b for b in payment["blocks"]}
    assert sorted(tables["top messages"]["rows"]) == [["payment gateway error: card declined", 1],
                                                       ["payment gateway timeout", 1]]
    assert sum(r[1] for r in tables["over time"]["rows"]) == 2
    assert any("nothing to remediate" in n for n in doc["notes"])


def test_plain_json_is_an_explicit_setting(sandbox_state, seeded, tmp_path: Path,  # noqa: ANN001
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the opt-in the official client sends Elasticsearch's media types, which this server rejects."""
    name = derive(sandbox_state, tmp_path, monkeypatch, "esdefault", {"elasticsearch": {"media_type": "elasticsearch"}})
    from runbook.engine.config import load_playbooks

    env = load_playbooks().environment(name)
    assert env.elasticsearch.media_type == "elasticsearch"
    results = search_logs(env, ["errors"])
    assert "406" in results["errors"]["error"]


def test_without_elasticsearch_the_same_questions_over_parsed_lines() -> None:
    """The fallback's matcher (container logs) gives the same answers as the Kibana queries on the same documents."""
    now = datetime.now(UTC)
    records = [{"timestamp": now - timedelta(minutes=d.minutes_ago), "level": d.level, "service": d.service,
                "message": d.message, "response_time": d.response_time, "id": d.id} for d in LOG_DOCS]
    results = match_records(records, 5000, now)
    assert {n: {h["id"] for h in r["hits"]} for n, r in results.items()} == EXPECTED


def test_without_any_log_source_it_says_so(sandbox_state, tmp_path: Path,  # noqa: ANN001
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    name = derive(sandbox_state, tmp_path, monkeypatch, "nologs", {}, drop=("elasticsearch", "docker"))
    from runbook.engine.config import load_playbooks

    out = analyze_logs.fn(load_playbooks().environment(name))
    assert out["source"] == "none" and out["results"] == {}
    assert "no Elasticsearch, docker endpoint or log file is configured" in out["notes"][0]
    doc = log_analysis(env=name)  # the procedure: nothing looked at is a warning, never a quiet "all clear"
    assert doc["worst_severity"] == "warning", doc["findings"]
    assert any(f["title"].startswith("no log source configured") for f in doc["findings"])


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_elasticsearch_that_does_not_answer_is_a_finding_within_its_timeout(
    kind: str, sandbox_state, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
    silent_port: int, dead_port: int,
) -> None:
    port = dead_port if kind == "refused" else silent_port
    name = derive(sandbox_state, tmp_path, monkeypatch, "deades",
                  {"elasticsearch": {"url": f"http://127.0.0.1:{port}", "timeout_s": 1}})
    started = time.monotonic()
    doc = log_analysis(env=name)
    elapsed = time.monotonic() - started
    crit = [f for f in doc["findings"] if f["severity"] == "critical"]
    assert [f["subject"] for f in crit] == [f"elasticsearch http://127.0.0.1:{port}"]
    assert ("refused" if kind == "refused" else "timeout") in crit[0]["details"]["reason"].lower()
    assert elapsed < 1 + 15


@pytest.fixture
def app_log() -> Iterator[Path]:
    """/tmp/.../application.log with the seeded documents as JSON lines and text lines, readable by the SSH user."""
    d = Path(tempfile.mkdtemp(prefix="runbook-logs-", dir="/tmp"))
    d.chmod(0o755)
    now = datetime.now(UTC)
    lines = []
    for i, doc in enumerate(LOG_DOCS):
        ts = now - timedelta(minutes=doc.minutes_ago)
        if i % 2:  # half structured, half plain text: both parse to the same record
            lines.append(json.dumps({"@timestamp": ts.isoformat(), "level": doc.level, "service": doc.service,
                                     "message": doc.message, "response_time": doc.response_time, "id": doc.id}))
        else:
            lines.append(f"{ts:%Y-%m-%d %H:%M:%S.%f} {doc.level} [{doc.id}] {doc.message} "
                         f"response_time={doc.response_time}")
    path = d / "application.log"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)
    yield path
    shutil.rmtree(d)


def test_without_elasticsearch_log_files_over_ssh_answer_the_same(
    sandbox_state, sandbox_env, app_log: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    require_service(sandbox_state, "sshd", "log files are read over SSH")
    host = next(iter(sandbox_env.ssh_hosts))
    # text lines carry no service: the file's configured one; only JSON lines can say "payment"
    name = derive(sandbox_state, tmp_path, monkeypatch, "sshlogs",
                  {"log_files": {"app": {"ssh_host": host, "path": str(app_log), "service": "backend"}}},
                  drop=("elasticsearch", "docker"))
    from runbook.engine.config import load_playbooks

    out = analyze_logs.fn(load_playbooks().environment(name))
    assert out["source"] == "log files over SSH"
    assert any(f"{len(LOG_DOCS)} lines from {host}:{app_log}" in n for n in out["notes"])
    payment_in_json = {d.id for i, d in enumerate(LOG_DOCS) if i % 2 and d.service == "payment"}
    for qname, expected in EXPECTED.items():
        got = {_doc_id(h["message"], h) for h in out["results"][qname]["hits"]}
        want = expected & payment_in_json if qname == "payment_errors" else expected
        assert got == want, qname


def _doc_id(message: str, hit: dict) -> str:
    """The seeded id: text lines carry it as [id] in the message; JSON lines by message (ids are unique per text)."""
    m = re.search(r"\[([a-z0-9-]+)\]", message)
    if m:
        return m.group(1)
    return next(d.id for d in LOG_DOCS if d.message == message and d.level == hit["level"]
                and d.response_time == hit["response_time"])


def test_an_unreachable_log_host_is_noted(sandbox_state, sandbox_env, tmp_path: Path,  # noqa: ANN001
                                          monkeypatch: pytest.MonkeyPatch, dead_port: int) -> None:  # noqa: F811
    require_service(sandbox_state, "sshd", "the unreachable host is the sandbox's SSH host on a dead port")
    host, cfg = next(iter(sandbox_env.ssh_hosts.items()))
    name = derive(sandbox_state, tmp_path, monkeypatch, "sshdead", {
        "ssh_hosts": {host: {**cfg.model_dump(mode="json"), "port": dead_port, "timeout_s": 2}},
        "log_files": {"app": {"ssh_host": host, "path": "/var/log/pafar/application.log"}}},
        drop=("elasticsearch", "docker"))
    from runbook.engine.config import load_playbooks

    out = analyze_logs.fn(load_playbooks().environment(name))
    assert any("not read" in n and "refused" in n for n in out["notes"]), out["notes"]
    assert all(r["count"] == 0 for r in out["results"].values())


def test_without_elasticsearch_container_logs_answer(sandbox_state, sandbox_env, tmp_path: Path,  # noqa: ANN001
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    require_service(sandbox_state, "podman", "container logs come from Podman's Docker API")
    name = derive(sandbox_state, tmp_path, monkeypatch, "dockerlogs", {}, drop=("elasticsearch",))
    from runbook.engine.config import load_playbooks

    out = analyze_logs.fn(load_playbooks().environment(name))
    assert out["source"] == "container logs"
    assert set(out["results"]) == set(RUNBOOK_QUERIES)
    lines = int(re.search(r"(\d+) container log lines", out["notes"][0]).group(1))
    assert lines > 0  # every sandbox container logs a heartbeat line at start and every 5 s
    for r in out["results"].values():
        assert r["source"] == "container logs" and min(r["count"], 20) == len(r["hits"]) and r["count"] <= lines
