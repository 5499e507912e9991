"""A resolve that arrives while the dispatcher is creating the occurrence's run (status 'dispatching', no run id
yet): the run it then creates must be cancelled, never started, and /metrics counts one cancel (issue 11).

Against the sandbox's real Prefect server, with the state in SQLite and in the sandbox's PostgreSQL. The
interleaving is forced, not hoped for: the dispatcher's test seam (``after_create``, called once the run exists and
before it is recorded) holds it while the test posts the resolve. The executor takes only what the intake hands it
(no event stream; its poll runs once at start, the next an hour later), so a run handed over would run.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import httpx
import pytest

from runbook.app.intake.store import Occurrence
from runbook.engine.statuspage import RESOLVED_KEY
from runbook.sandbox import SandboxState
from tests import intake_harness as harness
from tests.intake_harness import alert, running_intake, state_database
from tests.prefect_runs import api_headers, run_history, wait_for

pytestmark = pytest.mark.integration

ROUTES = harness.routes_yaml(harness.db_route("resolve-race", {"alertname": "ResolveRace"}, mode="diagnose"))
FINAL = {"CANCELLED", "COMPLETED", "FAILED", "CRASHED"}


@pytest.fixture(params=["sqlite", "postgres"])
def state_dsn(request: pytest.FixtureRequest, sandbox_state: SandboxState) -> Iterator[str | None]:
    with state_database(sandbox_state) if request.param == "postgres" else nullcontext(None) as dsn:
        yield dsn


def test_a_resolve_while_the_run_is_being_created_cancels_that_run(sandbox_state: SandboxState,
                                                                   state_dsn: str | None, tmp_path: Path) -> None:
    with running_intake(sandbox_state, tmp_path, routes=ROUTES, state_dsn=state_dsn, executor_events=False,
                        executor_poll_s=3600) as it:
        wait_for(lambda: it.executor.polls >= 1, 60, "the executor's first poll")  # the next is an hour away
        created, release = threading.Event(), threading.Event()
        held: list[tuple[Occurrence, str]] = []

        def hold(occ: Occurrence, run_id: str) -> None:
            held.append((occ, run_id))
            created.set()
            release.wait(60)  # a hang bound only: the test releases it as soon as the resolve is answered

        it.app.state.dispatcher.after_create = hold
        firing = alert("ResolveRace", {"db": "main"})
        fingerprint, starts_at = firing["alerts"][0]["fingerprint"], firing["alerts"][0]["startsAt"]
        resolve = alert("ResolveRace", {"db": "main"}, fingerprint=fingerprint, status="resolved",
                        starts_at=starts_at)
        try:
            assert it.post(firing).json()["results"][0]["outcome"] == "run"
            assert created.wait(60), "the dispatcher never created the run"
            (occ,) = it.app.state.store.find(fingerprint)
            assert (occ.status, occ.flow_run_id) == ("dispatching", None), "not inside the creation window"
            result = it.post(resolve).json()["results"][0]
            assert result["outcome"] == "resolved"
            assert result["detail"] == "run being created: will be cancelled", result
        finally:
            release.set()
        ((_, run_id),) = held
        assert it.wait_state(run_id, FINAL, timeout_s=120) == "CANCELLED"
        with httpx.Client(base_url=it.api_url, headers=api_headers(), timeout=10) as http:
            history = run_history(http, run_id)
        assert [s["type"] for s in history] == ["SCHEDULED", "CANCELLED"], history
        tasks = httpx.post(f"{it.api_url}/task_runs/filter", headers=api_headers(), timeout=10,
                           json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
        assert tasks == [], "the cancelled run ran"
        (occ,) = it.app.state.store.find(fingerprint)
        assert (occ.status, occ.flow_run_id) == ("created", run_id) and occ.resolved_at is not None

        # counted once: by the dispatcher's cancel, not by the resolve that found no run, nor by a resent resolve
        wait_for(lambda: it.metric("runbook_intake_runs_cancelled_total") == 1, 30, "the cancel to be counted")
        again = it.post(resolve).json()["results"][0]
        assert again["detail"] == f"run {run_id} is cancelled: left to finish", again
        assert it.metric("runbook_intake_runs_cancelled_total") == 1
        # and the resolve is recorded with the run, as any resolve is (status page, post-incident review)
        wait_for(lambda: httpx.get(f"{it.api_url}/flow_runs/{run_id}/input/{RESOLVED_KEY}", headers=api_headers(),
                                   timeout=10).status_code == 200, 60, "the resolve recorded with the run")
