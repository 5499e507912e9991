"""Benchmark (issue 14): how fast an on-call engineer gets a diagnosis, against psql running the same SQL.

Measured in one run, on the sandbox's real PostgreSQL, Prefect server and Podman (the backend container):
  baseline   psql -f with db-slowness's diagnostic statements (bench_db_slowness.BASELINE_SQL)
  (w)        `runbook run db-slowness --env sandbox` with `runbook serve --no-intake` running: the warm path
  (i)        the same with --in-process against the same server: the flow runs in the CLI process
  (n)        nothing configured (no PREFECT_API_URL): first call (starts the background server), later calls
  flow       the run's own time on the server (start to end) for the warm-path runs
  ui         create_flow_run through the API (what the UI's Run button does) -> first task running
  by hand    the flow's work without any engine: psql -f beside the pool check's exec (Docker SDK), side by side
  cpu        CPU time every process on the host used per warm run, by role (Prefect server, PostgreSQL, executor,
             Podman, the CLI): on a small host the run's time is bounded by the CPU all of them need
  floor      a plain Prefect flow in this warm process on the same server (no runbook code): empty; 7 no-op tasks
             (db-slowness runs 7 steps); the same plus storing one run input (the report): what Prefect's own
             bookkeeping costs a run before any work, so "where the rest goes" is measured, not guessed
Prints medians and ratios against the baseline. Goals (issue 14): (w) p50 <= 1.0 s; flow <= 3x baseline;
ui <= 1.0 s p50.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_db_slowness import BASELINE_SQL  # noqa: E402
from runbook import sandbox  # noqa: E402
from runbook.app.remote_run import api_client, deployment  # noqa: E402
from runbook.sandbox.incidents import DbIncident  # noqa: E402
from tests.prefect_runs import api_headers, api_settings  # noqa: E402

REPEATS = int(os.environ.get("BENCH_REPEATS", "7"))
CLI = [sys.executable, "-m", "runbook.app.cli", "run", "db-slowness", "--env", "sandbox", "--output", "json"]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, dict]:
    started, wall_start = time.perf_counter(), time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=600)
    elapsed = time.perf_counter() - started
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{cmd[2:6]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    doc = json.loads(proc.stdout) if proc.stdout.startswith("{") else {}
    if doc:
        doc["_bench_wall"] = (wall_start, wall_start + elapsed)
    return elapsed, doc


PHASES = ("CLI start -> run created", "created -> claimed (Pending)", "claimed -> Running", "Running -> first task",
          "first task -> last step ends", "last step -> Completed", "Completed -> CLI exit")


def phases(api: str, doc: dict) -> list[float]:
    """Where one warm run's time went, from the server's own timestamps (same host clock as the CLI's)."""
    run_id = doc["flow_run_id"]
    with api_client(api, timeout_s=10) as http:
        run = http.get(f"/flow_runs/{run_id}").json()
        states = http.get("/flow_run_states/", params={"flow_run_id": run_id}).json()
        tasks = http.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}, "limit": 200}).json()

    def at(stamp: str) -> float:
        return datetime.fromisoformat(stamp).timestamp()

    first = {s["type"]: at(s["timestamp"]) for s in sorted(states, key=lambda s: s["timestamp"], reverse=True)}
    created = at(run["created"])
    cli_start, cli_end = doc["_bench_wall"]
    task_start = min(at(t["start_time"]) for t in tasks if t.get("start_time"))
    task_end = max(at(t["end_time"]) for t in tasks if t.get("end_time"))
    marks = [cli_start, created, first["PENDING"], first["RUNNING"], task_start, task_end, first["COMPLETED"], cli_end]
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


