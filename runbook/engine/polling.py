"""Waiting for the world to settle: a remediation's verify step, a service the sandbox starts, a daemon's port.

Its own small module so that what only needs to wait (the sandbox, the daemon helpers the CLI's warm path
imports) does not import the remediation framework and the report models with it."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passed (verify steps wait for the world to settle)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
