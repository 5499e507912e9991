"""The dispatcher yields to acknowledgements: while webhooks are arriving it claims a few occurrences at a time
and creates their runs one by one (on one machine the Prefect server's CPU for eight creations at once starved
the webhooks' threads); once they stop it claims and creates as wide as before. Against the sandbox's Prefect
server; the interleaving is held by the dispatcher's test seam, nothing here waits on a duration."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest

from runbook.app.intake.app import Intake
from runbook.app.intake.dispatch import Dispatcher
from runbook.app.intake.models import parse_webhook
from runbook.app.intake.store import Occurrence, SqliteStore
from runbook.engine.config import PROJECT_ROOT, load_playbooks
from runbook.sandbox import SandboxState
from tests import intake_harness as harness
from tests.intake_harness import alert
from tests.prefect_runs import api_headers

pytestmark = pytest.mark.integration

ROUTES = harness.routes_yaml(harness.db_route("pacing", {"alertname": "Pacing"}, mode="diagnose"))


def test_while_webhooks_arrive_runs_are_created_one_at_a_time(sandbox_state: SandboxState, tmp_path: Path) -> None:
    from runbook.app.serve import register_deployments

    api = sandbox_state.prefect_api_url
    assert api
    register_deployments(api)
    (tmp_path / "routes").mkdir()
    (tmp_path / "routes" / "routes.yaml").write_text(ROUTES)
    playbooks = load_playbooks([PROJECT_ROOT / "playbooks" / "pafar.yaml", sandbox_state.playbook_dir,
                                tmp_path / "routes"])
    store = SqliteStore(tmp_path / "intake.sqlite")
    intake = Intake("t" * 24, playbooks, store, Dispatcher(store, api))
    for i in range(20):
        doc = alert("Pacing", {"db": "main"}, fingerprint=f"9ac{i:03d}")
        results, _, _ = intake._route_and_store(parse_webhook(doc))
        assert results[0]["outcome"] == "run"
    dispatcher = intake.dispatcher
    dispatcher.acknowledging = lambda: True  # as while a sender posts batch after batch
    first, release = threading.Event(), threading.Event()
    created: list[str] = []

    def hold(occ: Occurrence, run_id: str) -> None:
        created.append(run_id)
        if len(created) == 1:
            first.set()
            release.wait(60)  # a hang bound only

    dispatcher.after_create = hold

    async def dispatch() -> tuple[int, int]:
        await dispatcher.start()
        try:
            assert await asyncio.to_thread(first.wait, 60), "no run was created"
            claimed = sum(o.status == "dispatching" for o in store.pending())
            alongside = len(created)  # created while the first is held
            dispatcher.acknowledging = lambda: False  # the webhooks stopped
            release.set()
            deadline = asyncio.get_running_loop().time() + 120
            while store.pending() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
            return claimed, alongside
        finally:
            release.set()
            await dispatcher.stop()

    try:
        claimed, alongside = asyncio.run(dispatch())
        assert claimed == dispatcher.concurrency, "while webhooks arrive, a claim takes a few, not all 20"
        assert alongside == 1, "while webhooks arrive, runs are created one at a time"
        assert store.pending() == [] and len(created) == len(set(created)) == 20
    finally:
        with httpx.Client(base_url=api, timeout=10, headers=api_headers()) as http:
            for run_id in created:  # no executor ran them: leave the server tidy
                http.delete(f"/flow_runs/{run_id}")
        store.close()
