"""Benchmark (issue 11): an alert storm against the multi-node shape of deploy/cluster/ with faults.

The cluster (runbook.sandbox.cluster): two Prefect API replicas on the sandbox's PostgreSQL sharing events through
Redis, Prefect's background services, nginx round-robin in front of the API and of two intakes, two executors.
M occurrences are resent R times (as Alertmanager resends a firing group) from concurrent senders; each routes
to a memory-leak dry run sampling for 10 s, so the executor killed mid-storm still holds runs.

  baseline  the same storm with nothing killed, in the same run
  faults    after round 2: kill -9 of one intake (restarted after round 5, as systemd would), one executor and one
            API replica (both stay dead)

Printed for each: runs created (must be M), runs stranded (must be 0), how the runs ended, webhook ack p50/p99
(through nginx; a webhook that met a dead intake is retried, as Alertmanager does, and its ack counts the
successful attempt only), and for the faults storm the time from the executor's death to the last of its runs
finished by the other executor (goal <= 60 s).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runbook import sandbox  # noqa: E402
from tests.cluster_storm import StormResult, pct, run_storm, running_cluster  # noqa: E402

OCCURRENCES = int(os.environ.get("BENCH_CLUSTER_OCCURRENCES", "40"))
ROUNDS = int(os.environ.get("BENCH_CLUSTER_ROUNDS", "8"))


def report(label: str, r: StormResult) -> None:
    runs = sum(r.runs_per_occurrence.values())
    dup = sum(1 for n in r.runs_per_occurrence.values() if n > 1)
    print(f"{label}: {r.alerts_sent} alerts, {r.occurrences} occurrences")
    print(f"  runs created: {runs} (must be {r.occurrences}: {'ok' if runs == r.occurrences and not dup else 'WRONG'})"
          f"; occurrences run twice: {dup}; stranded: {len(r.stranded)}")
    print(f"  ended: {dict(r.states)}")
    print(f"  webhook ack: p50 {pct(r.acks_s, 50) * 1000:.1f} ms, p99 {pct(r.acks_s, 99) * 1000:.1f} ms "
          f"over {len(r.acks_s)} webhooks; failed attempts retried: {r.failed_posts}")


def main() -> None:
    print("starting sandbox...", flush=True)
    was_running = set(sandbox.status().running())
    state = sandbox.up()
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        with running_cluster(state, work / "baseline") as cluster:
            base = run_storm(cluster, OCCURRENCES, ROUNDS, kill_after_round=0, restart_intake_after_round=0,
                             slow=True)
        report("baseline (nothing killed)", base)
        with running_cluster(state, work / "faults") as cluster:
            faults = run_storm(cluster, OCCURRENCES, ROUNDS, slow=True)
        report("faults (kill -9 of intake1, executor1, api1 after round 2; intake1 back after round 5)", faults)
        took = faults.executor_death_to_finished_s
        print(f"  the dead executor held {faults.killed_executor_runs} runs; the last was finished elsewhere "
              + (f"{took:.1f} s after its death (goal <= 60 s: {'met' if took <= 60 else 'NOT met'})"
                 if took is not None else "never (or it held none)"))
        if base.acks_s and faults.acks_s:
            print(f"  ack p99 with faults / without: {pct(faults.acks_s, 99) / pct(base.acks_s, 99):.1f}x")
    finally:
        if not was_running:
            sandbox.down()


if __name__ == "__main__":
    main()
