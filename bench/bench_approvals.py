"""Benchmark (issue 11): waiting costs nothing. 50 runs pending approval on one executor, then an `auto` run.

One `runbook worker` (the default 16 threads) on the sandbox's Prefect server. Baseline, same run: an `auto`
network-checks run with nothing else on the executor, creation -> first task and -> finished (median of 3). Then
50 db-slowness runs in `approve` mode, each with a change to approve (one runaway query in the sandbox database),
are suspended for approval: 50 > 16 threads, so before suspension they would have taken every thread and the auto
run would have waited for a decision. The same auto run is measured again while the 50 wait, then they are all
rejected (nothing applied) and the runaway query is checked to still run.
"""

from __future__ import annotations

import os
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
from runbook.app.remote_run import TERMINAL, api_client, deployment, request, resume  # noqa: E402
from runbook.app.serve import register_deployments  # noqa: E402
from runbook.sandbox.incidents import DbIncident  # noqa: E402
from tests.prefect_runs import create_run, run_state, wait_for  # noqa: E402
from tests.scenarios import query_active  # noqa: E402

PENDING = int(os.environ.get("BENCH_APPROVALS_PENDING", "50"))
APPLY = {"env": "sandbox", "dry_run": False, "long_query_s": 1, "idle_in_transaction_s": 3600}


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def auto_run(http: httpx.Client) -> tuple[float, float]:
    """An auto-mode run's creation -> first task start and -> end, from the server's own timestamps."""
    run_id = create_run(http, "network-checks", {"env": "sandbox"}, ["mode:auto"])
    wait_for(lambda: run_state(http, run_id)["type"] in TERMINAL, 300, "the auto run")
    run = http.get(f"/flow_runs/{run_id}").json()
    starts: list[float] = []

    def task_started() -> bool:  # task runs are recorded from events, a moment after the flow's own state
        tasks = http.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
        starts[:] = [_ts(t["start_time"]) for t in tasks if t.get("start_time")]
        return bool(starts)

    wait_for(task_started, 60, "the auto run's task runs recorded")
    first = min(starts)
    return first - _ts(run["created"]), _ts(run["end_time"]) - _ts(run["created"])


def median3(http: httpx.Client) -> tuple[float, float]:
    samples = [auto_run(http) for _ in range(3)]
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def main() -> None:
    print("starting sandbox...", flush=True)
    was_running = set(sandbox.status().running())
    state = sandbox.up()
    api = state.prefect_api_url
    assert api
    os.environ.update(state.engine_env())  # the sandbox environment is one of the deployments' env choices
    register_deployments(api)
    env = {**os.environ, **state.engine_env(), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}
    work = Path(tempfile.mkdtemp(prefix="bench-approvals-"))
    worker = subprocess.Popen([sys.executable, "-m", "runbook.app.cli", "worker", "--poll", "1"], env=env,
                              stdout=open(work / "worker.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    dsn = state.env_vars()["RUNBOOK_SANDBOX_APP_DSN"]
    inc = DbIncident(dsn, waiters=0, slow_runs=0, runaway=True).start()
    waiting: list[str] = []
    try:
        wait_for(lambda: "serving work pool" in (work / "worker.log").read_text(errors="replace"), 120, "the worker")
        with api_client(api, 30) as http:
            auto_run(http)  # warm-up: flows imported, clients made
            base_first, base_end = median3(http)
            time.sleep(1.5)  # the runaway query is older than long_query_s
            started = time.perf_counter()
            dep = deployment(http, "db-slowness")
            for _ in range(PENDING):  # what a storm of approve-mode alerts leaves: 503s from a busy server retried
                waiting.append(request(http, "POST", f"/deployments/{dep['id']}/create_flow_run", json={
                    "parameters": APPLY, "tags": ["mode:approve"], "state": {"type": "SCHEDULED", "name": "Scheduled"}},
                ).raise_for_status().json()["id"])
            wait_for(lambda: all(run_state(http, r)["name"] == "Suspended" for r in waiting), 900,
                     f"{PENDING} runs suspended for approval")
            suspended_s = time.perf_counter() - started
            busy_first, busy_end = median3(http)
            still = sum(1 for r in waiting if run_state(http, r)["name"] == "Suspended")
            for r in waiting:
                resume(http, r, approve=False, approver="bench", reason="benchmark: reject")
            wait_for(lambda: all(run_state(http, r)["type"] in TERMINAL for r in waiting), 900, "rejected runs end")
            waiting = []
        print(f"{PENDING} runs pending approval on one executor with 16 threads (all suspended after "
              f"{suspended_s:.1f} s; {still} still waiting after the measurement)")
        print(f"  auto run, creation -> first task: {busy_first:.2f} s with them waiting vs {base_first:.2f} s with "
              f"none ({busy_first / base_first:.2f}x)")
        print(f"  auto run, creation -> finished:   {busy_end:.2f} s with them waiting vs {base_end:.2f} s with none "
              f"({busy_end / base_end:.2f}x)")
        untouched = query_active(dsn, inc.runaway_pid)
        print(f"  after rejecting all {PENDING}: the runaway query they planned to cancel "
              f"{'still runs (nothing applied)' if untouched else 'is GONE: something applied'}")
    finally:
        if waiting:
            with api_client(api, 30) as http:
                for r in waiting:
                    http.post(f"/flow_runs/{r}/set_state", json={"state": {"type": "CANCELLED"}, "force": True})
        worker.terminate()
        worker.wait(120)
        inc.stop()
        if not was_running:
            sandbox.down()


if __name__ == "__main__":
    main()
