"""One procedure run passes its PostgreSQL session from step to step (runbook.engine.clients.run_sessions), on the
sandbox's real PostgreSQL: only clean sessions are passed on, and none outlives the run."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from flows.db_slowness import db_slowness
from runbook.engine.clients import postgres, release_sessions, run_sessions
from runbook.engine.errors import QueryFailed

pytestmark = pytest.mark.integration


def backend_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()
    assert row
    return int(row["pid"])


def test_a_clean_session_goes_to_the_next_step_and_is_closed_with_the_run(sandbox_env) -> None:  # noqa: ANN001
    with run_sessions():
        with postgres(sandbox_env) as first:
            pid = backend_pid(first)
        with postgres(sandbox_env) as second:
            assert backend_pid(second) == pid
        assert second is first and not first.closed
    assert first.closed


def test_only_clean_sessions_with_the_same_settings_are_passed_on(sandbox_env) -> None:  # noqa: ANN001
    with run_sessions():
        with postgres(sandbox_env) as left_in_transaction:
            pid = backend_pid(left_in_transaction)
            left_in_transaction.execute("BEGIN")
        assert left_in_transaction.closed
        with pytest.raises(QueryFailed), postgres(sandbox_env) as failed:
            failed.execute("SELECT * FROM no_such_table")
        assert failed.closed
        with postgres(sandbox_env) as fresh:
            assert backend_pid(fresh) != pid
        with postgres(sandbox_env, statement_timeout_ms=1234) as other_settings:
            assert other_settings is not fresh
            assert other_settings.execute("SHOW statement_timeout").fetchone()["statement_timeout"] == "1234ms"
        with postgres(sandbox_env, autocommit=False) as transactional:
            assert transactional is not fresh and transactional is not other_settings
        assert transactional.closed


def test_outside_a_run_every_step_has_its_own_session(sandbox_env) -> None:  # noqa: ANN001
    with postgres(sandbox_env) as first:
        pass
    assert first.closed
    with postgres(sandbox_env) as second:
        assert second is not first


def test_released_sessions_are_closed_and_none_is_passed_on_after(sandbox_env) -> None:  # noqa: ANN001
    """What the runner does before waiting for a person and before applying (a restore renames the database, which
    PostgreSQL refuses while any session, ours included, is connected to it)."""
    with run_sessions():
        with postgres(sandbox_env) as conn:
            pass
        assert not conn.closed
        release_sessions()
        assert conn.closed
        with postgres(sandbox_env) as after:
            assert after is not conn
        assert after.closed


def test_db_slowness_opens_as_many_sessions_as_run_at_once_and_leaves_none_open(
        sandbox_env, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Six steps use the database (activity, statements, plans, indexes, and each remediation's check); two of
    them run side by side. A spy on psycopg.connect (the real connection is made) counts the sessions."""
    real = psycopg.connect
    opened: list[psycopg.Connection[Any]] = []

    def counted(*args: Any, **kwargs: Any) -> psycopg.Connection[Any]:
        conn = real(*args, **kwargs)
        opened.append(conn)
        return conn

    monkeypatch.setattr(psycopg, "connect", counted)
    doc = db_slowness(env="sandbox", dry_run=True)
    assert any(f["title"].startswith("slowest statement") or "connections to" in f["title"] for f in doc["findings"])
    assert 1 <= len(opened) <= 2, f"{len(opened)} sessions for one run"
    assert all(c.closed for c in opened)
