"""data-corruption against the sandbox's real PostgreSQL (and its Podman writers when the sandbox runs them).

The incident: a tenth of the bookings deleted and the payments table dropped. Assessed correctly; a dry run, no
approval, a rejected approval, a timeout and a failure injected mid-restore (a session that will not leave the
database, so the swap cannot happen) all leave the original database in place and the writers running; the
restore through `runbook run --apply --yes` brings the data back, keeps the old database under its dated name
and leaves a safety backup that itself restores; a second run changes nothing.
"""

from __future__ import annotations

import contextvars
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest

from flows.backup import backup
from flows.backup_verification import backup_verification
from flows.data_corruption import data_corruption
from tasks.writers import writers_for
from tests.backup_env import APP_DSN_VAR, DB, ROWS, backup_env, corrupt, create_db, databases, drop_all, row_counts
from tests.prefect_runs import api_headers

pytestmark = pytest.mark.integration
DAMAGED = {"users": ROWS["users"], "bookings": ROWS["bookings"] - ROWS["bookings"] // 10, "payments": None}


@pytest.fixture(scope="module")
def incident(sandbox_state) -> Iterator[dict[str, Any]]:  # noqa: ANN001
    """pafar_bk with a good backup, then corrupted."""
    create_db(sandbox_state)
    with backup_env(sandbox_state) as (env, directory):
        doc = backup(env="bk", dry_run=False)
        assert doc["actions"][0]["changed"], doc["actions"][0]
        corrupt(sandbox_state)
        assert row_counts(sandbox_state) == DAMAGED
        yield {"env": env, "dir": directory}
    drop_all(sandbox_state)


def snapshot(state, directory) -> tuple[Any, ...]:  # noqa: ANN001
    """Everything a run that must change nothing could change: databases, rows, backup files."""
    return (sorted(databases(state)), row_counts(state), sorted(p.name for p in directory.iterdir()))


def writers_running(env) -> bool:  # noqa: ANN001
    ctl = writers_for(env)
    return ctl is None or all(ctl.running().values())


def test_incident_is_assessed_and_dry_run_changes_nothing(incident: dict[str, Any], sandbox_state) -> None:  # noqa: ANN001
    before = snapshot(sandbox_state, incident["dir"])
    doc = data_corruption(env="bk")
    assert snapshot(sandbox_state, incident["dir"]) == before, "the dry run changed something"
    damage = next(f for f in doc["findings"] if "has lost data" in f["title"])
    assert damage["severity"] == "critical"
    problems = [r[0] for r in damage["blocks"][0]["rows"]]
    assert "table public.payments missing" in problems
    assert any(p.startswith("bookings: 27000 rows, 3000 fewer than the backup's 30000") for p in problems)
    assert not any("users" in p for p in problems)
    action = doc["actions"][0]
    assert action["dry_run"] and not action["changed"]
    assert [c["action"] for c in action["planned"]] == ["stop-writers", "safety-backup", "restore",
                                                        "verify-restored", "swap", "start-writers"]
    assert writers_running(incident["env"])


def test_without_a_terminal_or_server_nobody_can_approve(incident: dict[str, Any]) -> None:
    """An in-process run with no local approver and no Prefect API to pause on cannot be approved: nothing changes."""
    from prefect.context import FlowRunContext

    from runbook.engine import approval, decisions

    assert FlowRunContext.get() is None
    view = decisions.PlanView(procedure="data-corruption", env="bk", changes=["restore-from-backup: restore x"])
    decision = approval.ask(view, 5, lambda v: None)
    assert not decision.approved and "nobody can be asked" in decision.reason
    with decisions.local_approver(lambda v: decisions.Decision(approved=True, approver="bob@host", how="test")):
        assert approval.ask(view, 5, lambda v: None).approver == "bob@host"


def _paused_run(api: str, since: datetime, timeout_s: float = 60) -> str:
    """The data-corruption run on env bk that paused after ``since`` (older paused runs are not ours)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=10, headers=api_headers()) as http:
        while time.monotonic() < deadline:
            runs = http.post(f"{api}/flow_runs/filter", json={
                "flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}, "start_time": {"after_": since.isoformat()}},
                "sort": "START_TIME_DESC", "limit": 5,
            }).json()
            for r in runs:
                if r["name"] and r["state"]["name"] == "Paused" and r["parameters"].get("env") == "bk":
                    return r["id"]
            time.sleep(0.3)
    raise AssertionError("the flow run did not pause for approval")


def _form_schema(api: str, run_id: str, timeout_s: float = 20) -> dict[str, Any]:
    """The approval form's JSON schema the run saved for the UI (written just after the pause)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=10, headers=api_headers()) as http:
        while time.monotonic() < deadline:
            keys = http.post(f"{api}/flow_runs/{run_id}/input/filter",
                             json={"prefix": "paused-approval"}).json()
            for k in keys:
                if k["key"].endswith("schema"):
                    return json.loads(k["value"])
            time.sleep(0.2)
    raise AssertionError("the paused run saved no input form")


def _run_in_thread(**kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    ctx = contextvars.copy_context()  # the Prefect settings (API URL) of this test

    def target() -> None:
        out["doc"] = ctx.run(data_corruption, **kwargs)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def test_rejected_approval_in_prefect_changes_nothing(incident: dict[str, Any], sandbox_state) -> None:  # noqa: ANN001
    from prefect.flow_runs import resume_flow_run

    before = snapshot(sandbox_state, incident["dir"])
    since = datetime.now(UTC)
    t, out = _run_in_thread(env="bk", dry_run=False)
    run_id = _paused_run(sandbox_state.prefect_api_url, since)
    schema = _form_schema(sandbox_state.prefect_api_url, run_id)
    assert {"approve", "approver", "reason"} <= set(schema["properties"]) and "approver" in schema["required"]
    with httpx.Client(timeout=10, headers=api_headers(),
                      base_url=f"{sandbox_state.prefect_api_url}/flow_runs/{run_id}/input") as http:
        deadline = time.monotonic() + 20
        while (resp := http.get("/paused-approval-description")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        description, plan = resp.text, http.get("/runbook-plan").text
    shown = {"runbook-plan": plan}
    assert "restore" in description and "swap" in description, "the form shows the plan"
    assert "restore-from-backup: swap" in shown["runbook-plan"], "the plan is stored for `runbook approvals`"
    resume_flow_run(run_id, run_input={"approve": False, "approver": "alice", "reason": "wrong backup"})
    t.join(60)
    assert not t.is_alive()
    action = out["doc"]["actions"][0]
    assert "not applied: wrong backup" in action["skipped_reason"] and not action["changed"]
    assert out["doc"]["outcome"] == "Not applied"
    assert any("approval not given by alice" in line for line in out["doc"]["audit"])
    assert snapshot(sandbox_state, incident["dir"]) == before
    assert writers_running(incident["env"])


def test_approval_timeout_changes_nothing(incident: dict[str, Any], sandbox_state) -> None:  # noqa: ANN001
    before = snapshot(sandbox_state, incident["dir"])
    from prefect import tags

    with tags("approval-timeout-s:1"):  # how a route passes its approval_timeout_s
        doc = data_corruption(env="bk", dry_run=False)
    assert "no approval within 1 s" in doc["actions"][0]["skipped_reason"]
    assert snapshot(sandbox_state, incident["dir"]) == before


def test_failure_mid_restore_leaves_original_in_place(incident: dict[str, Any], sandbox_state) -> None:  # noqa: ANN001
    """A session that stays connected makes the swap impossible: everything before it is undone."""
    app_dsn = sandbox_state.env_vars()["RUNBOOK_SANDBOX_APP_DSN"].rsplit("/", 1)[0] + f"/{DB}"
    assert APP_DSN_VAR
    dbs_before = databases(sandbox_state)
    from runbook.engine.decisions import Decision, local_approver

    with psycopg.connect(app_dsn, autocommit=True, application_name="stubborn-client") as blocker, \
            local_approver(lambda view: Decision(approved=True, approver="tester", how="test")):
        doc = data_corruption(env="bk", dry_run=False, writer_stop_s=1)
        blocker.execute("SELECT 1")
    action = doc["actions"][0]
    assert "stopped at step 'swap'" in action["error"] and "stubborn-client" in action["error"]
    assert f"The original database {DB} is in place" in action["error"]
    assert row_counts(sandbox_state) == DAMAGED, "the original database was touched"
    assert databases(sandbox_state) == dbs_before, "a restore or kept database was left behind"
    stopped = next(f for f in doc["findings"] if "restore stopped at step 'swap'" in f["title"])
    assert [r[0] for r in stopped["blocks"][0]["rows"]] == ["stop-writers", "safety-backup", "restore",
                                                            "verify-restored"]
    assert writers_running(incident["env"]), "writers were not started again"
    assert any(p.name.endswith("-safety.sql.gz") for p in incident["dir"].iterdir())


def test_restore_with_cli_approval_then_second_run_changes_nothing(incident: dict[str, Any],
                                                                   sandbox_state) -> None:  # noqa: ANN001
    env = {**os.environ, "PREFECT_API_URL": sandbox_state.prefect_api_url}
    cmd = [sys.executable, "-m", "runbook.app.cli", "run", "data-corruption", "--env", "bk", "--apply", "--yes",
           "--param", "writer_stop_s=1", "--output", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 4, proc.stderr  # the damage found, restored and verified
    assert "restore-from-backup: restore" in proc.stderr, "--yes prints the plan it approves"
    doc = json.loads(proc.stdout)
    action = doc["actions"][0]
    assert action["changed"] and action["verified"] and not action["error"], action
    import getpass
    import socket

    assert f"approved by {getpass.getuser()}@{socket.gethostname()} (--yes (script))" in doc["notes"]
    assert row_counts(sandbox_state) == ROWS, "the data did not come back"
    kept = [d for d in databases(sandbox_state) if d.startswith(f"{DB}_before_restore_")]
    assert len(kept) == 1 and row_counts(sandbox_state, kept[0]) == DAMAGED, "the old database was not kept"
    assert not [d for d in databases(sandbox_state) if "_restore_" in d and "before" not in d]
    assert writers_running(incident["env"])

    safety = sorted(p.name for p in incident["dir"].iterdir() if p.name.endswith("-safety.sql.gz"))[-1]
    ver = backup_verification(env="bk", backup=safety)
    assert [f["title"] for f in ver["findings"] if f["severity"] == "critical"] == []
    restored = next(f for f in ver["findings"] if f["title"].startswith("test restore into"))
    assert restored["details"]["key_rows"] == DAMAGED, "the safety backup does not hold the pre-restore data"

    before = snapshot(sandbox_state, incident["dir"])
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    doc2 = json.loads(again.stdout)
    assert not doc2["actions"][0]["changed"] and doc2["actions"][0]["planned"] == []
    assert any("nothing to restore" in f["title"] for f in doc2["findings"])
    assert snapshot(sandbox_state, incident["dir"]) == before
