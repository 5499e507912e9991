"""Several intake replicas sharing one state (issue 11): dedup, the breaker's count, cooldowns and dispatch claims
hold across them, and a store that cannot be used stops the intake instead of being replaced.

The PostgreSQL store runs against a database of its own on the sandbox's real PostgreSQL (created and dropped
here). Replica-level tests are parametrised over both backends: two SQLite stores on one file are two processes
sharing it, and the same guarantees hold (BEGIN IMMEDIATE is their lock). Races use threads released together
by a barrier; nothing here asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from runbook.app.intake import pgstore
from runbook.app.intake.app import Intake
from runbook.app.intake.dispatch import Dispatcher
from runbook.app.intake.models import parse_webhook
from runbook.app.intake.pgstore import PostgresStore
from runbook.app.intake.store import SqliteStore, Store
from runbook.engine.config import PROJECT_ROOT, Playbooks, load_playbooks
from runbook.sandbox import SandboxState
from runbook.sandbox.net import free_ports
from tests import intake_harness as harness
from tests.intake_harness import alert, running_intake, state_database
from tests.prefect_runs import api_headers

pytestmark = pytest.mark.integration

BREAKER = 3
ROUTES = harness.routes_yaml(
    harness.db_route("shared-auto", {"alertname": "SharedAuto"},
                     policy={"mode": "auto", "cooldown_s": 0,
                             "breaker": {"max_remediations": BREAKER, "window_s": 3600}}),
    harness.db_route("shared-cooldown", {"alertname": "SharedCooldown"},
                     policy={"mode": "diagnose", "cooldown_s": 600}),
    harness.db_route("shared-diagnose", {"alertname": "SharedDiagnose"}),
)


@pytest.fixture(scope="module")
def playbooks(sandbox_state: SandboxState, tmp_path_factory: pytest.TempPathFactory) -> Playbooks:
    routes = tmp_path_factory.mktemp("routes")
    (routes / "routes.yaml").write_text(ROUTES)
    return load_playbooks([PROJECT_ROOT / "playbooks" / "pafar.yaml", sandbox_state.playbook_dir, routes])


@pytest.fixture(params=["sqlite", "postgres"])
def stores(request: pytest.FixtureRequest, sandbox_state: SandboxState, tmp_path: Path
           ) -> Iterator[tuple[Store, Store]]:
    """Two replicas' stores over one state."""
    if request.param == "sqlite":
        pair: tuple[Store, Store] = (SqliteStore(tmp_path / "intake.sqlite"), SqliteStore(tmp_path / "intake.sqlite"))
        yield pair
        for s in pair:
            s.close()
        return
    with state_database(sandbox_state) as dsn:
        pair = (PostgresStore(dsn), PostgresStore(dsn))
        yield pair
        for s in pair:
            s.close()


def _replica(store: Store, playbooks: Playbooks) -> Intake:
    """The intake's own webhook path (parse, route, decide, store) over ``store``; its dispatcher never starts."""
    return Intake("t" * 24, playbooks, store, Dispatcher(store, "http://127.0.0.1:9/api"))


def _post(replica: Intake, doc: dict[str, Any]) -> list[dict[str, Any]]:
    results, _, _ = replica._route_and_store(parse_webhook(doc))
    return results


