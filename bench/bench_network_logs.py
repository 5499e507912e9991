"""Benchmark: the network-checks matrix and the four log queries, each against a baseline from the same run.

  matrix    5 sources x 6 destinations, all checks concurrently (tasks.network.run_checks), against the slowest
            single check of the same 30 run one at a time. Sources are the host bound to 127.0.0.1-127.0.0.5
            (network.source_addresses); destinations are 4 TCP targets (db, redis, prometheus, elasticsearch) and
            2 HTTP endpoints (api-health and the backend's slow endpoint). Goal: at most 2x.
  logs      the runbook's four Kibana queries at once (tasks.logs.search_logs: one _msearch request) against one
            query alone, each including its client set-up as a flow pays it, on the sandbox's OpenSearch-compatible
            server; four separate requests one after another for reference. Goal: at most 1.5x.
Prints medians and ratios. In-container sources are not part of the matrix here: an exec through the container
engine costs ~1 s and is gated to 4 at once, so it would measure the engine, not the matrix.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runbook import sandbox  # noqa: E402

REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
SERVICES = ["postgres", "redis", "backend", "node_exporter", "alertmanager", "prometheus", "opensearch"]
SOURCES = [f"127.0.0.{i}" for i in range(1, 6)]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn) -> float:  # noqa: ANN001
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    print(f"starting sandbox ({', '.join(SERVICES)})...", flush=True)
    was_running = set(sandbox.status().running())
    state = sandbox.up(SERVICES)
    os.environ.update(state.engine_env())  # point the engine at the sandbox explicitly
    try:
        from runbook.engine.config import NetworkConfig, NetworkTarget, load_playbooks
        from tasks.logs import search_logs
        from tasks.network import plan_checks
        from tasks.probes import run_checks

        env = load_playbooks([state.playbook_dir]).environment("sandbox")
        assert env.network is not None
        targets = {n: NetworkTarget(host=t.host, port=t.port, timeout_s=2, from_services=[])
                   for n, t in env.network.targets.items() if n in ("db", "redis", "prometheus", "elasticsearch")}
        cfg = NetworkConfig(targets=targets, source_addresses=SOURCES, max_parallel=32)
        bench_env = env.model_copy(update={
            "docker": None, "network": cfg,
            "http_checks": {n: env.http_checks[n] for n in ("api-health", "api-slow")}})
        checks = plan_checks(bench_env, cfg).checks
        assert len(checks) == len(SOURCES) * 6, len(checks)

        run_checks(checks[:1])  # warm-up: imports, first connections
        singles, matrices, failures = [], [], 0
        for _ in range(REPEATS):
            per_check = []
            for check in checks:
                per_check.append(timed(lambda check=check: run_checks([check])))
            singles.append(max(per_check))
            started = time.perf_counter()
            rows = run_checks(checks, cfg.max_parallel)
            matrices.append(time.perf_counter() - started)
            failures += sum(not r.ok for r in rows)

        search_logs(env)  # warm-up
        one, four, seq = [], [], []
        for _ in range(REPEATS * 4):  # interleaved, so a busy moment on the machine hits all three alike
            one.append(timed(lambda: search_logs(env, ["errors"])))
            four.append(timed(lambda: search_logs(env)))
            seq.append(sum(timed(lambda n=n: search_logs(env, [n])) for n in
                           ("errors", "slow_responses", "auth_failures", "payment_errors")))
    finally:
        if not was_running:
            sandbox.down()

    m, s = median(matrices), median(singles)
    print(f"\nnetwork matrix: {len(SOURCES)} sources x 6 destinations = {len(checks)} checks, median of {REPEATS}")
    print(f"  slowest single check (run alone)     {s * 1000:8.1f} ms")
    print(f"  whole matrix, concurrently           {m * 1000:8.1f} ms   {m / s:5.2f}x slowest single "
          f"(goal <= 2x: {'met' if m <= 2 * s else 'NOT met'})")
    print(f"  failed checks across all runs: {failures}")
    o, f4, sq = median(one), median(four), median(seq)
    print(f"\nlog queries on the OpenSearch-compatible server, median of {REPEATS * 4}")
    print(f"  one query (errors)                   {o * 1000:8.1f} ms")
    print(f"  four queries concurrently            {f4 * 1000:8.1f} ms   {f4 / o:5.2f}x one "
          f"(goal <= 1.5x: {'met' if f4 <= 1.5 * o else 'NOT met'})")
    print(f"  four queries one after another       {sq * 1000:8.1f} ms   {sq / o:5.2f}x one (for reference)")


if __name__ == "__main__":
    main()
