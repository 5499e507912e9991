"""`runbook demo`: the main job end to end on the local sandbox, with nothing to set up by hand."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import redis
from prefect.settings import temporary_settings
from rich.console import Console

from flows.backup import backup
from flows.backup_verification import backup_verification
from flows.cache_api import cache_api
from flows.data_corruption import data_corruption
from flows.db_slowness import db_slowness
from flows.high_cpu import high_cpu
from flows.log_analysis import log_analysis
from flows.memory_leak import memory_leak
from flows.network_checks import network_checks
from flows.service_outage import service_outage
from runbook import sandbox
from runbook.engine.config import load_playbooks
from runbook.engine.decisions import Decision, local_approver, operator_identity
from runbook.engine.findings import Report, render_terminal, report_from_json
from runbook.engine.prefect_env import AUTH_FILE
from runbook.engine.procedure import attended_run, flush_run_records
from runbook.sandbox.incidents import (
    CpuBurner,
    DbIncident,
    MemoryGrower,
    StoppedService,
    docker_client,
    remove_containers_except,
    scalar,
)
from runbook.sandbox.opensearch import EXPECTED, seed_logs
from runbook.sandbox.podman import project_filter, socket_url
from tasks.logs import RUNBOOK_QUERIES

DEMO_THRESHOLDS = {"long_query_s": 2.0, "idle_in_transaction_s": 2.0}


def run_report(procedure: Callable[..., Any], **params: Any) -> Report:
    """Run a procedure (a Prefect flow run) and read the JSON document it returns back as a Report."""
    return report_from_json(procedure(**params))


def run_demo(console: Console, keep: bool = False) -> int:
    """Returns the exit code: 0 when every step did what it should."""
    console.rule("[bold]1. sandbox up[/] (PostgreSQL, Redis, Prefect server on loopback)")
    was_running = bool(sandbox.status().running())  # a sandbox someone already uses is left as it was found
    state = sandbox.up()
    os.environ.update(state.engine_env())  # point the engine at the sandbox explicitly
    api_url = state.prefect_api_url
    if api_url is None:  # up() starts every service; a Prefect server that is not there is a sandbox failure
        raise sandbox.SandboxError("the sandbox has no Prefect server")
    console.print(f"Prefect UI: {api_url.removesuffix('/api')} (sign in with the auth string in "
                  f"{state.state_dir / AUTH_FILE})", markup=False)
    incident = DbIncident(app_dsn=state.env_vars()["RUNBOOK_SANDBOX_APP_DSN"])
    ok = True
    try:
        with temporary_settings(updates=state.prefect_env()), attended_run():
            console.rule("[bold]2. incident[/]: an idle transaction blocks two writers, a runaway report, "
                         "a slow filter")
            incident.start()
            console.print(f"root blocker pid {incident.blocker_pid}, waiters {incident.waiter_pids}, "
                          f"runaway pid {incident.runaway_pid}; waiting {DEMO_THRESHOLDS['long_query_s']:g} s to age")
            time.sleep(DEMO_THRESHOLDS["long_query_s"] + 0.5)

            console.rule("[bold]3. db-slowness, dry run[/] (the default: nothing is changed)")
            dry = run_report(db_slowness, env="sandbox", dry_run=True, **DEMO_THRESHOLDS)
            render_terminal(dry, console)
            planned = {c.subject for a in dry.actions for c in a.planned}

            console.rule("[bold]4. db-slowness --apply[/]")
            applied = run_report(db_slowness, env="sandbox", dry_run=False, **DEMO_THRESHOLDS)
            render_terminal(applied, console)
            done = {c.subject for a in applied.actions if a.changed for c in a.planned}
            verified = all(a.verified for a in applied.actions if a.changed)

            console.rule("[bold]5. db-slowness --apply again[/] (idempotent: nothing left to change)")
            again = run_report(db_slowness, env="sandbox", dry_run=False, **DEMO_THRESHOLDS)
            render_terminal(again, console)
            repeat_changed = any(a.changed for a in again.actions)
            network_logs_ok = demo_network_logs(console, state)
            network_logs_ok = demo_containers(console, state) and network_logs_ok
            incident.stop()  # its sessions would keep pafar busy: the restore's swap needs the database to itself
            network_logs_ok = demo_backups(console, state) and network_logs_ok
            flush_run_records()

        ok = bool(planned) and planned == done and verified and not repeat_changed and network_logs_ok
        console.rule("[bold]summary[/]")
        console.print(f"dry run planned: {sorted(planned)}\napply changed:   {sorted(done)} (verified: {verified})\n"
                      f"second apply changed anything: {repeat_changed}\n"
                      f"waiters finished: {incident.waiter_results}")
        console.print("[bold green]demo OK[/]" if ok else "[bold red]demo did not go as expected[/]")
    finally:
        incident.stop()
        if was_running:
            console.print(f"sandbox left running as it was found (Prefect UI: {api_url.removesuffix('/api')})")
        elif keep:
            console.print(f"sandbox left running (Prefect UI: {api_url.removesuffix('/api')}; "
                          "`runbook sandbox down` stops it)")
        else:
            sandbox.down()
            console.print("sandbox stopped")
    return 0 if ok else 1


def demo_network_logs(console: Console, state: sandbox.SandboxState) -> bool:
    """Issue 4's part: network-checks, cache-api and log-analysis on the sandbox (all diagnose-only)."""


    env = load_playbooks([state.playbook_dir]).environment("sandbox")
    console.rule("[bold]network-checks[/]: TCP matrix, HTTPS payment stand-in with TLS days, DNS")
    net = run_report(network_checks, env="sandbox")
    render_terminal(net, console)
    slow_found = any(f.title.startswith("slow endpoint") and "api-slow" in f.title for f in net.findings)
    failed = [f.title for f in net.findings if f.severity.value == "critical"]

    console.rule("[bold]cache-api[/]: 8 cache lookups (6 hits, 2 misses) and 12 failing API calls first")
    cache = redis.Redis.from_url(state.redis_url or "", socket_timeout=3)
    try:
        cache.config_resetstat()
        cache.set("runbook-demo:k", "v")
        for key in ["runbook-demo:k"] * 6 + ["runbook-demo:nope"] * 2:
            cache.get(key)
    finally:
        cache.delete("runbook-demo:k")
        cache.close()
    base = env.http_checks["api-health"].url.removesuffix("/api/health")
    with httpx.Client(base_url=base, timeout=5, trust_env=False) as http:
        for _ in range(12):  # 12 in the 1 min window: 0.2/s, over the runbook's 0.1/s HighErrorRate
            http.get("/api/error")
    time.sleep(2.5)  # two Prometheus scrapes (1 s interval)
    api = run_report(cache_api, env="sandbox", window="1m")
    render_terminal(api, console)
    ratio = next((f.details.get("hit_ratio") for f in api.findings if "hit ratio" in f.title), None)
    high_errors = any(f.title.startswith("HighErrorRate") for f in api.findings)

    console.rule("[bold]log-analysis[/]: the runbook's four Kibana queries on freshly seeded Pafar logs")
    if env.elasticsearch:
        seed_logs(env.elasticsearch.url)
    logs = run_report(log_analysis, env="sandbox")
    render_terminal(logs, console)
    titles = {q.title: name for name, q in RUNBOOK_QUERIES.items()}
    counts = {titles[f.title.split(":")[0]]: f.details.get("count") for f in logs.findings
              if f.title.split(":")[0] in titles}
    expected = {k: len(v) for k, v in EXPECTED.items()}

    ok = slow_found and not failed and ratio == 0.75 and high_errors and counts == expected
    console.print(f"network: slow endpoint named {slow_found}, failed checks {failed or 'none'}; "
                  f"cache hit ratio {ratio} (expected 0.75); HighErrorRate seen {high_errors}; "
                  f"log counts {counts} (expected {expected})")
    return ok


