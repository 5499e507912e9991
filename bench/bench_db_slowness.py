"""Benchmark: `runbook run db-slowness --env sandbox` against psql running the same diagnostic SQL.

Measured in one run, on the sandbox's real PostgreSQL and Prefect server:
  baseline  psql -f with the flow's diagnostic statements, one after another, in one session
  (a)       the CLI with an embedded (ephemeral) Prefect API
  (b)       the CLI against the already running sandbox Prefect server
  flow      the flow called in a warm process against that server (the flow's own time)
Prints medians, ratios against the baseline and peak RSS. Goals (issue 2): (b) within 5 s; flow <= 1.5x baseline.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runbook import sandbox  # noqa: E402
from runbook.sandbox.incidents import DbIncident  # noqa: E402

REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))

# The statements db-slowness runs (tasks/postgres.py), in order, for psql.
BASELINE_SQL = """
SELECT current_database(), (SELECT numbackends FROM pg_stat_database WHERE datname = current_database()),
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),
       current_setting('max_connections')::int, current_setting('superuser_reserved_connections')::int,
       current_setting('server_version');
SELECT a.pid, a.usename, a.state, a.wait_event_type, pg_blocking_pids(a.pid), left(a.query, 2000)
  FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid
 WHERE a.datname = current_database() AND a.backend_type = 'client backend' AND a.pid <> pg_backend_pid();
SELECT s.queryid, s.query, s.calls, s.mean_exec_time, s.total_exec_time FROM pg_stat_statements s
  JOIN pg_database d ON d.oid = s.dbid AND d.datname = current_database()
 ORDER BY s.mean_exec_time DESC LIMIT 10;
BEGIN READ ONLY;
SET LOCAL plan_cache_mode = force_generic_plan;
PREPARE q AS SELECT * FROM bookings WHERE user_id = $1;
EXPLAIN (FORMAT JSON) EXECUTE q(NULL);
ROLLBACK;
DEALLOCATE ALL;
SELECT relname FROM pg_stat_user_tables WHERE seq_scan > 0 ORDER BY seq_tup_read DESC LIMIT 5;
SELECT schemaname, relname, seq_scan, seq_tup_read, idx_scan, n_live_tup FROM pg_stat_user_tables
 WHERE relname = 'bookings';
SELECT attname, n_distinct, correlation FROM pg_stats WHERE tablename = 'bookings' AND attname = 'user_id';
SELECT a.attname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0] WHERE c.relname = 'bookings';
SELECT a.pid FROM pg_stat_activity a WHERE a.state = 'active' AND now() - a.query_start > interval '300 s';
SELECT a.pid FROM pg_stat_activity a WHERE a.state = 'idle in transaction' AND cardinality(pg_blocking_pids(a.pid)) = 0;
"""


def timed(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def main() -> None:
    print("starting sandbox (postgres, prefect)...", flush=True)
    was_running = set(sandbox.status().running())
    state = sandbox.up(["postgres", "prefect"])
    os.environ.update(state.engine_env())  # point the engine at the sandbox explicitly
    secrets = state.env_vars()
    incident = DbIncident(secrets["RUNBOOK_SANDBOX_APP_DSN"], runaway=False).start()  # something to find
    base_env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    base_env.pop("PREFECT_API_URL", None)
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as fh:
            fh.write(BASELINE_SQL)
        psql = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-o", "/dev/null", "-f", fh.name,
                secrets["RUNBOOK_SANDBOX_DB_DSN"]]
        baseline = [timed(psql, base_env) for _ in range(REPEATS)]

        cli = [sys.executable, "-m", "runbook.app.cli", "run", "db-slowness", "--env", "sandbox", "--output", "json",
               "--in-process"]  # this benchmark measures the flow in the CLI process; bench_operator the warm path
        embedded = [timed(cli, base_env) for _ in range(REPEATS)]
        served_env = {**base_env, "PREFECT_API_URL": state.prefect_api_url}
        served = [timed(cli, served_env) for _ in range(REPEATS)]
        child_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

        from prefect.settings import temporary_settings

        from flows.db_slowness import db_slowness
        from runbook.engine.procedure import attended_run, flush_run_records

        with temporary_settings(updates=state.prefect_env()), attended_run():
            db_slowness(env="sandbox")  # warm-up: imports, client, first connection
            flow_times, body_times = [], []
            for _ in range(REPEATS):
                started = time.perf_counter()
                doc = db_slowness(env="sandbox")
                flow_times.append(time.perf_counter() - started)
                body = datetime.fromisoformat(doc["finished"]) - datetime.fromisoformat(doc["started"])
                body_times.append(body.total_seconds())
            flush_run_records()
        self_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        incident.stop()
        if not was_running:
            sandbox.down()

    b = median(baseline)
    rows = [
        ("baseline: psql -f, same diagnostic SQL", median(baseline)),
        ("(a) runbook run, embedded Prefect API", median(embedded)),
        ("(b) runbook run, running Prefect server", median(served)),
        ("flow's own time (warm process, server)", median(flow_times)),
        ("  of which the flow body (tasks + report)", median(body_times)),
    ]
    print(f"\nmedian of {REPEATS} runs each")
    for label, value in rows:
        print(f"  {label:<44} {value:8.3f} s   {value / b:7.1f}x baseline")
    print(f"  peak RSS: CLI processes {child_rss_mb:.0f} MB, warm flow process {self_rss_mb:.0f} MB")
    print(f"goal (b) <= 5 s: {'met' if median(served) <= 5 else 'NOT met'} ({median(served):.2f} s)")
    print(f"goal flow <= 1.5x baseline: {'met' if median(flow_times) <= 1.5 * b else 'NOT met'} "
          f"({median(flow_times) / b:.1f}x)")


if __name__ == "__main__":
    main()
