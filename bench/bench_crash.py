"""Benchmark (issue 11): how long a run whose executor died stays stranded, and how long a waiting approval costs.

Measured in one run, on the sandbox's real Prefect server, with real `runbook worker` processes (--poll 15, the
default) each running a slow dry run (memory-leak sampling for 60 s) when it dies:
  baseline   a run stranded the way it was before this work: nobody reconciles the pool (its worker is frozen and
             no other executor serves the pool); its state after the same time the measured cases took
  restart    kill -9, then a successor starts on the same host: time from the kill to the run CRASHED and (an
             alert's run) rescheduled and claimed by the successor
  frozen     SIGSTOP (a hung or partitioned executor: its PID lives, its heartbeats stop) with a second executor
             serving the pool: time from the freeze to the run CRASHED (goal <= 60 s)
  drain      SIGTERM with --grace 2: time from the signal to the run handed back (AwaitingRetry)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runbook import sandbox  # noqa: E402
from runbook.app.remote_run import api_client, deployment  # noqa: E402
from runbook.app.serve import register_deployments  # noqa: E402

SLOW = {"env": "sandbox", "dry_run": True, "samples": 60, "interval_s": 1.0}
ALERT_TAGS = ["alert:BenchCrash", "occurrence:bench-crash"]


def worker(env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "runbook.app.cli", "worker", *extra], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def until(pred: Callable[[], bool], timeout_s: float = 300) -> float:
    started = time.perf_counter()
    while not pred():
        if time.perf_counter() - started > timeout_s:
            raise SystemExit(f"gave up after {timeout_s:g} s")
        time.sleep(0.1)
    return time.perf_counter() - started


def main() -> None:
    print("starting sandbox...", flush=True)
    was_running = set(sandbox.status().running())
    state = sandbox.up()
    os.environ.update(state.engine_env())
    api = state.prefect_api_url
    assert api
    register_deployments(api)
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    work = Path(tempfile.mkdtemp(prefix="bench-crash-"))
    procs: list[subprocess.Popen[bytes]] = []
    http = api_client(api, timeout_s=10)
    dep = deployment(http, "memory-leak")

    def create(tags: list[str]) -> str:
        return str(http.post(f"/deployments/{dep['id']}/create_flow_run", json={
            "parameters": SLOW, "tags": tags, "state": {"type": "SCHEDULED", "name": "Scheduled"}},
        ).raise_for_status().json()["id"])

    def st(run_id: str) -> dict[str, Any]:
        return http.get(f"/flow_runs/{run_id}").raise_for_status().json()["state"]  # type: ignore[no-any-return]

    def start(name: str, *extra: str) -> subprocess.Popen[bytes]:
        proc = worker(env, work / f"{name}.log", *extra)
        procs.append(proc)
        return proc

    try:
        # restart after kill -9 (same host)
        a = start("a")
        run = create(ALERT_TAGS)
        until(lambda: st(run)["type"] == "RUNNING")
        os.killpg(a.pid, signal.SIGKILL)
        killed = time.perf_counter()
        a.wait()  # reaped, as its service manager would (an unreaped zombie still answers kill -0)
        start("b")
        until(lambda: st(run)["name"] in ("AwaitingRetry", "Pending", "Running") and any(
            s["name"] == "Crashed" for s in http.get("/flow_run_states/", params={"flow_run_id": run}).json()))
        restart_crashed = time.perf_counter() - killed
        until(lambda: st(run)["type"] == "RUNNING")
        restart_rerun = time.perf_counter() - killed
        procs[-1].send_signal(signal.SIGKILL)
        procs[-1].wait()

        # frozen executor, another one serving the pool
        c = start("c")
        run2 = create(["cli"])
        until(lambda: st(run2)["type"] == "RUNNING")
        time.sleep(2)
        d = start("d")
        time.sleep(5)  # d is up and heartbeating
        os.killpg(c.pid, signal.SIGSTOP)
        frozen_at = time.perf_counter()
        until(lambda: st(run2)["type"] == "CRASHED", 240)
        frozen = time.perf_counter() - frozen_at
        os.killpg(c.pid, signal.SIGKILL)
        os.killpg(d.pid, signal.SIGKILL)

        # baseline: the same freeze with nobody reconciling the pool, observed for as long as the frozen case took
        e = start("e")
        run3 = create(["cli"])
        until(lambda: st(run3)["type"] == "RUNNING")
        os.killpg(e.pid, signal.SIGSTOP)
        time.sleep(frozen)
        baseline_state = st(run3)["name"]
        os.killpg(e.pid, signal.SIGKILL)
        http.post(f"/flow_runs/{run3}/set_state", json={"state": {"type": "CANCELLED", "name": "Cancelled"},
                                                       "force": True})

        # drain on SIGTERM
        f = start("f", "--grace", "2")
        run4 = create(["cli"])
        until(lambda: st(run4)["type"] == "RUNNING")
        f.send_signal(signal.SIGTERM)
        termed = time.perf_counter()
        until(lambda: st(run4)["name"] == "AwaitingRetry", 120)
        drained = time.perf_counter() - termed
        f.wait(timeout=60)
        http.post(f"/flow_runs/{run4}/set_state", json={"state": {"type": "CANCELLED", "name": "Cancelled"},
                                                       "force": True})
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGCONT)
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=30)
        http.close()
        if not was_running:
            sandbox.down()

    print("\nexecutor died mid-run (memory-leak, 60 s dry run; executors poll every 15 s)")
    print(f"  baseline: frozen executor, nobody reconciling: after {frozen:5.1f} s the run is still {baseline_state!r}")
    print(f"  kill -9, successor on the same host: Crashed after {restart_crashed:5.1f} s, "
          f"running again (alert run, retried once) after {restart_rerun:5.1f} s")
    print(f"  frozen executor (SIGSTOP), another serving the pool: Crashed after {frozen:5.1f} s "
          f"(goal <= 60 s: {'met' if frozen <= 60 else 'NOT met'})")
    print(f"  SIGTERM with --grace 2: handed back after {drained:5.1f} s")


if __name__ == "__main__":
    main()