def demo_containers(console: Console, state: sandbox.SandboxState) -> bool:
    """Issue 3's part: high-cpu, memory-leak and service-outage on the sandbox's Podman project, each dry run first,
    then applied, then applied again (no change). The project is put back as it was afterwards."""
    url = socket_url(state.services["podman"])
    with docker_client(url) as client:
        keep = {c.id for c in client.containers.list(all=True, filters=project_filter())}
    results: dict[str, bool] = {}

    def three_runs(title: str, run: Callable[..., Any], **params: Any) -> tuple[Report, Report, Report]:
        console.rule(f"[bold]{title}, dry run[/]")
        dry = run_report(run, env="sandbox", dry_run=True, **params)
        render_terminal(dry, console)
        console.rule(f"[bold]{title} --apply[/]")
        real = run_report(run, env="sandbox", dry_run=False, **params)
        render_terminal(real, console)
        again = run_report(run, env="sandbox", dry_run=False, **params)
        console.print(f"{title} --apply again: changed anything: {any(a.changed for a in again.actions)}")
        return dry, real, again

    def converged(dry: Any, real: Any, again: Any) -> bool:
        planned = [(c.action, c.subject) for a in dry.actions for c in a.planned]
        done = [(c.action, c.subject) for a in real.actions if a.changed for c in a.planned]
        return bool(planned) and planned == done and all(a.verified for a in real.actions if a.changed) and \
            not any(a.changed or a.planned for a in again.actions)

    try:
        console.rule("[bold]high-cpu[/]: a backend replica spins one core and logs ERROR lines")
        burner = CpuBurner(url).start()
        runs = three_runs("high-cpu", high_cpu, service="backend", sample_interval_s=1.0)
        results["high-cpu"] = converged(*runs) and runs[0].findings[0].subject == f"container {burner.name}"
        burner.stop()

        console.rule("[bold]memory-leak[/]: a celery-worker replica grows ~2 MiB/s")
        grower = MemoryGrower(url).start()
        time.sleep(1)
        since = datetime.now(UTC)  # when the alert began: each leaker is restarted at most once for it
        runs = three_runs("memory-leak", memory_leak, samples=4, interval_s=0.6, since=since)
        results["memory-leak"] = converged(*runs)
        grower.stop()

        console.rule("[bold]service-outage[/]: the backend container is stopped")
        StoppedService(url, service="backend").start()
        runs = three_runs("service-outage", service_outage, service="backend")
        results["service-outage"] = converged(*runs)
    finally:
        remove_containers_except(url, keep)
        with docker_client(url) as client:
            for c in client.containers.list(all=True, filters=project_filter()):
                if c.status != "running":
                    c.start()
    console.print("containers: " + ", ".join(f"{k} {'OK' if v else 'NOT as expected'}" for k, v in results.items()))
    return all(results.values()) and len(results) == 3


