"""One scenario per registered remediation, for the standard contract suite (tests/integration/test_contract.py).

A scenario sets up the condition its remediation fixes against the real sandbox, yields the remediation and a
``snapshot()`` of the state it may change. Every later remediation adds its scenario here, or the suite fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg

from runbook.engine.config import Environment
from runbook.engine.remediation import Remediation
from runbook.sandbox.incidents import DbIncident, docker_client
from runbook.sandbox.podman import project_filter
from tasks.backup_remediations import RestoreFromBackup, TakeBackup
from tasks.container_remediations import RestartLeakers, ScaleService, StartServiceContainers
from tasks.container_rollback import RollbackService
from tasks.postgres_remediations import CancelLongQueries, TerminateIdleBlockers

Scenario = Callable[[Environment, str], AbstractContextManager[tuple[Remediation[Any], Callable[[], Any]]]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    def deco(fn: Scenario) -> Scenario:
        SCENARIOS[name] = fn
        return fn

    return deco


def db_sessions(app_dsn: str) -> Callable[[], set[tuple[Any, ...]]]:
    """Every client session but the engine's: pid, state, query start. What a dry run must leave as it was."""

    def snapshot() -> set[tuple[Any, ...]]:
        with psycopg.connect(app_dsn, autocommit=True, connect_timeout=5, application_name="runbook") as conn:
            rows = conn.execute(
                """SELECT pid, state, query_start, backend_start FROM pg_stat_activity
                    WHERE datname = current_database() AND backend_type = 'client backend'
                      AND application_name NOT IN ('runbook', 'pafar-probe') AND pid <> pg_backend_pid()"""
            ).fetchall()
        return set(rows)

    return snapshot


@scenario("cancel-long-queries")
@contextmanager
def _runaway_query(env: Environment, app_dsn: str) -> Iterator[tuple[Remediation[Any], Callable[[], Any]]]:
    incident = DbIncident(app_dsn, waiters=1, slow_runs=0).start()
    try:
        time.sleep(1.2)
        yield CancelLongQueries(env, "main", threshold_s=1.0), db_sessions(app_dsn)
    finally:
        incident.stop()


@scenario("terminate-idle-blockers")
@contextmanager
def _idle_blocker(env: Environment, app_dsn: str) -> Iterator[tuple[Remediation[Any], Callable[[], Any]]]:
    incident = DbIncident(app_dsn, waiters=2, slow_runs=0, runaway=False).start()
    try:
        time.sleep(1.2)
        yield TerminateIdleBlockers(env, "main", threshold_s=1.0), db_sessions(app_dsn)
    finally:
        incident.stop()


# ------------------------------------------------------------------ containers (issue 3: Podman's Docker API)


def query_active(dsn: str, pid: int) -> bool:
    """Whether the backend ``pid`` is still running a query (a runaway query a remediation would cancel)."""
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row[0] == "active"


def project_containers(docker_url: str) -> Callable[[], set[tuple[Any, ...]]]:
    """Every compose-project container: id, name, state, start time. What a dry run must leave exactly as it was."""
    def snapshot() -> set[tuple[Any, ...]]:
        with docker_client(docker_url) as client:
            found = client.containers.list(all=True, filters=project_filter())
            return {(c.id, c.name, c.attrs["State"]["Status"], c.attrs["State"]["StartedAt"]) for c in found}

    return snapshot


@contextmanager
def restored_project(env: Environment) -> Iterator[str]:
    """Yield the Docker URL; afterwards remove every container the scenario added (replicas, injected ones)."""
    from runbook.sandbox.incidents import remove_containers_except

    assert env.docker is not None, "the sandbox has no podman service"
    url = env.docker.base_url
    keep = {row[0] for row in project_containers(url)()}
    try:
        yield url
    finally:
        remove_containers_except(url, keep)


@scenario("scale-service")
@contextmanager
def _one_backend(env: Environment, app_dsn: str) -> Iterator[tuple[Remediation[Any], Callable[[], Any]]]:
    with restored_project(env) as url:
        yield ScaleService(env, "backend", replicas=2), project_containers(url)


