"""The Prefect servers we start ourselves (`runbook serve`, the sandbox): their environment, command line, start-up
and stop, with telemetry off always.

One place for it, shared by `runbook serve` and the sandbox's Prefect server, so the two cannot drift apart.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runbook.engine import daemon

TELEMETRY_OFF = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
LOOPBACK = "127.0.0.1"
LOG_FILE = "server.log"  # in the server's home
DB_FILE = "prefect.db"  # SQLite database in the server's home, unless a database URL is given


def prefect_executable() -> Path:
    """The `prefect` script of the running interpreter's environment (not resolved: venvs symlink python)."""
    return Path(sys.executable).parent / "prefect"


def api_url(port: int) -> str:
    """Prefect API URL of a server on 127.0.0.1:port."""
    return f"http://{LOOPBACK}:{port}/api"


def is_healthy(port: int, timeout: float = 2.0) -> bool:
    """Whether the Prefect server on 127.0.0.1:port answers /health."""
    return daemon.http_ok(f"{api_url(port)}/health", timeout)


def sqlite_url(home: Path) -> str:
    return f"sqlite+aiosqlite:///{home / DB_FILE}"


def prefect_server_command(port: int, host: str = LOOPBACK) -> list[str]:
    return [str(prefect_executable()), "server", "start", "--host", host, "--port", str(port), "--analytics-off"]


def prefect_server_env(home: Path, port: int, database_url: str) -> dict[str, str]:
    """Environment for a Prefect server we start: its own home and database, telemetry off, and the UI told
    where its API is (it defaults to 127.0.0.1:4200, so on any other port the UI could not reach it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=database_url,
        PREFECT_UI_API_URL=f"http://{LOOPBACK}:{port}/api",
        PREFECT_UI_URL=f"http://{LOOPBACK}:{port}",
        **TELEMETRY_OFF,
    )
    return env


def start_prefect_server(home: Path, port: int, database_url: str | None = None,
                         timeout_s: float = 60.0) -> subprocess.Popen[bytes]:
    """Start a Prefect server on 127.0.0.1:port (SQLite in ``home`` unless ``database_url``), output in
    home/server.log; return once /health answers, or raise DaemonFailed (the server killed) when it exits or
    stays unhealthy for ``timeout_s``."""
    proc = daemon.spawn(prefect_server_command(port), home / LOG_FILE, cwd=home,
                        env=prefect_server_env(home, port, database_url or sqlite_url(home)))
    daemon.await_healthy(proc, lambda: is_healthy(port), timeout_s, f"prefect server on {LOOPBACK}:{port}",
                         interval_s=0.25)
    return proc


@contextmanager
def local_prefect_server(home: Path, port: int, timeout_s: float = 90.0) -> Iterator[str]:
    """A Prefect server on SQLite for `runbook serve`, stopped on exit; reused (and left running) when one already
    answers on that port."""
    if is_healthy(port, 1.0):
        yield api_url(port)
        return
    home.mkdir(parents=True, exist_ok=True)
    try:
        proc = start_prefect_server(home, port, timeout_s=timeout_s)
    except daemon.DaemonFailed as exc:
        raise daemon.DaemonFailed(f"{exc} (its log: {home / LOG_FILE})") from None
    try:
        yield api_url(port)
    finally:
        daemon.stop(proc)