def demo_backups(console: Console, state: sandbox.SandboxState) -> bool:
    """Issue 5's part: a backup, its verification (test restore, RTO/RPO), then a data-corruption incident on pafar
    (rows deleted, a table dropped): assessed in a dry run, restored with the operator's approval (what
    `runbook run data-corruption --apply --yes` does), and a second run that changes nothing."""
    def show(procedure: Callable[..., Any], **params: Any) -> Report:
        report = run_report(procedure, **params)
        render_terminal(report, console)
        return report

    console.rule("[bold]backup --apply[/]: pg_dump | gzip, streamed, checksum + manifest, renamed when complete")
    taken = show(backup, env="sandbox", dry_run=False, fresh_within_s=0)
    console.rule("[bold]backup-verification --apply[/]: age vs RPO, gzip, checksum, log, test restore (RTO)")
    verified = show(backup_verification, env="sandbox", dry_run=False)
    passed = any("passed verification" in f.title for f in verified.findings)

    console.rule("[bold]incident[/]: a tenth of the bookings deleted and the payments table dropped")
    with psycopg.connect(state.env_vars()["RUNBOOK_SANDBOX_APP_DSN"], autocommit=True, connect_timeout=5) as conn:
        before = scalar(conn, "SELECT count(*) FROM bookings")
        conn.execute("DELETE FROM bookings WHERE id % 10 = 0")
        conn.execute("DROP TABLE payments")
    console.rule("[bold]data-corruption, dry run[/]: assess against the newest good backup, plan")
    dry = show(data_corruption, env="sandbox", dry_run=True)
    console.rule(f"[bold]data-corruption --apply --yes[/] (the plan approved as {operator_identity()})")
    with local_approver(lambda view: Decision(approved=True, approver=operator_identity(), how="demo (--yes)")):
        applied = show(data_corruption, env="sandbox", dry_run=False, writer_stop_s=2)
        console.rule("[bold]data-corruption --apply --yes again[/] (nothing left to restore)")
        again = show(data_corruption, env="sandbox", dry_run=False, writer_stop_s=2)
    with psycopg.connect(state.env_vars()["RUNBOOK_SANDBOX_APP_DSN"], autocommit=True, connect_timeout=5) as conn:
        after = scalar(conn, "SELECT count(*) FROM bookings")
        payments = scalar(conn, "SELECT to_regclass('public.payments') IS NOT NULL")
    restored = any(a.changed and a.verified for a in applied.actions)
    ok = (any(a.changed for a in taken.actions) and passed and any(a.planned for a in dry.actions)
          and restored and not any(a.changed for a in again.actions) and after == before and payments)
    console.print(f"backup verified: {passed}; restore applied and verified: {restored}; bookings {before} -> "
                  f"{after} after the restore, payments back: {payments}; second run changed anything: "
                  f"{any(a.changed for a in again.actions)}")
    return ok
