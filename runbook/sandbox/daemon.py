"""Starting a foreground daemon binary (Prometheus, Alertmanager, node_exporter, osmem) and waiting for health.

The shared part of the monitoring services: spawn under our PID in its own session, poll an HTTP health URL
with a short timeout, fail fast if the process exits, and carry the log tail in the error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from runbook.engine.daemon import http_ok, start_ticks

from . import process
from .base import ServiceRecord


def start_daemon(name: str, cmd: Sequence[str], *, port: int, log: Path, cwd: Path, health_url: str,
                 markers: Sequence[str], paths: dict[str, str], timeout_s: float = 20.0) -> ServiceRecord:
    """Spawn ``cmd`` and return its record once ``health_url`` answers 200, or raise SandboxError with the log."""
    proc = process.spawn(cmd, log, cwd=cwd)
    record = ServiceRecord(name=name, pid=proc.pid, port=port, log_file=str(log), paths=paths,
                           cmdline_markers=list(markers))
    process.await_healthy(proc, lambda: http_ok(health_url, 1.0), timeout_s, f"{name} on 127.0.0.1:{port}", log)
    record.proc_start = start_ticks(proc.pid)
    record.running = True
    return record
