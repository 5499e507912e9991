"""Waiting costs nothing (issue 11): runs waiting for approval hold no executor thread.

An executor with 2 threads gets 4 runs that each stop for approval (suspended), then a run that needs none: it
completes while the 4 still wait. Then the waiting runs are answered: rejected ones apply nothing, the approved one
applies exactly the change it showed, once, though it ran its diagnosis twice.
"""

from __future__ import annotations

import time

import pytest
from prefect.settings import temporary_settings

from runbook.app.executor import Executor
from runbook.app.remote_run import TERMINAL, api_client, read_report, resume
from runbook.app.serve import register_deployments
from runbook.sandbox import SandboxState
from runbook.sandbox.incidents import DbIncident
from tests.prefect_runs import api_settings, create_run, run_state, wait_for
from tests.scenarios import query_active

pytestmark = pytest.mark.integration

APPLY = {"env": "sandbox", "dry_run": False, "long_query_s": 1, "idle_in_transaction_s": 3600}








def test_runs_waiting_for_approval_hold_no_thread(sandbox_state: SandboxState, app_dsn: str) -> None:
    api = sandbox_state.prefect_api_url
    assert api
    register_deployments(api)
    inc = DbIncident(app_dsn, waiters=0, slow_runs=0, runaway=True).start()  # one runaway query to cancel
    ex = Executor(max_runs=2, poll_s=1.0)
    with temporary_settings(updates=api_settings(api)):
        ex.start()
    try:
        with api_client(api, timeout_s=10) as http:
            time.sleep(1.5)  # the runaway query is older than long_query_s
            waiting = [create_run(http, "db-slowness", APPLY, ["mode:approve"]) for _ in range(4)]
            wait_for(lambda: all(run_state(http, r)["name"] == "Suspended" for r in waiting), 180,
                  "4 runs suspended for approval on 2 threads")
            quick = create_run(http, "network-checks", {"env": "sandbox"}, ["cli"])
            wait_for(lambda: run_state(http, quick)["type"] in TERMINAL, 120, "a run that needs no approval")
            assert run_state(http, quick)["type"] == "COMPLETED"
            assert all(run_state(http, r)["name"] == "Suspended" for r in waiting), "they still wait, costing nothing"
            assert query_active(app_dsn, inc.runaway_pid), "nothing was applied while they waited"

            for run_id in waiting[1:]:
                resume(http, run_id, approve=False, approver="test", reason="not now")
            resume(http, waiting[0], approve=True, approver="test", reason="go")
            wait_for(lambda: all(run_state(http, r)["type"] in TERMINAL for r in waiting), 180, "answered runs finish")

            approved = read_report(http, waiting[0])
            assert approved is not None and approved["outcome"] == "Remediated", approved
            cancel = next(a for a in approved["actions"] if a["name"] == "cancel-long-queries")
            assert [c["key"] for c in cancel["applied"]] == [c["key"] for c in cancel["planned"]] != []
            assert not query_active(app_dsn, inc.runaway_pid), "the approved change was made"
            for run_id in waiting[1:]:
                report = read_report(http, run_id)
                assert report is not None and report["outcome"] == "Not applied", report
                assert all(not a["applied"] for a in report["actions"]), "a rejected run changed something"
            history = http.get("/flow_run_states/", params={"flow_run_id": waiting[0]}).json()
            assert sum(1 for s in history if s["name"] == "Resuming") == 1, "it started again after approval"
    finally:
        ex.stop(grace_s=0)
        inc.stop()
