"""`runbook demo`: the main job end to end on the local sandbox, with nothing to set up by hand."""

from __future__ import annotations

import time

from rich.console import Console

from runbook import sandbox
from runbook.findings import render_terminal, report_from_json
from runbook.procedure import attended_run, flush_run_records
from runbook.sandbox.incidents import DbIncident

DEMO_THRESHOLDS = {"long_query_s": 2.0, "idle_in_transaction_s": 2.0}


def run_demo(console: Console, keep: bool = False) -> int:
    """Returns the exit code: 0 when every step did what it should."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.db_slowness import db_slowness

    console.rule("[bold]1. sandbox up[/] (PostgreSQL, Redis, Prefect server on loopback)")
    state = sandbox.up()
    console.print(f"Prefect UI: {state.prefect_api_url.removesuffix('/api')}")
    incident = DbIncident(app_dsn=state.env_vars()["RUNBOOK_SANDBOX_APP_DSN"])
    ok = True
    try:
        with temporary_settings(updates={PREFECT_API_URL: state.prefect_api_url}), attended_run():
            console.rule("[bold]2. incident[/]: an idle transaction blocks two writers, a runaway report, "
                         "a slow filter")
            incident.start()
            console.print(f"root blocker pid {incident.blocker_pid}, waiters {incident.waiter_pids}, "
                          f"runaway pid {incident.runaway_pid}; waiting {DEMO_THRESHOLDS['long_query_s']:g} s to age")
            time.sleep(DEMO_THRESHOLDS["long_query_s"] + 0.5)

            console.rule("[bold]3. db-slowness, dry run[/] (the default: nothing is changed)")
            dry = report_from_json(db_slowness(env="sandbox", dry_run=True, **DEMO_THRESHOLDS))
            render_terminal(dry, console)
            planned = {c.subject for a in dry.actions for c in a.planned}

            console.rule("[bold]4. db-slowness --apply[/]")
            applied = report_from_json(db_slowness(env="sandbox", dry_run=False, **DEMO_THRESHOLDS))
            render_terminal(applied, console)
            done = {c.subject for a in applied.actions if a.changed for c in a.planned}
            verified = all(a.verified for a in applied.actions if a.changed)

            console.rule("[bold]5. db-slowness --apply again[/] (idempotent: nothing left to change)")
            again = report_from_json(db_slowness(env="sandbox", dry_run=False, **DEMO_THRESHOLDS))
            render_terminal(again, console)
            repeat_changed = any(a.changed for a in again.actions)
            flush_run_records()

        ok = bool(planned) and planned == done and verified and not repeat_changed
        console.rule("[bold]summary[/]")
        console.print(f"dry run planned: {sorted(planned)}\napply changed:   {sorted(done)} (verified: {verified})\n"
                      f"second apply changed anything: {repeat_changed}\n"
                      f"waiters finished: {incident.waiter_results}")
        console.print("[bold green]demo OK[/]" if ok else "[bold red]demo did not go as expected[/]")
    finally:
        incident.stop()
        if keep:
            console.print("sandbox left running (`runbook sandbox down` stops it)")
        else:
            sandbox.down()
            console.print("sandbox stopped")
    return 0 if ok else 1
