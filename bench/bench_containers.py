"""Benchmark: container diagnosis and SSH fan-out scale with the number of targets, against one target, same run.

On the sandbox's real Podman Docker API and sshd:
  containers  list the project + two-sample CPU/memory (1 s apart) for 1 container, then for 10 (goal <= 1.5x)
  ssh         one fixed command on 1 connection, then on 20 connections with the default bound (goal <= 3x)
Prints medians, ratios and peak RSS.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runbook import sandbox  # noqa: E402
from runbook.engine.config import load_playbooks  # noqa: E402

REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
CONTAINERS = 10
SSH_CONNECTIONS = 20
SSH_BOUNDS = (8, SSH_CONNECTIONS)  # collect_host_snapshots' default bound, and no queueing at all
COMMAND = "cat /proc/loadavg"  # a constant, like every command the engine sends


def median_time(fn: Callable[[], object]) -> float:
    samples = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    print("starting sandbox (podman, sshd)...", flush=True)
    was_running = set(sandbox.status().running())
    state = sandbox.up(["podman", "sshd"])
    os.environ.update(state.engine_env())  # point the engine at the sandbox explicitly
    os.environ["RUNBOOK_PLAYBOOKS"] = str(state.playbook_dir)
    env = load_playbooks().environment("sandbox")
    from runbook.sandbox.incidents import ContainerIncident, remove_containers_except
    from tasks.containers import list_project_containers, sample_container_stats
    from tasks.hosts import run_on_hosts

    assert env.docker is not None
    url = env.docker.base_url
    keep = {c.id for c in list_project_containers.fn(env)}
    try:
        for i in range(CONTAINERS):  # ten replicas of a "bench" service, each mildly busy
            ContainerIncident(url, service="bench", number=i + 1)._run(
                ["sh", "-c", 'trap "exit 0" TERM; while true; do i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done; '
                 "sleep 0.2; done"])
        bench = list_project_containers.fn(env, "bench")
        assert len(bench) == CONTAINERS

        def diagnose(n: int) -> None:
            rows = sample_container_stats.fn(env, list_project_containers.fn(env, "bench")[:n], 1.0)
            assert len(rows) == n

        diagnose(1)  # warm-up: imports, API version, first connection
        one = median_time(lambda: diagnose(1))
        ten = median_time(lambda: diagnose(CONTAINERS))

        app = env.ssh_hosts["app-1"]
        one_host = env.model_copy(update={"ssh_hosts": {"app-1": app}})
        many = env.model_copy(update={"ssh_hosts": {f"app-{i}": app for i in range(1, SSH_CONNECTIONS + 1)}})

        def fan_out(e: object, n: int, bound: int) -> None:
            results = run_on_hosts(e, list(e.ssh_hosts), COMMAND, max_parallel=bound)  # type: ignore[attr-defined]
            assert len(results) == n and all(r.status == 0 for r in results), results

        fan_out(one_host, 1, 1)
        ssh_one = median_time(lambda: fan_out(one_host, 1, 1))
        ssh_many = {b: median_time(lambda b=b: fan_out(many, SSH_CONNECTIONS, b)) for b in SSH_BOUNDS}
    finally:
        remove_containers_except(url, keep)
        if not was_running:
            sandbox.down()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"\nmedian of {REPEATS} runs each")
    print(f"  diagnose 1 container (list + two samples 1 s apart)    {one:7.3f} s")
    print(f"  diagnose {CONTAINERS} containers                              {ten:7.3f} s   {ten / one:5.2f}x"
          "  (goal <= 1.5x)")
    print(f"  ssh: one command on 1 connection                       {ssh_one:7.3f} s")
    for bound, value in ssh_many.items():
        print(f"  ssh: one command on {SSH_CONNECTIONS} connections, {bound:2d} at a time     {value:7.3f} s   "
              f"{value / ssh_one:5.2f}x  (goal <= 3x)")
    print(f"  peak RSS of this process: {rss_mb:.0f} MB")
    print(f"goal containers <= 1.5x: {'met' if ten <= 1.5 * one else 'NOT met'} ({ten / one:.2f}x)")
    for bound, value in ssh_many.items():
        print(f"goal ssh <= 3x ({bound} at a time): {'met' if value <= 3 * ssh_one else 'NOT met'} "
              f"({value / ssh_one:.2f}x)")

if __name__ == "__main__":
    main()
