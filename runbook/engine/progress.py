"""Progress lines for long steps: a person watching (the Prefect UI's log tab, `runbook run` on the warm path,
the terminal) sees what is running instead of silence."""

from __future__ import annotations

import logging

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

log = logging.getLogger("runbook")


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The current flow or task run's logger (its lines reach the server), else the module logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return log


def say(message: str, *args: object) -> None:
    """One progress line (%-style arguments, so a secret in them still passes the redaction filter)."""
    run_logger().info(message, *args)
