"""Running PostgreSQL's client programs (pg_dump, psql) on a stream: a deadline, and the stderr line worth reporting.

A child blocked writing into (or reading from) a pipe cannot time out by itself, so a watchdog kills it when its
deadline passes; what it said on stderr is cut to the one line that explains the failure, secrets redacted.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from runbook.engine.redact import redact


@dataclass
class Watchdog:
    """Kills a child process when its deadline passes; ``fired`` says it did (the failure is then a timeout)."""

    proc: subprocess.Popen[bytes]
    timeout_s: float
    fired: bool = False

    def __post_init__(self) -> None:
        self._timer = threading.Timer(self.timeout_s, self._kill)
        self._timer.daemon = True
        self._timer.start()

    def _kill(self) -> None:
        self.fired = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def cancel(self) -> None:
        self._timer.cancel()


def stderr_summary(path: Path) -> str:
    """``error_summary`` of a stderr file (empty when it cannot be read)."""
    try:
        return error_summary(path.read_text(errors="replace"))
    except OSError:
        return ""


def error_summary(text: str) -> str:
    """The first ERROR/FATAL line of a program's stderr (else its first line), redacted, at most 400 characters."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "ERROR" in ln or "FATAL" in ln or "error:" in ln]
    return redact((errors or lines or [""])[0].strip())[:400]
