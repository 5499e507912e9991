"""tests/require.py: a missing sandbox service skips a test locally and fails it under CI (never a silent pass)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runbook.sandbox import SandboxState, ServiceRecord
from tests.require import require_service

STATE = SandboxState(state_dir=Path("/nonexistent"), services={
    "sshd": ServiceRecord(name="sshd", pid=1, port=2222, log_file="/dev/null", running=True),
    "podman": ServiceRecord(name="podman", pid=2, port=2223, log_file="/dev/null", running=False),
})


@pytest.mark.parametrize("ci", ["", "0", "false"])
def test_locally_a_missing_service_skips(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setenv("CI", ci)
    require_service(STATE, "sshd", "needed")  # running: returns
    with pytest.raises(pytest.skip.Exception, match="podman is not running: container logs"):
        require_service(STATE, "podman", "container logs")


@pytest.mark.parametrize("ci", ["true", "1", "TRUE"])
def test_under_ci_a_missing_service_fails(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setenv("CI", ci)
    require_service(STATE, "sshd", "needed")
    for name in ("podman", "redis"):  # stopped, and never started
        with pytest.raises(pytest.fail.Exception, match=f"{name} is not running"):
            require_service(STATE, name, "needed")
