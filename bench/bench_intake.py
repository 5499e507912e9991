"""Benchmark: the alert intake under a storm, and alert-to-first-task latency against a plain Prefect worker.

1. Storm: 10,000 alerts in batches of 100 over 100 distinct fingerprints, to the real intake backed by the
   sandbox Prefect server: acknowledgement latency p50/p99 per batch, alerts per second, runs created (must be 100).
2. Latency, p50 over 20 alerts: webhook receipt -> the procedure's first task running, through the intake and the
   warm executor; baseline in the same run: `run_deployment` to a plain `prefect worker` (process type) serving
   the same flow. Goals (issue 6): ack p99 <= 50 ms, >= 1,000 alerts/s, first task within 2 s of receipt.
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from runbook import sandbox  # noqa: E402
from tests.intake_harness import alert, running_intake  # noqa: E402

STORM_ROUTES = """
routes:
  - name: bench-storm
    match: {alertname: BenchStorm}
    procedure: db-slowness
    env: sandbox
    labels:
      database: {label: db, inventory: databases}
    policy: {mode: dry_run, cooldown_s: 0}
  - name: bench-latency
    match: {alertname: BenchLatency}
    procedure: db-slowness
    env: sandbox
    policy: {mode: dry_run, cooldown_s: 0}
"""
BASELINE_SAMPLES = int(os.environ.get("BENCH_BASELINE_SAMPLES", "5"))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def first_task_start(http: httpx.Client, run_id: str, timeout_s: float = 120) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        trs = http.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
        starts = [t["start_time"] for t in trs if t.get("start_time")]
        if starts:
            return min(datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() for s in starts)
        time.sleep(0.1)
    raise TimeoutError(f"no task of run {run_id} started within {timeout_s} s")


def storm(state: sandbox.SandboxState, work: Path) -> None:
    fingerprints = [secrets.token_hex(8) for _ in range(100)]
    doc = alert("BenchStorm", {"db": "main"})  # one startsAt: every batch resends the same 100 occurrences
    template = doc["alerts"][0]
    doc["alerts"] = [{**template, "fingerprint": fp} for fp in fingerprints]
    batches = [doc] * 100
    with running_intake(state, work / "storm", routes=STORM_ROUTES, executor=False) as it:
        it.post(alert("Warmup", {}))
        acks: list[float] = []
        started = time.perf_counter()
        for doc in batches:
            t = time.perf_counter()
            resp = it.post(doc)
            acks.append(time.perf_counter() - t)
            assert resp.status_code == 200, resp.text[:300]
        elapsed = time.perf_counter() - started
        store = it.app.state.store
        deadline = time.monotonic() + 120
        while store.pending() and time.monotonic() < deadline:
            time.sleep(0.2)
        runs = it.runs("route:bench-storm")
        with httpx.Client(base_url=it.api_url, timeout=10) as http:
            for r in runs:  # leave the server as we found it
                http.delete(f"/flow_runs/{r['id']}")
    print("storm: 10,000 alerts, batches of 100, 100 distinct fingerprints")
    print(f"  ack latency per batch: p50 {pct(acks, 50) * 1000:.1f} ms, p99 {pct(acks, 99) * 1000:.1f} ms "
          f"(goal p99 <= 50 ms: {'met' if pct(acks, 99) <= 0.05 else 'NOT met'})")
    rate = 10_000 / elapsed
    print(f"  throughput: {rate:,.0f} alerts/s (goal >= 1,000: {'met' if rate >= 1000 else 'NOT met'})")
    print(f"  runs created: {len(runs)} (must be exactly 100: {'ok' if len(runs) == 100 else 'WRONG'})")


def latency_ours(state: sandbox.SandboxState, work: Path) -> list[float]:
    samples = []
    with running_intake(state, work / "latency", routes=STORM_ROUTES, executor=True) as it, \
            httpx.Client(base_url=it.api_url, timeout=10) as http:
        it.post(alert("BenchLatency", {}))  # warm-up: first import of the flow's modules, first connections
        time.sleep(3)
        for _ in range(20):
            fp = secrets.token_hex(8)
            received = time.time()
            it.post(alert("BenchLatency", {}, fingerprint=fp))
            key = it.app.state.store._db.execute(
                "SELECT key FROM occurrences WHERE fingerprint = ?", (fp,)).fetchone()[0]
            deadline = time.monotonic() + 30
            while not (runs := it.runs(f"occurrence:{key}")) and time.monotonic() < deadline:
                time.sleep(0.05)
            samples.append(first_task_start(http, runs[0]["id"]) - received)
            time.sleep(0.3)
    return samples


def latency_plain_worker(state: sandbox.SandboxState, work: Path) -> list[float]:
    api = state.prefect_api_url
    env = {**os.environ, "PREFECT_API_URL": api}
    prefect = str(Path(sys.executable).parent / "prefect")
    subprocess.run([prefect, "work-pool", "create", "bench-plain", "--type", "process", "--overwrite"], env=env,
                   capture_output=True, check=True, cwd=ROOT)
    subprocess.run([prefect, "--no-prompt", "deploy", "flows/db_slowness.py:db_slowness", "-n", "plain",
                    "-p", "bench-plain"], env=env, capture_output=True, check=True, cwd=ROOT)
    log = open(work / "plain-worker.log", "w")  # noqa: SIM115
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", "bench-plain", "--type", "process"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    samples = []
    try:
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api}), httpx.Client(base_url=api, timeout=10) as http:
            time.sleep(5)  # the worker's own start-up is not part of a run's latency
            for _ in range(BASELINE_SAMPLES):
                t = time.time()
                run = run_deployment("db-slowness/plain", parameters={"env": "sandbox"}, timeout=0)
                samples.append(first_task_start(http, str(run.id)) - t)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()
    return samples


def main() -> None:
    was_running = set(sandbox.status().running())
    state = sandbox.up(["postgres", "prefect"])
    os.environ.update(state.engine_env())  # point the engine at the sandbox explicitly
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            storm(state, work)
            ours = latency_ours(state, work)
            plain = latency_plain_worker(state, work)
    finally:
        if not was_running:
            sandbox.down()
    p50, base = statistics.median(ours), statistics.median(plain)
    print("alert receipt -> first task running")
    print(f"  intake + warm executor: p50 {p50:.2f} s, p90 {pct(ours, 90):.2f} s over {len(ours)} alerts "
          f"(goal <= 2 s: {'met' if p50 <= 2 else 'NOT met'})")
    print(f"  baseline run_deployment + plain process worker: p50 {base:.2f} s over {len(plain)} runs")
    print(f"  ratio: {p50 / base:.2f}x the plain worker ({base / p50:.0f}x faster)")


if __name__ == "__main__":
    main()
