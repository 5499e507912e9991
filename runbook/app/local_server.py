"""A Prefect server with a warm executor in the background, for `runbook run` when no PREFECT_API_URL is set.

Without it, every CLI run would start an embedded (ephemeral) Prefect API: 10-30 s per call. Instead the first call
starts `runbook serve --no-intake` detached, under the user's state directory, says so in one line, and later calls
find it (``server.json``: pid, port) and hand their runs to its executor (runbook.app.remote_run). `runbook local
status` shows it and `runbook local stop` stops it. No Prefect import here: the CLI stays fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from runbook.app.remote_run import api_client, warm_executor_ready
from runbook.engine.daemon import free_ports, http_ok, spawn, start_ticks
from runbook.engine.errors import RunbookError
from runbook.engine.prefect_env import AUTH_ENV, AUTH_FILE, ensure_auth_string, read_auth_string

RECORD = "server.json"
START_TIMEOUT_S = 120.0
GRACE_S = 10.0  # on `runbook local stop`: running runs get this long, then are handed back (run again on restart)


class LocalServerError(RunbookError):
    """The background server could not be started; the message names its log."""


def state_dir() -> Path:
    """$RUNBOOK_STATE_DIR, else $XDG_STATE_HOME/runbook (default ~/.local/state/runbook)."""
    explicit = os.environ.get("RUNBOOK_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "runbook"


def running(root: Path | None = None) -> str | None:
    """The API URL of the background server when its process lives and its API answers; None otherwise."""
    rec = _read(root or state_dir())
    if rec is None or not _alive(rec):
        return None
    api = str(rec["api_url"])
    return api if http_ok(f"{api}/health", timeout=1.0) else None


def auth_string(root: Path | None = None) -> str | None:
    """The auth string the background server demands (``prefect-api-auth`` in its state dir, mode 0600)."""
    return read_auth_string((root or state_dir()) / AUTH_FILE)


def ensure(say: Callable[[str], None] = print, root: Path | None = None) -> str:
    """The background server's API URL, starting it (once, under a lock) when none runs; its auth string is
    ``auth_string(root)``."""
    root = root or state_dir()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _locked(root):
        api = running(root)
        if api:
            return api
        (port,) = free_ports(1)
        api = f"http://127.0.0.1:{port}/api"
        say(f"starting a local Prefect server and warm executor in the background ({root}, "
            f"{api.removesuffix('/api')}); later runs reuse it, `runbook local stop` stops it")
        auth = ensure_auth_string(root / AUTH_FILE)  # `serve --state root` finds the same file
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", AUTH_ENV)}
        env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
        log = root / "serve.log"
        proc = spawn([sys.executable, "-m", "runbook.app.cli", "serve", "--no-intake", "--prefect-port", str(port),
                      "--state", str(root), "--grace", str(GRACE_S)], log, env=env)
        (root / RECORD).write_text(json.dumps({"pid": proc.pid, "ticks": start_ticks(proc.pid), "port": port,
                                               "api_url": api}))
        deadline = time.monotonic() + START_TIMEOUT_S
        with api_client(api, timeout_s=2, auth=auth) as http:
            while not warm_executor_ready(http):
                if proc.poll() is not None or time.monotonic() > deadline:
                    stop(root)
                    tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                    raise LocalServerError(f"the background Prefect server did not come up (log {log}):\n{tail}")
                time.sleep(0.2)
        return api


def stop(root: Path | None = None, timeout_s: float = GRACE_S + 15.0) -> bool:
    """Stop the background server (SIGTERM to its process group, SIGKILL after ``timeout_s``); True if one ran."""
    root = root or state_dir()
    rec = _read(root)
    (root / RECORD).unlink(missing_ok=True)
    if rec is None or not _alive(rec):  # gone, or its PID now names another process: never signal that one
        return False
    pid = int(str(rec["pid"]))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(rec) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(rec):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    return True


def _read(root: Path) -> dict[str, object] | None:
    try:
        rec = json.loads((root / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and {"pid", "api_url"} <= rec.keys() else None


def _alive(rec: dict[str, object]) -> bool:
    """The recorded server process still runs: same PID and the same start time (not a reused PID, not a zombie)."""
    try:
        pid = int(str(rec["pid"]))
    except ValueError:
        return False
    ticks = start_ticks(pid)
    return ticks is not None and ticks == rec.get("ticks")


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    with open(root / "lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
