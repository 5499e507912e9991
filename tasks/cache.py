"""Redis cache statistics: the runbook's `redis-cli info stats`, read over the network with the playbook's URL.

Client: the ``redis`` PyPI package (redis-py), already installed as a Prefect dependency and the client the Pafar
backend itself uses; it parses INFO into typed values and handles AUTH/TLS (rediss://), which a hand-written RESP
client would have to re-implement.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from runbook.engine.clients import redis_client
from runbook.engine.config import Environment
from runbook.engine.steps import step

FIELDS = ("keyspace_hits", "keyspace_misses", "evicted_keys", "expired_keys", "used_memory", "used_memory_peak",
          "maxmemory", "maxmemory_policy", "mem_fragmentation_ratio", "connected_clients", "blocked_clients",
          "rejected_connections", "total_commands_processed", "uptime_in_seconds", "redis_version")


@dataclass(frozen=True)
class CacheStats:
    """The INFO fields of ``FIELDS`` (None when the server does not report one) and the hit ratio since start or
    CONFIG RESETSTAT; the ``window_*`` figures when two reads ``window_s`` apart were taken."""

    keyspace_hits: int | None = None
    keyspace_misses: int | None = None
    evicted_keys: int | None = None
    expired_keys: int | None = None
    used_memory: int | None = None
    used_memory_peak: int | None = None
    maxmemory: int | None = None
    maxmemory_policy: str | None = None
    mem_fragmentation_ratio: float | None = None
    connected_clients: int | None = None
    blocked_clients: int | None = None
    rejected_connections: int | None = None
    total_commands_processed: int | None = None
    uptime_in_seconds: int | None = None
    redis_version: str | None = None
    hit_ratio: float | None = None
    window_s: float = 0.0
    window_hit_ratio: float | None = None
    window_hits: int | None = None
    window_misses: int | None = None
    window_evictions: int | None = None


def hit_ratio(hits: int, misses: int) -> float | None:
    """keyspace_hits / (hits + misses); None when there were no lookups at all."""
    total = hits + misses
    return None if total == 0 else hits / total


def read_info(env: Environment) -> CacheStats:
    """The INFO fields the runbook's cache checks need (server, clients, memory, stats), in one round trip."""
    with redis_client(env) as r:
        info: dict[str, Any] = r.info("all")
    fields: dict[str, Any] = {k: info.get(k) for k in FIELDS}
    stats = CacheStats(**fields)
    return replace(stats, hit_ratio=hit_ratio(stats.keyspace_hits or 0, stats.keyspace_misses or 0))


@step
def get_cache_stats(env: Environment, sample_s: float = 0.0) -> CacheStats:
    """Hit ratio, evictions, memory and clients. With ``sample_s`` > 0, two INFO reads that far apart also give
    the hit ratio and evictions over that window (INFO counters are totals since start or CONFIG RESETSTAT)."""
    first = read_info(env)
    if sample_s <= 0:
        return first
    started = time.monotonic()
    time.sleep(sample_s)
    second = read_info(env)
    hits = (second.keyspace_hits or 0) - (first.keyspace_hits or 0)
    misses = (second.keyspace_misses or 0) - (first.keyspace_misses or 0)
    return replace(second, window_s=round(time.monotonic() - started, 2), window_hits=hits, window_misses=misses,
                   window_hit_ratio=hit_ratio(hits, misses),
                   window_evictions=(second.evicted_keys or 0) - (first.evicted_keys or 0))
