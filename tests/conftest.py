"""Session fixtures: the one sandbox (real PostgreSQL, Redis, Prefect server) shared by every integration test.

A sandbox that was already running before the session (e.g. `runbook demo --keep`) is reused and left running;
one the session started is stopped at the end, by PID.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from runbook import sandbox
from runbook.sandbox import SandboxState

pytest_plugins = ["tests.integration.listeners"]  # dead_port, silent_port: targets that refuse or never answer


@pytest.fixture(scope="session")
def sandbox_state() -> Iterator[SandboxState]:
    was_running = set(sandbox.status().running())
    state = sandbox.up()
    os.environ.update(state.engine_env())  # point the engine at the sandbox explicitly (and its API auth string)
    from prefect.settings import temporary_settings

    from runbook.engine.procedure import attended_run

    with temporary_settings(updates=state.prefect_env()), attended_run():
        yield state
        from runbook.engine.procedure import flush_run_records

        flush_run_records()
    if not was_running:
        sandbox.down()


@pytest.fixture(scope="session")
def sandbox_env(sandbox_state: SandboxState):  # noqa: ANN201
    from runbook.engine.config import load_playbooks

    return load_playbooks().environment("sandbox")


@pytest.fixture(scope="session")
def app_dsn(sandbox_state: SandboxState) -> str:
    return sandbox_state.env_vars()["RUNBOOK_SANDBOX_APP_DSN"]
