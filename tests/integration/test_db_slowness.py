"""db-slowness end to end against the sandbox's real PostgreSQL with an injected incident."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from flows.db_slowness import db_slowness
from runbook.sandbox.incidents import DbIncident
from tests.scenarios import db_sessions

pytestmark = pytest.mark.integration
FAST = {"long_query_s": 1.0, "idle_in_transaction_s": 1.0}


@pytest.fixture
def incident(app_dsn: str, sandbox_state) -> Iterator[DbIncident]:  # noqa: ANN001
    with psycopg.connect(sandbox_state.dsn_admin, autocommit=True) as conn:  # rankings from this test only
        conn.execute("SELECT pg_stat_statements_reset()")
    inc = DbIncident(app_dsn).start()
    time.sleep(1.3)  # let the blocker and the runaway age past the 1 s thresholds
    yield inc
    inc.stop()


def findings(doc: dict, key: str) -> list[dict]:
    return [f for f in doc["findings"] if key in f["title"]]


def test_incident_is_found_and_dry_run_changes_nothing(sandbox_env, app_dsn: str, incident: DbIncident) -> None:  # noqa: ANN001
    snapshot = db_sessions(app_dsn)
    before = snapshot()
    doc = db_slowness(env="sandbox", dry_run=True, **FAST)
    assert snapshot() == before, "the dry run touched a session"
    assert doc["dry_run"] is True

    roots = findings(doc, "root blocker")
    assert [f["subject"] for f in roots] == [f"pid {incident.blocker_pid}"]
    assert roots[0]["severity"] == "critical"
    waiting = roots[0]["blocks"][0]["rows"]
    assert sorted(r[0] for r in waiting) == sorted(incident.waiter_pids)

    slowest = findings(doc, "slowest statement")[0]
    assert "FROM bookings WHERE user_id" in slowest["details"]["query"]

    missing = findings(doc, "with no index")
    assert any(f["subject"] == "table public.bookings" and "(user_id)" in f["details"]["suggested"] for f in missing)

    planned = {a["name"]: [c["subject"] for c in a["planned"]] for a in doc["actions"]}
    assert planned == {
        "cancel-long-queries": [f"pid {incident.runaway_pid}"],
        "terminate-idle-blockers": [f"pid {incident.blocker_pid}"],
    }
    assert not any(a["changed"] for a in doc["actions"])
    assert incident.waiter_results == []


def test_apply_removes_exactly_the_root_blocker_and_repeat_changes_nothing(
    sandbox_env, app_dsn: str, incident: DbIncident  # noqa: ANN001
) -> None:
    doc = db_slowness(env="sandbox", dry_run=False, **FAST)
    acted = {a["name"]: [c["subject"] for c in a["planned"]] for a in doc["actions"] if a["changed"]}
    assert acted == {
        "cancel-long-queries": [f"pid {incident.runaway_pid}"],
        "terminate-idle-blockers": [f"pid {incident.blocker_pid}"],
    }
    assert all(a["verified"] for a in doc["actions"] if a["changed"])
    deadline = time.monotonic() + 10
    while len(incident.waiter_results) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert incident.waiter_results == ["done", "done"], "the waiters did not proceed"
    with psycopg.connect(app_dsn, autocommit=True) as conn:
        alive = conn.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)",
                             ([incident.blocker_pid, *incident.waiter_pids],)).fetchall()
    assert {r[0] for r in alive} == set(incident.waiter_pids), "only the root blocker may be gone"

    again = db_slowness(env="sandbox", dry_run=False, **FAST)
    assert not any(a["changed"] or a["planned"] for a in again["actions"])


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_unreachable_database_is_a_critical_finding(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dead_port: int, silent_port: int,
    sandbox_state,  # noqa: ANN001
) -> None:
    port = dead_port if kind == "refused" else silent_port
    (tmp_path / "dead.yaml").write_text(
        "environments:\n  dead:\n    databases:\n      main:\n"
        "        dsn: {env: DEAD_DSN}\n        connect_timeout_s: 2\n"
    )
    monkeypatch.setenv("RUNBOOK_PLAYBOOKS", str(tmp_path))
    monkeypatch.setenv("DEAD_DSN", f"postgresql://runbook:Dead-Secret-42@127.0.0.1:{port}/pafar")
    started = time.monotonic()
    doc = db_slowness(env="dead", dry_run=True)
    elapsed = time.monotonic() - started
    crit = [f for f in doc["findings"] if f["severity"] == "critical"]
    assert len(crit) == 1 and crit[0]["title"].startswith("database dead/main unreachable")
    assert ("refused" if kind == "refused" else "timeout") in crit[0]["details"]["reason"]
    assert "Dead-Secret-42" not in str(doc)
    assert elapsed < 2 + 15, "the connect timeout did not bound the wait"