@scenario("restart-leakers")
@contextmanager
def _growing_worker(env: Environment, app_dsn: str) -> Iterator[tuple[Remediation[Any], Callable[[], Any]]]:
    from datetime import UTC, datetime

    from runbook.sandbox.incidents import MemoryGrower

    with restored_project(env) as url:
        grower = MemoryGrower(url).start()
        try:
            time.sleep(1.5)  # a few MiB to drop on restart
            since = datetime.now(UTC)  # the alert began after it started: it qualifies for one restart
            yield RestartLeakers(env, [grower.container_id], since, stop_timeout_s=2), project_containers(url)
        finally:
            grower.stop()


@scenario("start-service-containers")
@contextmanager
def _stopped_backend(env: Environment, app_dsn: str) -> Iterator[tuple[Remediation[Any], Callable[[], Any]]]:
    from runbook.sandbox.incidents import StoppedService

    with restored_project(env) as url:
        stopped = StoppedService(url, service="backend").start()
        try:
            yield StartServiceContainers(env, "backend"), project_containers(url)
        finally:
            stopped.stop()


@contextmanager
def bad_deploy(env: Environment, service: str = "backend") -> Iterator[Any]:
    """The service's healthy replicas recorded as last known good, then a "v2" whose health check fails deployed
    over its first replica; afterwards the original image and command are back (whatever happened meanwhile)."""
    from runbook.sandbox.incidents import BadDeploy
    from tasks.container_remediations import answers_2xx, service_health_url
    from tasks.containers import list_project_containers
    from tasks.last_known_good import record_last_known_good

    assert env.docker is not None, "the sandbox has no podman service"
    seen = [c for c in list_project_containers.fn(env) if c.service == service]
    url = service_health_url(env, service)
    record, note = record_last_known_good.fn(env, service, seen, answers_2xx(url) if url else None, 0)
    assert record is not None, note
    bad = BadDeploy(env.docker.base_url, service=service).start()
    try:
        yield bad
    finally:
        bad.stop()


@scenario("rollback-service")
@contextmanager
def _bad_backend_release(env: Environment, app_dsn: str) -> Iterator[tuple[Remediation[Any], Callable[[], Any]]]:
    assert env.docker is not None
    with bad_deploy(env):
        yield RollbackService(env, "backend"), project_containers(env.docker.base_url)


# ------------------------------------------------------------------ backups (issue 5): their own small database


@contextmanager
def _backup_database(name: str) -> Iterator[tuple[Environment, Any, Any]]:
    """pafar_bk and an environment whose backups go to a fresh directory (tests/backup_env.py)."""
    from runbook import sandbox
    from tests.backup_env import backup_env, create_db, drop_all

    state = sandbox.status()
    create_db(state)
    try:
        with backup_env(state, name=name) as (env, directory):
            yield env, directory, state
    finally:
        drop_all(state)


@scenario("take-backup")
@contextmanager
def _no_recent_backup(env: Environment, app_dsn: str) -> Iterator[tuple[Remediation[Any], Callable[[], Any]]]:
    with _backup_database("bkcontract") as (benv, directory, _state):
        yield TakeBackup(benv, "main", fresh_within_s=300), lambda: sorted(p.name for p in directory.iterdir())


@scenario("restore-from-backup")
@contextmanager
def _corrupted_database(env: Environment, app_dsn: str) -> Iterator[tuple[Remediation[Any], Callable[[], Any]]]:
    from tasks.backup_dump import take_backup
    from tasks.backup_store import open_store
    from tests.backup_env import corrupt, databases, row_counts

    with _backup_database("bkcontract") as (benv, directory, state):
        with open_store(benv) as store:
            take_backup(benv, "main", store)
        corrupt(state)

        def snapshot() -> Any:
            return sorted(databases(state)), row_counts(state), sorted(p.name for p in directory.iterdir())

        yield RestoreFromBackup(benv, "main", writer_stop_s=1), snapshot
