"""The runner's promises, for every procedure that offers a remediation, through the real intake and the CLI.

Parametrised over the catalog (never one example: that is how two alert routes once lost their approval gate):
each procedure x each policy mode (diagnose, dry_run, auto, approve) from an alert through the intake, the
executor and the sandbox's real Prefect server, PostgreSQL and Podman; rejection, timeout and a resolved alert
while waiting; the operator's CLI (dry run, --apply, approval without a terminal, --yes); and a Prefect UI-style
run that tries to claim an approval with a parameter. Each case starts from a real incident the procedure's
remediation fixes, and a snapshot of what that remediation may change tells whether anything changed.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from runbook.app.catalog import PROCEDURES
from runbook.app.remote_run import api_client, deployment
from runbook.engine.config import PROJECT_ROOT, Environment
from runbook.sandbox import SandboxState
from tests.intake_harness import Intake, alert, running_intake
from tests.integration.test_notifications import Receiver
from tests.prefect_runs import api_headers, run_artifacts
from tests.scenarios import db_sessions, project_containers, restored_project

pytestmark = pytest.mark.integration

REMEDIATING = sorted(name for name, spec in PROCEDURES.items() if spec.remediations)
MODES = ["diagnose", "dry_run", "auto", "approve"]
HOOK_VAR = "RUNBOOK_TEST_POLICY_HOOK"


@dataclass
class World:
    state: SandboxState
    sandbox_env: Environment
    bk_env: Environment
    bk_dir: Path
    app_dsn: str
    intake: Intake
    receiver: Receiver
    playbooks: str  # RUNBOOK_PLAYBOOKS for the flows: the platform, the sandbox, bk and this module's routes


@dataclass
class Incident:
    snapshot: Callable[[], Any]
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ one real incident per procedure

PARAMS: dict[str, tuple[str, dict[str, Any]]] = {  # procedure -> (environment, route params)
    "backup": ("bk", {"fresh_within_s": 0}),
    "data-corruption": ("bk", {"writer_stop_s": 1, "amcheck": False}),
    "db-slowness": ("sandbox", {"long_query_s": 1, "idle_in_transaction_s": 1}),
    "high-cpu": ("sandbox", {"service": "backend", "replicas": 2, "sample_interval_s": 0.2}),
    "memory-leak": ("sandbox", {"service": "celery-worker", "samples": 4, "interval_s": 0.6}),
    "service-outage": ("sandbox", {"service": "backend", "notify": False}),
}


@contextmanager
def _db_blocker(w: World) -> Iterator[Incident]:
    from runbook.sandbox.incidents import DbIncident

    inc = DbIncident(w.app_dsn, slow_runs=0, runaway=False).start()
    try:
        time.sleep(1.3)
        yield Incident(db_sessions(w.app_dsn))
    finally:
        inc.stop()


@contextmanager
def _stopped_backend(w: World) -> Iterator[Incident]:
    from runbook.sandbox.incidents import StoppedService

    with restored_project(w.sandbox_env) as url:
        stopped = StoppedService(url, service="backend").start()
        try:
            yield Incident(project_containers(url))
        finally:
            stopped.stop()


@contextmanager
def _one_backend(w: World) -> Iterator[Incident]:
    with restored_project(w.sandbox_env) as url:
        yield Incident(project_containers(url))


@contextmanager
def _growing_worker(w: World) -> Iterator[Incident]:
    from runbook.sandbox.incidents import MemoryGrower

    with restored_project(w.sandbox_env) as url:
        grower = MemoryGrower(url).start()
        try:
            time.sleep(1.0)
            yield Incident(project_containers(url))
        finally:
            grower.stop()


@contextmanager
def _no_fresh_backup(w: World) -> Iterator[Incident]:
    yield Incident(lambda: sorted(p.name for p in w.bk_dir.iterdir()))


@contextmanager
def _corrupted_bk(w: World) -> Iterator[Incident]:
    from runbook.engine.clients import database_name
    from tasks.backup_dump import take_backup
    from tasks.backup_files import backup_name, utc_stamp
    from tasks.backup_store import open_store
    from tests.backup_env import corrupt, create_db, databases, drop_all, row_counts

    drop_all(w.state)
    create_db(w.state)
    with open_store(w.bk_env) as store:
        # backups are named to the second and never overwritten: the previous test's may have this second's name
        taken = {f.name for f in store.list_files()}
        dbname, at = database_name(w.bk_env, "main"), datetime.now(UTC)
        while backup_name(dbname, utc_stamp(at)) in taken:
            at += timedelta(seconds=1)
        take_backup(w.bk_env, "main", store, name=backup_name(dbname, utc_stamp(at)))
    corrupt(w.state)
    yield Incident(lambda: (sorted(databases(w.state)), row_counts(w.state)))


INCIDENTS: dict[str, Callable[[World], AbstractContextManager[Incident]]] = {
    "backup": _no_fresh_backup,
    "data-corruption": _corrupted_bk,
    "db-slowness": _db_blocker,
    "high-cpu": _one_backend,
    "memory-leak": _growing_worker,
    "service-outage": _stopped_backend,
}


def test_every_remediating_procedure_has_an_incident_here() -> None:
    assert set(INCIDENTS) == set(REMEDIATING) == set(PARAMS), "add the new procedure's incident to this suite"


# ------------------------------------------------------------------ the world: bk database, routes, intake


def _routes() -> str:
    routes = []
    for proc in REMEDIATING:
        env, params = PARAMS[proc]
        for mode in [*MODES, "timeout"]:
            routes.append({
                "name": f"pol-{proc}-{mode}".replace("_", "-"), "match": {"alertname": f"Pol-{proc}-{mode}"},
                "procedure": proc, "env": env, "params": params,
                "policy": {"mode": "approve" if mode == "timeout" else mode, "cooldown_s": 0,
                           "approval_timeout_s": 4 if mode == "timeout" else 180,
                           "breaker": {"max_remediations": 1000, "window_s": 1}},
                "notify": [{"kind": "webhook", "url": {"env": HOOK_VAR}}],
            })
    return yaml.safe_dump({"routes": routes}, sort_keys=False)


@pytest.fixture(scope="module")
def world(sandbox_state: SandboxState, sandbox_env: Environment, app_dsn: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from tests.backup_env import backup_env, create_db, drop_all

    receiver = Receiver()
    os.environ[HOOK_VAR] = f"{receiver.url}/hook"
    create_db(sandbox_state)
    try:
        with backup_env(sandbox_state) as (bk_env, bk_dir):
            work = tmp_path_factory.mktemp("policy")
            dirs = [PROJECT_ROOT / "playbooks" / "pafar.yaml", sandbox_state.playbook_dir, bk_env.source.parent,
                    work / "routes"]
            before = os.environ.get("RUNBOOK_PLAYBOOKS")
            os.environ["RUNBOOK_PLAYBOOKS"] = os.pathsep.join(map(str, dirs))  # the flows find routes and bk here
            try:
                with running_intake(sandbox_state, work, routes=_routes(), playbook_dirs=dirs[:3]) as it:
                    yield World(sandbox_state, sandbox_env, bk_env, bk_dir, app_dsn, it, receiver,
                                os.environ["RUNBOOK_PLAYBOOKS"])
            finally:
                os.environ["RUNBOOK_PLAYBOOKS"] = before or ""
                if before is None:
                    os.environ.pop("RUNBOOK_PLAYBOOKS")
    finally:
        drop_all(sandbox_state)
        receiver.server.shutdown()
        os.environ.pop(HOOK_VAR, None)


# ------------------------------------------------------------------ helpers


def _fire(w: World, proc: str, mode: str, status: str = "firing", starts_at: str | None = None,
          fingerprint: str | None = None) -> tuple[str, dict[str, Any]]:
    fp = fingerprint or secrets.token_hex(8)
    payload = alert(f"Pol-{proc}-{mode}", {}, fingerprint=fp, status=status, starts_at=starts_at)
    result = w.intake.post(payload).json()["results"][0]
    return fp, {**result, "payload": payload}


def _run_of(w: World, proc: str, mode: str, fp: str, timeout_s: float = 30) -> dict[str, Any]:
    route = f"pol-{proc}-{mode}".replace("_", "-")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        keys = [r[0] for r in w.intake.app.state.store._db.execute(
            "SELECT key FROM occurrences WHERE route = ? AND fingerprint = ?", (route, fp)).fetchall()]
        runs = [r for k in keys for r in w.intake.runs(f"occurrence:{k}")]
        if runs:
            return runs[0]
        time.sleep(0.1)
    raise AssertionError(f"no run for {route} {fp}")


def _state(w: World, run_id: str) -> dict[str, Any]:
    return httpx.get(f"{w.intake.api_url}/flow_runs/{run_id}", headers=api_headers(), timeout=10).json()["state"]


def _wait(w: World, run_id: str, types: set[str], timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = _state(w, run_id)
        if state["type"] in types:
            return state
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} is {state.get('type')} {state.get('name')}, wanted {types}")


def _report(w: World, run_id: str) -> str:
    arts = run_artifacts(w.intake.api_url, run_id)
    return "\n".join(a["data"] for a in arts if isinstance(a.get("data"), str))


def _hooks(w: World, run_id: str, event: str, timeout_s: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [b for p, b, _ in w.receiver.posts if p == "/hook" and b.get("event") == event
                 and run_id in (b.get("link") or "")]
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {event!r} notification for {run_id}: {w.receiver.posts[-3:]}")


def _cli(w: World, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_API_URL": w.intake.api_url, "RUNBOOK_PLAYBOOKS": w.playbooks}
    return subprocess.run([sys.executable, "-m", "runbook.app.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def _gated(proc: str, mode: str) -> bool:
    """Does this run wait for a person? approve always; any applying run of an approval-required procedure."""
    return mode == "approve" or (mode == "auto" and PROCEDURES[proc].approval == "required")


# ------------------------------------------------------------------ every procedure x every mode, from an alert


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("proc", REMEDIATING)
def test_alert_policy_mode(world: World, proc: str, mode: str) -> None:
    with INCIDENTS[proc](world) as inc:
        before = inc.snapshot()
        fp, result = _fire(world, proc, mode)
        assert result["outcome"] == "run" and result["mode"] == mode, result
        run = _run_of(world, proc, mode, fp)
        if _gated(proc, mode):
            _wait(world, run["id"], {"PAUSED"})
            assert inc.snapshot() == before, "something changed before the approval"
            waiting = _hooks(world, run["id"], "waiting")[0]
            assert "WAITING FOR APPROVAL" in waiting["text"]
            listed = json.loads(_cli(world, "approvals", "--output", "json").stdout)
            mine = next(r for r in listed if r["run_id"] == run["id"])
            assert mine["procedure"] == proc and mine["changes"], "the inbox shows the plan"
            assert all(c.split(":")[0] in {r.name for r in PROCEDURES[proc].remediations} for c in mine["changes"])
            approved = _cli(world, "approve", run["id"], "--yes", "--reason", "policy suite")
            assert approved.returncode == 0, approved.stdout + approved.stderr
            assert mine["changes"][0].split(": ", 1)[1].split(" (")[0] in approved.stdout, "approve shows the plan"
        final = _wait(world, run["id"], {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
        assert final["type"] == "COMPLETED", final
        report = _report(world, run["id"])
        finished = _hooks(world, run["id"], "finished")[0]
        assert finished["fields"]["outcome"] == final["name"]
        if mode == "diagnose":
            assert "diagnose-only policy: remediations not planned" in report
            assert final["name"] in {"Completed", "Needs attention"}
            assert inc.snapshot() == before
        elif mode == "dry_run":
            assert "(dry run)" in report and "would change" in report, report[-2000:]
            assert final["name"] != "Remediated"
            assert inc.snapshot() == before
        else:
            assert final["name"] == "Remediated", report[-3000:]
            assert "changed, verified" in report
            assert inc.snapshot() != before
            if _gated(proc, mode):
                assert "approval granted by" in report and "policy suite" in report


@pytest.mark.parametrize("how", ["reject", "timeout", "resolve"])
@pytest.mark.parametrize("proc", REMEDIATING)
def test_no_approval_changes_nothing(world: World, proc: str, how: str) -> None:
    mode = "timeout" if how == "timeout" else "approve"
    with INCIDENTS[proc](world) as inc:
        before = inc.snapshot()
        fp, fired = _fire(world, proc, mode)
        run = _run_of(world, proc, mode, fp)
        _wait(world, run["id"], {"PAUSED"})
        if how == "reject":
            rejected = _cli(world, "approve", run["id"], "--reject", "--reason", "not now")
            assert rejected.returncode == 0, rejected.stderr
        elif how == "resolve":
            starts = fired["payload"]["alerts"][0]["startsAt"]
            _fire(world, proc, mode, status="resolved", starts_at=starts, fingerprint=fp)
        final = _wait(world, run["id"], {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
        if how == "resolve":
            assert final["type"] == "CANCELLED"
            time.sleep(1.5)
        else:
            assert final["type"] == "COMPLETED" and final["name"] == "Not applied", final
            report = _report(world, run["id"])
            assert ("not applied: not now" if how == "reject" else "no approval within 4 s") in report
        assert inc.snapshot() == before, f"{how}: something changed without an approval"
        answer = _cli(world, "approve", run["id"], "--yes")
        assert answer.returncode == 2 and "not waiting for approval" in answer.stderr
        assert "Traceback" not in answer.stderr


# ------------------------------------------------------------------ the operator's CLI (manual mode)


@pytest.mark.parametrize("proc", REMEDIATING)
def test_cli_dry_run_then_apply(world: World, proc: str) -> None:
    env, params = PARAMS[proc]
    args = [a for k, v in params.items() for a in ("--param", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]
    with INCIDENTS[proc](world) as inc:
        before = inc.snapshot()
        dry = _cli(world, "run", proc, "--env", env, *args, "--output", "json")
        assert dry.returncode in (0, 3), dry.stderr
        doc = json.loads(dry.stdout)
        assert any(a["planned"] for a in doc["actions"]) and not any(a["changed"] for a in doc["actions"])
        assert inc.snapshot() == before
        if PROCEDURES[proc].approval == "required":
            refused = _cli(world, "run", proc, "--env", env, *args, "--apply")
            assert refused.returncode == 2 and "needs approval" in refused.stderr, refused.stderr
            assert inc.snapshot() == before
            applied = _cli(world, "run", proc, "--env", env, *args, "--apply", "--yes", "--output", "json")
        else:
            applied = _cli(world, "run", proc, "--env", env, *args, "--apply", "--output", "json")
        assert applied.returncode == 4, applied.stdout[-2000:] + applied.stderr[-2000:]  # remediated and verified
        doc = json.loads(applied.stdout)
        assert doc["outcome"] == "Remediated"
        assert any(a["applied"] and a["verified"] for a in doc["actions"])
        assert any(line.startswith("policy: mode manual") for line in doc["audit"])
        assert inc.snapshot() != before
        # the report lists the runner's plan and apply steps it ran, as every report lists every step
        steps = {st["name"] for st in doc["steps"] if st["state"] == "Completed"}
        assert {f"plan-{a['name']}" for a in doc["actions"]} <= steps, doc["steps"]
        assert {f"apply-{a['name']}" for a in doc["actions"] if a["applied"]} <= steps, doc["steps"]


# ------------------------------------------------------------------ approval is never a parameter


def test_ui_run_cannot_claim_an_approval_and_pauses_instead(world: World) -> None:
    api = world.intake.api_url
    dep = deployment(api_client(api, timeout_s=10), "data-corruption")
    for claim in ({"approved_by": "mallory"}, {"approve": True}, {"approval": "granted"}):
        resp = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", headers=api_headers(), timeout=10,
                          json={"parameters": {"env": "bk", "dry_run": False, **claim}})
        if resp.status_code < 300:  # accepted by the server: the flow must refuse the unknown parameter
            final = _wait(world, resp.json()["id"], {"COMPLETED", "FAILED", "CRASHED"})
            assert final["type"] == "FAILED", f"a run claiming {claim} was not refused: {final}"
        else:
            assert resp.status_code in (409, 422), resp.text
    with INCIDENTS["data-corruption"](world) as inc:
        before = inc.snapshot()
        resp = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", headers=api_headers(), timeout=10,
                          json={"parameters": {"env": "bk", "dry_run": False, "writer_stop_s": 1}})
        run_id = resp.raise_for_status().json()["id"]
        _wait(world, run_id, {"PAUSED"})  # a UI run of an approval-required procedure waits for a person
        assert inc.snapshot() == before
        assert _cli(world, "approve", run_id, "--reject").returncode == 0
        assert _wait(world, run_id, {"COMPLETED"})["name"] == "Not applied"
        assert inc.snapshot() == before
