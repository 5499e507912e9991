"""cache-api and tasks.metrics against the sandbox's real Redis, backend and Prometheus (1 s scrape interval)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from flows.cache_api import assess_cache, cache_api
from runbook.engine.findings import Report
from tasks.cache import get_cache_stats
from tasks.metrics import PromQLError, instant_query, range_query
from tests.integration.derived_env import derive

pytestmark = pytest.mark.integration
KEY_PREFIX = "runbook-test:"


@pytest.fixture
def cache(sandbox_state) -> Iterator[redis.Redis]:  # noqa: ANN001
    r = redis.Redis.from_url(sandbox_state.redis_url, socket_timeout=3, decode_responses=True)
    r.config_resetstat()
    yield r
    for key in r.scan_iter(f"{KEY_PREFIX}*"):
        r.delete(key)
    r.config_set("maxmemory", 0)
    r.config_set("maxmemory-policy", "noeviction")
    r.close()


def test_hit_ratio_matches_known_hits_and_misses(cache: redis.Redis, sandbox_env) -> None:  # noqa: ANN001
    for i in range(3):
        cache.set(f"{KEY_PREFIX}{i}", "x")
    for i in range(6):
        assert cache.get(f"{KEY_PREFIX}{i % 3}") == "x"  # 6 hits
    for i in range(2):
        assert cache.get(f"{KEY_PREFIX}missing-{i}") is None  # 2 misses
    stats = get_cache_stats.fn(sandbox_env)
    assert (stats.keyspace_hits, stats.keyspace_misses) == (6, 2)
    assert stats.hit_ratio == pytest.approx(0.75)
    assert (stats.connected_clients or 0) >= 2  # this test's client and the task's own

    doc = cache_api(env="sandbox", window="1m")
    ratio = next(f for f in doc["findings"] if f["subject"] == "redis" and "hit ratio" in f["title"])
    assert ratio["details"]["hit_ratio"] == pytest.approx(0.75)
    assert ratio["severity"] == "warning"  # below the 0.8 threshold
    assert (ratio["details"]["hits"], ratio["details"]["misses"]) == (6, 2)


def test_evictions_are_reported(cache: redis.Redis, sandbox_env) -> None:  # noqa: ANN001
    cache.config_set("maxmemory-policy", "allkeys-lru")
    cache.config_set("maxmemory", int(cache.info("memory")["used_memory"]) + 512 * 1024)
    value = "v" * 10_000
    for i in range(200):  # ~2 MB into a ~0.5 MB budget
        cache.set(f"{KEY_PREFIX}big-{i}", value)
    evicted = int(cache.info("stats")["evicted_keys"])
    assert evicted > 0
    stats = get_cache_stats.fn(sandbox_env)
    assert (stats.evicted_keys or 0) >= evicted and stats.maxmemory_policy == "allkeys-lru"
    report = Report(procedure="cache-api", env="sandbox", dry_run=True)
    assess_cache(report, stats, 0.8)
    found = [f for f in report.findings if f.title.startswith("redis evicted")]
    assert len(found) == 1 and found[0].severity == "warning"


def _backend_counts(base_url: str) -> dict[tuple[str, str], float]:
    """The backend's own counters (ground truth) by (handler, status)."""
    text = httpx.get(f"{base_url}/metrics", timeout=3).text
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "http_requests":
            for s in family.samples:
                if s.name == "http_requests_total":
                    out[(s.labels["handler"], s.labels["status"])] = s.value
    return out


def test_promql_matches_the_backends_request_counts(sandbox_env) -> None:  # noqa: ANN001
    base = sandbox_env.http_checks["api-health"].url.removesuffix("/api/health")
    with httpx.Client(base_url=base, timeout=5) as http:
        for _ in range(12):  # 12 in a minute: well over the 0.1/s HighErrorRate threshold
            assert http.get("/api/error").status_code == 500
        for _ in range(4):
            assert http.get("/api/health").status_code == 200
    truth = _backend_counts(base)
    promql = 'sum by (handler, status) (http_requests_total{job="pafar-backend"})'
    deadline = time.monotonic() + 15  # a few 1 s scrapes
    seen: dict[tuple[str, str], float] = {}
    while time.monotonic() < deadline:
        seen = {(s.labels["handler"], s.labels["status"]): s.value for s in instant_query(sandbox_env, promql)}
        if seen.get(("/api/error", "500"), 0) >= truth[("/api/error", "500")]:
            break
        time.sleep(0.5)
    assert seen[("/api/error", "500")] == truth[("/api/error", "500")]
    assert seen[("/api/health", "200")] >= truth[("/api/health", "200")]  # the flow's own health checks may add
    assert truth[("/api/error", "500")] >= 12

    end = datetime.now(UTC)
    series = range_query(sandbox_env, 'http_requests_total{handler="/api/error"}', start=end - timedelta(seconds=30),
                         end=end, step_s=1)
    values = [v for _, v in series[0].values]
    assert values == sorted(values) and values[-1] == truth[("/api/error", "500")]

    with pytest.raises(PromQLError, match="parse error"):
        instant_query(sandbox_env, "rate(http_requests_total[")

    doc = cache_api(env="sandbox", window="1m")
    errors = [f for f in doc["findings"] if f["title"].startswith("HighErrorRate")]
    assert errors and all(f["severity"] == "critical" for f in errors)
    assert "/api/error" in errors[0]["subject"]
    metrics = next(f for f in doc["findings"] if f["title"] == "application metrics (Prometheus)")
    titles = {r[0] for r in metrics["blocks"][0]["rows"]}
    assert titles == {"Request Rate", "Response Time (p95)", "Error Rate", "Active Users"}
    sessions = [r for r in metrics["blocks"][0]["rows"] if r[0] == "Active Users"]
    assert sessions[0][2] == "3"


def test_api_breakdown_lists_every_endpoint(sandbox_env) -> None:  # noqa: ANN001
    doc = cache_api(env="sandbox", window="1m")
    table = next(f for f in doc["findings"] if f["subject"] == "api")["blocks"][0]
    assert {r[1].split()[0] for r in table["rows"]} == set(sandbox_env.http_checks)
    slow = [f for f in doc["findings"] if f["title"].startswith("slow API endpoint api-slow")]
    assert len(slow) == 1 and slow[0]["details"]["source"] == "host"


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_prometheus_that_does_not_answer_is_a_finding_within_its_timeout(
    kind: str, sandbox_state, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
    silent_port: int, dead_port: int,
) -> None:
    port = dead_port if kind == "refused" else silent_port
    name = derive(sandbox_state, tmp_path, monkeypatch, "deadprom",
                  {"prometheus_url": f"http://127.0.0.1:{port}", "prometheus_timeout_s": 1},
                  drop=("http_checks",))
    started = time.monotonic()
    doc = cache_api(env=name)
    elapsed = time.monotonic() - started
    crit = [f for f in doc["findings"] if f["severity"] == "critical"]
    assert [f["subject"] for f in crit] == [f"prometheus http://127.0.0.1:{port}"]
    assert ("refused" if kind == "refused" else "timeout") in crit[0]["details"]["reason"].lower()
    assert any(f["subject"] == "redis" for f in doc["findings"]), "the other sources still ran"
    assert elapsed < 1 + 15
