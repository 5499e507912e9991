"""Environment for the Prefect processes the engine starts (a server, a flow-run subprocess): telemetry off always.

One place for it, shared by `runbook serve` and the sandbox's Prefect server, so the two cannot drift apart.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TELEMETRY_OFF = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def prefect_executable() -> Path:
    """The `prefect` script of the running interpreter's environment (not resolved: venvs symlink python)."""
    return Path(sys.executable).parent / "prefect"


def prefect_server_command(port: int, host: str = "127.0.0.1") -> list[str]:
    return [str(prefect_executable()), "server", "start", "--host", host, "--port", str(port), "--analytics-off"]


def prefect_server_env(home: Path, port: int, database_url: str) -> dict[str, str]:
    """Environment for a Prefect server we start: its own home and database, telemetry off, and the UI told
    where its API is (it defaults to 127.0.0.1:4200, so on any other port the UI could not reach it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=database_url,
        PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_UI_URL=f"http://127.0.0.1:{port}",
        **TELEMETRY_OFF,
    )
    return env
