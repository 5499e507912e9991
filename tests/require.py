"""What a test needs from the sandbox: missing locally it is a skip (a laptop without Podman can still run the rest);
missing under CI it is a failure, so a suite cannot go green by not running its tests."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

from runbook.sandbox import SandboxState


def under_ci() -> bool:
    """CI=true (set by CI systems, and by hand to check a machine the way CI does)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(why: str) -> NoReturn:
    """Skip the test locally; fail it under CI."""
    if under_ci():
        pytest.fail(f"{why} (CI: a missing sandbox service fails the test instead of skipping it)", pytrace=False)
    pytest.skip(why)


def require_service(state: SandboxState, name: str, why: str) -> None:
    """Return when the sandbox service ``name`` runs; otherwise skip locally or fail under CI, saying ``why``."""
    if name not in state.running():
        unavailable(f"the sandbox service {name} is not running: {why}")