# role: (its command line contains one of these, or its process name is one of these)
ROLES = {"Prefect server": (("prefect server start",), ()), "PostgreSQL": ((), ("postgres",)),
         "executor (runbook serve)": (("runbook.app.cli serve",), ()),
         "Podman (API, conmon, crun)": ((), ("podman", "conmon", "crun"))}


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every process on the host, by role (ROLES, else "other"), from /proc. This
    process counts only its reaped children: the CLI runs it started and waited for."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rfind(")") + 2:].split()
        utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
        pid = int(entry.name)
        if pid == os.getpid():
            out[pid] = ("CLI (runbook run)", (cutime + cstime) / tick)
            continue
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        role = next((name for name, (marks, names) in ROLES.items()
                     if comm in names or any(m in cmdline for m in marks)), "other")
        out[pid] = (role, (utime + stime + cutime + cstime) / tick)
    return out


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each role used between two snapshots (a process that ended meanwhile counts only through the
    parent that reaped it)."""
    used: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        used[role] = used.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
    return used


def wait_ready(api: str, timeout_s: float = 120) -> None:
    from runbook.app.remote_run import warm_executor_ready

    deadline = time.monotonic() + timeout_s
    with api_client(api, timeout_s=5) as http:
        while not warm_executor_ready(http):
            if time.monotonic() > deadline:
                raise SystemExit("the warm executor did not come up")
            time.sleep(0.2)


def run_seconds(api: str, run_id: str) -> float:
    run = httpx.get(f"{api}/flow_runs/{run_id}", headers=api_headers(), timeout=10).json()
    return (datetime.fromisoformat(run["end_time"]) - datetime.fromisoformat(run["start_time"])).total_seconds()


def ui_to_first_task(api: str) -> float:
    """Create a run the way the UI's Run button does; server time from creation to the first task's start."""
    with api_client(api, timeout_s=10) as http:
        dep = deployment(http, "db-slowness")
        run = http.post(f"/deployments/{dep['id']}/create_flow_run", json={
            "parameters": {"env": "sandbox"}, "state": {"type": "SCHEDULED", "name": "Scheduled"}},
        ).raise_for_status().json()
        created = datetime.fromisoformat(run["created"])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            tasks = http.post("/task_runs/filter", json={
                "flow_runs": {"id": {"any_": [run["id"]]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 50}).json()
            starts = [datetime.fromisoformat(t["start_time"]) for t in tasks if t.get("start_time")]
            if starts:
                while (http.get(f"/flow_runs/{run['id']}").json()["state"]["type"]) not in (
                        "COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    time.sleep(0.1)
                return (min(starts) - created).total_seconds()
            time.sleep(0.05)
    raise SystemExit("no task started within 120 s")


def by_hand(psql: list[str], env: dict[str, str]) -> float:
    """psql -f and the pool check's command in the backend container (Docker exec API), side by side: the flow's
    work with no engine around it."""
    import docker

    from runbook.engine.config import load_playbooks
    from tasks.containers import project_filters

    environment = load_playbooks().environment("sandbox")
    if environment.docker is None:
        raise SystemExit("by hand: the sandbox environment has no Docker API (podman not started)")
    client = docker.DockerClient(base_url=environment.docker.base_url, timeout=30)
    try:
        container = client.containers.list(filters=project_filters(environment, "backend"))[0]
        command = environment.services["backend"].pool_status_command
        started = time.perf_counter()
        proc = subprocess.Popen(psql, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        exit_code, _ = container.exec_run(command)
        proc.wait(timeout=60)
        elapsed = time.perf_counter() - started
    finally:
        client.close()
    if exit_code != 0 or proc.returncode != 0:
        raise SystemExit(f"by hand: exec exited {exit_code}, psql {proc.returncode}")
    return elapsed


def prefect_floor(api: str, repeats: int) -> dict[str, list[float]]:
    """Flow time (the server's start -> end) of plain Prefect flows run in this process against ``api``, with
    the executor's Prefect shortcuts, as the warm executor runs procedures: Prefect's own share of a run."""
    from prefect import flow, get_client, task
    from prefect.runtime import flow_run
    from prefect.settings import temporary_settings

    from runbook.app.prefect_shortcuts import install

    @task
    def noop(i: int) -> int:
        return i

    def steps() -> None:  # db-slowness's shape: three side by side, then four one after the other
        for future in [noop.submit(i) for i in range(3)]:
            future.result()
        for i in range(4):
            noop(i)

    @flow(name="bench-floor-empty")
    def empty() -> None:
        pass

    @flow(name="bench-floor-tasks")
    def seven_tasks() -> None:
        steps()

    @flow(name="bench-floor-report")
    def seven_tasks_and_report() -> None:
        steps()
        get_client(sync_client=True).create_flow_run_input(flow_run.id, "bench-report", '{"findings": []}')

    out: dict[str, list[float]] = {}
    with temporary_settings(updates=api_settings(api)):  # type: ignore[arg-type]
        install(api)
        for fn in (empty, seven_tasks, seven_tasks_and_report):
            fn()  # warm-up
            times = []
            for _ in range(repeats):
                state = fn(return_state=True)
                times.append(run_seconds(api, str(state.state_details.flow_run_id)))
            out[fn.name] = times
    return out


def main() -> None:
    print("starting sandbox (postgres, prefect, podman)...", flush=True)
    was_running = set(sandbox.status().running())
    # podman: the environment then has its Docker API and the backend container, so db-slowness runs whole (the
    # application's pool check included), as against a real environment
    state = sandbox.up(["postgres", "prefect", "podman"])
    os.environ.update(state.engine_env())  # point the engine at the sandbox explicitly
    api = state.prefect_api_url
    assert api
    secrets = state.env_vars()
    incident = DbIncident(secrets["RUNBOOK_SANDBOX_APP_DSN"], runaway=False).start()  # something to find
    base_env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    base_env.pop("PREFECT_API_URL", None)
    served_env = {**base_env, "PREFECT_API_URL": api}
    work = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    serve = subprocess.Popen([sys.executable, "-m", "runbook.app.cli", "serve", "--no-intake", "--state", str(work)],
                             env=served_env, stdout=open(work / "serve.log", "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    local_env = {**base_env, "RUNBOOK_STATE_DIR": str(work / "local"), "RUNBOOK_LOCAL_SERVER": "1"}
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as fh:
            fh.write(BASELINE_SQL)
        psql = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-o", "/dev/null", "-f", fh.name,
                secrets["RUNBOOK_SANDBOX_DB_DSN"]]
        baseline = [timed(psql, base_env)[0] for _ in range(REPEATS)]
        wait_ready(api)
        timed(CLI, served_env)  # warm-up: the executor's first run pays its connections
        cpu_before, wall_before = cpu_snapshot(), time.perf_counter()
        warm = [timed(CLI, served_env) for _ in range(REPEATS)]
        cpu_wall, cpu = time.perf_counter() - wall_before, cpu_by_role(cpu_before, cpu_snapshot())
        flow = [run_seconds(api, doc["flow_run_id"]) for _, doc in warm]
        split = [phases(api, doc) for _, doc in warm]
        in_process = [timed([*CLI, "--in-process"], served_env)[0] for _ in range(3)]
        ui = [ui_to_first_task(api) for _ in range(REPEATS)]
        first_local = timed(CLI, local_env)[0]
        later_local = [timed(CLI, local_env)[0] for _ in range(REPEATS)]
        hand = [by_hand(psql, base_env) for _ in range(REPEATS)]
        floor = prefect_floor(api, REPEATS)
    finally:
        subprocess.run([sys.executable, "-m", "runbook.app.cli", "local", "stop"], env=local_env,
                       capture_output=True, check=False, timeout=60)
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)
        incident.stop()
        if not was_running:
            sandbox.down()

    b = statistics.median(baseline)
    rows = [
        ("baseline: psql -f, same diagnostic SQL", baseline),
        ("(w) runbook run, warm executor (serve running)", [t for t, _ in warm]),
        ("(i) runbook run --in-process, same server", in_process),
        ("(n) nothing configured: first call (starts server)", [first_local]),
        ("(n) nothing configured: later calls", later_local),
        ("flow's own time on the server (warm runs)", flow),
        ("UI/API create_flow_run -> first task running", ui),
        ("by hand: psql -f beside the pool check's exec", hand),
        ("Prefect floor: empty flow", floor["bench-floor-empty"]),
        ("Prefect floor: 7 no-op tasks", floor["bench-floor-tasks"]),
        ("Prefect floor: 7 no-op tasks + store the report", floor["bench-floor-report"]),
    ]
    print(f"\nmedians ({REPEATS} runs each unless one)")
    for label, values in rows:
        m = statistics.median(values)
        print(f"  {label:<52} {m:8.3f} s   {m / b:7.1f}x baseline")
    print(f"\nwhere a warm run's time goes (medians of {REPEATS}; the server's timestamps)")
    for i, label in enumerate(PHASES):
        print(f"  {label:<52} {statistics.median(p[i] for p in split):8.3f} s")
    print(f"\nCPU per warm run, every process on this host ({os.cpu_count()} cores; /proc, over the {REPEATS} runs: "
          f"{1000 * cpu_wall / REPEATS:.0f} ms of wall each)")
    for role, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]):
        print(f"  {role:<52} {1000 * seconds / REPEATS:8.0f} ms")
    print(f"  {'all':<52} {1000 * sum(cpu.values()) / REPEATS:8.0f} ms")
    w, f, u = statistics.median([t for t, _ in warm]), statistics.median(flow), statistics.median(ui)
    print(f"goal (w) <= 1.0 s: {'met' if w <= 1.0 else 'NOT met'} ({w:.2f} s)")
    print(f"goal flow <= 3x baseline: {'met' if f <= 3 * b else 'NOT met'} ({f / b:.1f}x)")
    fl, h = statistics.median(floor["bench-floor-report"]), statistics.median(hand)
    print(f"  where the flow's time goes: a plain Prefect flow of its shape {fl:.3f} s ({fl / b:.1f}x) and the work "
          f"done by hand {h:.3f} s ({h / b:.1f}x) are {(fl + h) / b:.1f}x together; runbook adds {f - fl - h:+.3f} s")
    print(f"goal ui -> first task <= 1.0 s: {'met' if u <= 1.0 else 'NOT met'} ({u:.2f} s)")


if __name__ == "__main__":
    main()
