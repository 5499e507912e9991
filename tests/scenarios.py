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

from runbook.config import Environment
from runbook.remediation import Remediation
from runbook.sandbox.incidents import DbIncident
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