def _race(calls: list[Callable[[], list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Run every call in its own thread, all released at once; their results, flattened."""
    barrier = threading.Barrier(len(calls))
    out: list[list[dict[str, Any]]] = [[] for _ in calls]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = calls[i]()
        except BaseException as exc:  # reported below, with the others' results
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return [r for rs in out for r in rs]


def test_the_same_alert_at_both_replicas_at_once_is_one_occurrence(stores: tuple[Store, Store],
                                                                   playbooks: Playbooks) -> None:
    replicas = [_replica(s, playbooks) for s in stores]
    doc = alert("SharedDiagnose", {"db": "main"}, fingerprint="5a3ed0001")
    results = _race([lambda r=r: _post(r, doc) for r in replicas for _ in range(4)])
    assert sorted(r["outcome"] for r in results) == ["duplicate"] * 7 + ["run"]
    assert len(stores[0].find("5a3ed0001")) == 1 and len(stores[1].find("5a3ed0001")) == 1


def test_the_breaker_allows_exactly_its_limit_across_replicas(stores: tuple[Store, Store],
                                                              playbooks: Playbooks) -> None:
    replicas = [_replica(s, playbooks) for s in stores]
    calls = [lambda r=r, n=n, i=i: _post(r, alert("SharedAuto", {"db": "main"}, fingerprint=f"b{n}{i:03d}"))
             for n, r in enumerate(replicas) for i in range(8)]
    results = _race(calls)
    assert len(results) == 16 and all(r["outcome"] == "run" for r in results)
    modes = sorted(r["mode"] for r in results)
    assert modes == ["auto"] * BREAKER + ["dry_run"] * (16 - BREAKER), modes
    assert all("circuit breaker open" in r["reason"] for r in results if r["mode"] == "dry_run")
    # and a replica asked later still sees the limit reached
    late = _post(replicas[1], alert("SharedAuto", {"db": "main"}, fingerprint="b9fff"))
    assert late[0]["mode"] == "dry_run"


def test_a_cooldown_started_at_one_replica_holds_at_the_other(stores: tuple[Store, Store],
                                                              playbooks: Playbooks) -> None:
    a, b = (_replica(s, playbooks) for s in stores)
    assert _post(a, alert("SharedCooldown", {"db": "main"}, fingerprint="c0f1"))[0]["outcome"] == "run"
    assert _post(b, alert("SharedCooldown", {"db": "main"}, fingerprint="c0f2"))[0]["outcome"] == "cooldown"


def test_concurrent_alerts_for_one_cooled_down_target_start_one_run(stores: tuple[Store, Store],
                                                                    playbooks: Playbooks) -> None:
    replicas = [_replica(s, playbooks) for s in stores]
    calls = [lambda r=r, n=n, i=i: _post(r, alert("SharedCooldown", {"db": "main"}, fingerprint=f"c{n}{i:03d}"))
             for n, r in enumerate(replicas) for i in range(6)]
    outcomes = sorted(r["outcome"] for r in _race(calls))
    assert outcomes == ["cooldown"] * 11 + ["run"]


def test_claims_give_each_pending_occurrence_to_one_dispatcher(stores: tuple[Store, Store],
                                                               playbooks: Playbooks) -> None:
    a = _replica(stores[0], playbooks)
    for i in range(40):
        _post(a, alert("SharedDiagnose", {"db": "main"}, fingerprint=f"d0{i:03d}"))
    claimed: list[list[str]] = [[], []]

    def drain(n: int) -> list[dict[str, Any]]:
        while batch := stores[n].claim(limit=3):
            claimed[n] += [o.key for o in batch]
        return []

    _race([lambda: drain(0), lambda: drain(1)])
    everything = claimed[0] + claimed[1]
    assert len(everything) == len(set(everything)) == 40


def test_two_dispatchers_create_one_run_per_pending_occurrence(stores: tuple[Store, Store], playbooks: Playbooks,
                                                               sandbox_state: SandboxState) -> None:
    from runbook.app.serve import register_deployments

    api = sandbox_state.prefect_api_url
    assert api
    register_deployments(api)
    a = _replica(stores[0], playbooks)
    fingerprints = [f"e0{time.time_ns():x}{i:02d}" for i in range(12)]
    for fp in fingerprints:
        assert _post(a, alert("SharedDiagnose", {"db": "main"}, fingerprint=fp))[0]["outcome"] == "run"
    created: list[list[str]] = [[], []]

    async def both() -> None:
        dispatchers = [Dispatcher(s, api, on_created=created[n].append) for n, s in enumerate(stores)]
        await asyncio.gather(*(d.start() for d in dispatchers))  # each wakes itself for what is pending
        deadline = time.monotonic() + 60
        while stores[0].pending() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.gather(*(d.stop() for d in dispatchers))

    asyncio.run(both())
    try:
        assert stores[0].pending() == []
        everything = created[0] + created[1]
        assert len(everything) == len(set(everything)) == len(fingerprints), created
        for fp in fingerprints:
            (occ,) = stores[1].find(fp)
            assert occ.status == "created" and occ.flow_run_id in everything
            runs = httpx.post(f"{api}/flow_runs/filter", timeout=10, headers=api_headers(),
                              json={"flow_runs": {"tags": {"all_": [f"occurrence:{occ.key}"]}}}).json()
            assert [r["id"] for r in runs] == [occ.flow_run_id]
    finally:
        # no executor ran them: leave the server tidy
        with httpx.Client(base_url=api, timeout=10, headers=api_headers()) as http:
            for run_id in created[0] + created[1]:
                http.delete(f"/flow_runs/{run_id}")


def test_two_intake_processes_on_one_postgres_state_make_one_run_per_alert(sandbox_state: SandboxState,
                                                                         tmp_path: Path) -> None:
    """`runbook intake` twice, configured by RUNBOOK_INTAKE_STATE_DSN: an alert Alertmanager's retries send to
    both replicas gets one occurrence and one run; the DSN's password shows in neither log."""
    with state_database(sandbox_state) as dsn, \
            harness.intake_subprocess(sandbox_state, tmp_path / "a", ROUTES, state_dsn=dsn) as a, \
            harness.intake_subprocess(sandbox_state, tmp_path / "b", ROUTES, state_dsn=dsn) as b:
        doc = alert("SharedDiagnose", {"db": "main"})
        fingerprint = doc["alerts"][0]["fingerprint"]
        answers = _race([lambda it=it: [it.post(doc, timeout=30).json()["results"][0]] for it in (a, b)])
        assert sorted(r["outcome"] for r in answers) == ["duplicate", "run"]
        store = PostgresStore(dsn)
        try:
            deadline = time.monotonic() + 60
            while store.pending() and time.monotonic() < deadline:
                time.sleep(0.1)
            (occ,) = store.find(fingerprint)
        finally:
            store.close()
        assert occ.status == "created"
        runs = httpx.post(f"{sandbox_state.prefect_api_url}/flow_runs/filter", timeout=10, headers=api_headers(),
                          json={"flow_runs": {"tags": {"all_": [f"occurrence:{occ.key}"]}}}).json()
        assert [r["id"] for r in runs] == [occ.flow_run_id]
        httpx.delete(f"{sandbox_state.prefect_api_url}/flow_runs/{occ.flow_run_id}", timeout=10,
                     headers=api_headers())
        password = dsn.split(":")[2].split("@")[0]
        for it in (a, b):
            assert password not in it.log.read_text(errors="replace")
            assert not it.store.exists(), "a replica with a state DSN kept a SQLite store too"


def test_two_intake_apps_share_postgres_state_over_http(sandbox_state: SandboxState, tmp_path: Path) -> None:
    with state_database(sandbox_state) as dsn, \
            running_intake(sandbox_state, tmp_path / "a", ROUTES, executor=False, state_dsn=dsn) as a, \
            running_intake(sandbox_state, tmp_path / "b", ROUTES, executor=False, state_dsn=dsn) as b:
        doc = alert("SharedAuto", {"db": "main"})
        fp = doc["alerts"][0]["fingerprint"]
        assert a.post(doc).json()["results"][0]["outcome"] == "run"
        assert b.post(doc).json()["results"][0]["outcome"] == "duplicate"
        runs = a.wait_runs("shared-auto", fp)
        try:
            assert len(runs) == 1
            assert [r["id"] for r in b.runs_for("shared-auto", fp)] == [runs[0]["id"]]
        finally:
            httpx.delete(f"{a.api_url}/flow_runs/{runs[0]['id']}", timeout=10, headers=api_headers())


def test_a_resolve_at_one_replica_during_dispatch_is_seen_when_the_other_records_the_run(
        stores: tuple[Store, Store], playbooks: Playbooks) -> None:
    a, b = (_replica(s, playbooks) for s in stores)
    firing = alert("SharedDiagnose", {"db": "main"}, fingerprint="f1e0001")
    assert _post(a, firing)[0]["outcome"] == "run"
    (claimed,) = stores[0].claim()
    resolve = alert("SharedDiagnose", {"db": "main"}, fingerprint="f1e0001", status="resolved",
                    starts_at=firing["alerts"][0]["startsAt"])
    _, resolves, _ = b._route_and_store(parse_webhook(resolve))
    ((_, first),) = resolves
    assert (first.was, first.occurrence.status, first.occurrence.flow_run_id) == ("dispatching", "dispatching", None)
    resolved_at = stores[0].mark_created(claimed.key, "run-f1e0001")
    assert resolved_at is not None and resolved_at == first.occurrence.resolved_at
    # a resent resolve finds it recorded: nothing changes, and it says so (was "")
    again = stores[1].mark_resolved(claimed.key)
    assert again is not None and again.was == "" and again.occurrence.resolved_at == resolved_at
    assert (again.occurrence.status, again.occurrence.flow_run_id) == ("created", "run-f1e0001")
    # an occurrence not resolved records its run as before
    other = alert("SharedDiagnose", {"db": "main"}, fingerprint="f1e0002")
    assert _post(a, other)[0]["outcome"] == "run"
    (claimed,) = stores[1].claim()
    assert stores[1].mark_created(claimed.key, "run-f1e0002") is None


def test_healthz_on_postgres_reports_every_replica_s_pending_work_without_a_query(sandbox_state: SandboxState,
                                                                                 playbooks: Playbooks,
                                                                                 dead_port: int) -> None:
    """Replica A accepts alerts; replica B's /healthz reports them once B's dispatcher loop has counted (its
    Prefect is away, so they stay pending), with the count's age; and it answers from memory: a table locked
    against every query does not stop it."""
    with state_database(sandbox_state) as dsn:
        sa, sb = PostgresStore(dsn), PostgresStore(dsn)
        a = _replica(sa, playbooks)
        b = Intake("t" * 24, playbooks, sb, Dispatcher(sb, f"http://127.0.0.1:{dead_port}/api"))
        try:
            for i in range(5):
                assert _post(a, alert("SharedDiagnose", {"db": "main"}, fingerprint=f"4ea1{i:03d}"))[0][
                    "outcome"] == "run"

            async def b_counts() -> dict[str, Any]:
                await b.dispatcher.start()
                try:
                    deadline = time.monotonic() + 60
                    while (health := await _health(b))["pending"] != 5 and time.monotonic() < deadline:
                        await asyncio.sleep(0.1)
                    return health
                finally:
                    await b.dispatcher.stop()

            health = asyncio.run(b_counts())
            assert health["pending"] == 5 and health["prefect_api"] is False, health
            assert isinstance(health["pending_age_s"], float) and health["pending_age_s"] >= 0
            sa.refresh_pending()  # what A's dispatcher loop does: both replicas report the one shared figure
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as admin, admin.transaction():
                admin.execute(f"LOCK TABLE {pgstore.TABLE} IN ACCESS EXCLUSIVE MODE")  # any query would wait
                assert [asyncio.run(_health(r))["pending"] for r in (a, b)] == [5, 5]
        finally:
            sa.close()
            sb.close()


async def _health(replica: Intake) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(bytes((await replica.healthz()).body))
    return body


def test_state_connections_killed_under_the_intake_cost_one_503_then_it_reconnects(sandbox_state: SandboxState,
                                                                                   tmp_path: Path) -> None:
    """Every connection of the store's pools terminated (a PostgreSQL restart, a failover): the next webhook may
    get a 503 (Alertmanager retries it), the one after is stored; nothing acknowledged is lost."""
    with state_database(sandbox_state) as dsn, \
            running_intake(sandbox_state, tmp_path, ROUTES, executor=False, state_dsn=dsn) as it:
        assert it.post(alert("SharedDiagnose", {"db": "main"})).status_code == 200
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as admin:
            killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                                   "application_name = %s AND datname = current_database()",
                                   (pgstore.APPLICATION_NAME,)).fetchone()
        assert killed and killed[0] == pgstore.REQUEST_CONNECTIONS + pgstore.DISPATCH_CONNECTIONS
        answers = []
        for _ in range(3):
            doc = alert("SharedDiagnose", {"db": "main"})
            resp = it.post(doc)
            answers.append((resp.status_code, doc["alerts"][0]["fingerprint"], resp.json()))
        codes = [code for code, _, _ in answers]
        assert set(codes) <= {200, 503} and codes.count(503) <= 1 and codes[-1] == 200, answers
        for code, fingerprint, body in answers:
            if code == 503:
                assert "intake state database" in body["error"], body
            else:
                assert body["results"][0]["outcome"] == "run" and len(it.app.state.store.find(fingerprint)) == 1
        # the dispatcher's own connections were killed too: its next claim, or its sweep, reconnects
        runs = [r for code, fp, _ in answers if code == 200 for r in it.wait_runs("shared-diagnose", fp, 60)]
        for r in runs:
            httpx.delete(f"{it.api_url}/flow_runs/{r['id']}", timeout=10, headers=api_headers())
        assert len(runs) == codes.count(200), "an acknowledged alert got no run"


def test_a_resend_is_recognised_without_a_query_once_a_replica_has_seen_the_occurrence(
        sandbox_state: SandboxState, playbooks: Playbooks) -> None:
    """Most of a storm's webhooks are resends: each replica asks the database about an occurrence once, then
    answers resends from memory (stored keys are never removed). Shown with the table locked against every
    query: a lookup would wait for the lock, and end in a 503 after the lock timeout."""
    with state_database(sandbox_state) as dsn:
        stores = (PostgresStore(dsn), PostgresStore(dsn))
        a, b = (_replica(s, playbooks) for s in stores)
        try:
            doc = alert("SharedDiagnose", {"db": "main"}, fingerprint="4e5e0001")
            assert _post(a, doc)[0]["outcome"] == "run"  # stored by A: A knows it
            assert _post(b, doc)[0]["outcome"] == "duplicate"  # B asks once
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as admin, admin.transaction():
                admin.execute(f"LOCK TABLE {pgstore.TABLE} IN ACCESS EXCLUSIVE MODE")
                assert [_post(r, doc)[0]["outcome"] for r in (a, b, a)] == ["duplicate"] * 3
        finally:
            for s in stores:
                s.close()


# ------------------------------------------------------------------ the CLI refusing a store it cannot use


def _intake_cli(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "RUNBOOK_INTAKE_STATE_DSN"}
    full.update({"RUNBOOK_INTAKE_TOKEN": "t" * 24, "PREFECT_API_URL": "http://127.0.0.1:9/api", **env})
    return subprocess.run([sys.executable, "-m", "runbook.app.cli", "intake", "--port", str(free_ports(1)[0]),
                           "--state", str(tmp_path / "state")], env=full, capture_output=True, text=True,
                          timeout=120, check=False)


def test_runbook_intake_refuses_a_corrupt_store_with_exit_2_naming_it(tmp_path: Path) -> None:
    store = tmp_path / "state" / "intake.sqlite"
    store.parent.mkdir()
    store.write_bytes(b"\x00garbage that is not SQLite\n" * 500)
    proc = _intake_cli(tmp_path)
    flat = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr
    assert str(store) in flat and "not a usable SQLite database" in flat
    assert store.read_bytes() == b"\x00garbage that is not SQLite\n" * 500


def test_runbook_intake_maps_a_malformed_state_dsn_to_exit_2_without_the_value(tmp_path: Path) -> None:
    proc = _intake_cli(tmp_path, RUNBOOK_INTAKE_STATE_DSN="postgresql://runbook:K%zQ7@127.0.0.1:5432/state")
    flat = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, flat
    assert "RUNBOOK_INTAKE_STATE_DSN" in flat and "not a valid PostgreSQL connection string" in flat
    assert "K%zQ7" not in flat and "zQ7" not in flat


def test_runbook_intake_names_an_unreachable_state_database_without_its_password(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    proc = _intake_cli(tmp_path, RUNBOOK_INTAKE_STATE_DSN=f"postgresql://runbook:Hq7Zk3Wp@127.0.0.1:{port}/s")
    flat = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 1, flat
    assert "intake state database unreachable" in flat and "Hq7Zk3Wp" not in flat

