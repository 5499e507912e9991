"""Redis cache statistics: the runbook's `redis-cli info stats`, read over the network with the playbook's URL.

Client: the ``redis`` PyPI package (redis-py), already installed as a Prefect dependency and the client the Pafar
backend itself uses; it parses INFO into typed values and handles AUTH/TLS (rediss://), which a hand-written RESP
client would have to re-implement.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from runbook.engine.clients import redis_client
from runbook.engine.config import Environment

FIELDS = ("keyspace_hits", "keyspace_misses", "evicted_keys", "expired_keys", "used_memory", "used_memory_peak",
          "maxmemory", "maxmemory_policy", "mem_fragmentation_ratio", "connected_clients", "blocked_clients",
          "rejected_connections", "total_commands_processed", "uptime_in_seconds", "redis_version")


def hit_ratio(hits: int, misses: int) -> float | None:
    """keyspace_hits / (hits + misses); None when there were no lookups at all."""
    total = hits + misses
    return None if total == 0 else hits / total


def read_info(env: Environment) -> dict[str, Any]:
    """The INFO fields the runbook's cache checks need (server, clients, memory, stats), in one round trip."""
    with redis_client(env) as r:
        info = r.info("all")
    return {k: info.get(k) for k in FIELDS}


@task(cache_policy=NONE)
def get_cache_stats(env: Environment, sample_s: float = 0.0) -> dict[str, Any]:
    """Hit ratio, evictions, memory and clients. With ``sample_s`` > 0, two INFO reads that far apart also give
    the hit ratio and evictions over that window (INFO counters are totals since start or CONFIG RESETSTAT)."""
    first = read_info(env)
    out: dict[str, Any] = {**first, "hit_ratio": hit_ratio(first["keyspace_hits"] or 0, first["keyspace_misses"] or 0),
                           "window_s": 0.0, "window_hit_ratio": None, "window_hits": None, "window_misses": None,
                           "window_evictions": None}
    if sample_s > 0:
        started = time.monotonic()
        time.sleep(sample_s)
        second = read_info(env)
        hits = (second["keyspace_hits"] or 0) - (first["keyspace_hits"] or 0)
        misses = (second["keyspace_misses"] or 0) - (first["keyspace_misses"] or 0)
        out.update({**second, "hit_ratio": hit_ratio(second["keyspace_hits"] or 0, second["keyspace_misses"] or 0),
                    "window_s": round(time.monotonic() - started, 2), "window_hits": hits, "window_misses": misses,
                    "window_hit_ratio": hit_ratio(hits, misses),
                    "window_evictions": (second["evicted_keys"] or 0) - (first["evicted_keys"] or 0)})
    return out
