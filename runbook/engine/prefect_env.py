"""The Prefect servers we start ourselves (`runbook serve`, the sandbox): their environment, command line, start-up
and stop, with telemetry off always, and API authentication on always.

One place for it, shared by `runbook serve` and the sandbox's Prefect server, so the two cannot drift apart.

Authentication: every server we start demands HTTP basic auth (Prefect's ``PREFECT_SERVER_API_AUTH_STRING``), with a
string generated once and kept in a 0600 file in the server's state dir (``prefect-api-auth``); our clients send it
(``PREFECT_API_AUTH_STRING``, which Prefect's own client reads too). ``/api/health`` stays open, as Prefect leaves it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runbook.engine import daemon
from runbook.engine.redact import register_secret

TELEMETRY_OFF = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
LOOPBACK = "127.0.0.1"
LOG_FILE = "server.log"  # in the server's home
DB_FILE = "prefect.db"  # SQLite database in the server's home, unless a database URL is given
AUTH_FILE = "prefect-api-auth"  # in the state dir of a server we start: its auth string, mode 0600
AUTH_ENV = "PREFECT_API_AUTH_STRING"  # what Prefect's client (and ours) sends
SERVER_AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"  # what the server demands
AUTH_USER = "runbook"  # the string is user:password shaped, so `curl -u "$PREFECT_API_AUTH_STRING"` works too


def ensure_auth_string(path: Path) -> str:
    """The auth string kept in ``path``, generated (secrets.token_urlsafe) the first time, so a server keeps its
    string across restarts and the shells that exported it keep working.

    Created whole or not at all (a temp file of mode 0600 linked into place; a concurrent creator's file wins) and
    tightened to 0600 if someone widened it."""
    existing = read_auth_string(path)
    if existing:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{AUTH_USER}:{secrets.token_urlsafe(32)}\n")
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    auth = read_auth_string(path)
    if not auth:
        raise daemon.DaemonFailed(f"{path} holds no API auth string: write one (user:password) or remove the file "
                                  "and a new one is generated")
    return auth


def read_auth_string(path: Path) -> str | None:
    """The auth string in ``path`` (registered for redaction), or None when there is none; a file others may read
    is set back to 0600 first."""
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        auth = path.read_text().strip()
    except OSError:
        return None
    if not auth:
        return None
    register_secret(auth)
    register_secret(_basic_token(auth))
    return auth


def env_auth_string() -> str | None:
    """PREFECT_API_AUTH_STRING from the environment (None when unset or empty), registered for redaction."""
    auth = os.environ.get(AUTH_ENV) or None
    if auth:
        register_secret(auth)
        register_secret(_basic_token(auth))
    return auth


def auth_header(auth: str | None) -> dict[str, str]:
    """The Authorization header Prefect's server checks (basic, the whole string base64-encoded); none without one."""
    return {"Authorization": f"Basic {_basic_token(auth)}"} if auth else {}


def _basic_token(auth: str) -> str:
    return base64.b64encode(auth.encode()).decode()


def client_env(api: str, auth: str | None) -> dict[str, str]:
    """PREFECT_API_URL and PREFECT_API_AUTH_STRING for a client of ``api``: a child process's environment and
    Prefect's ``temporary_settings`` updates alike (Prefect reads its settings from the environment only once, at
    import, so a process that switches servers sets both together)."""
    return {"PREFECT_API_URL": api, **({AUTH_ENV: auth} if auth else {})}


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


def prefect_server_env(home: Path, port: int, database_url: str, auth: str) -> dict[str, str]:
    """Environment for a Prefect server we start: its own home and database, telemetry off, basic auth on, and the
    UI told where its API is (it defaults to 127.0.0.1:4200, so on any other port the UI could not reach it).
    The auth string goes in the environment, never on the command line (which `ps` shows to everyone)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=database_url,
        PREFECT_UI_API_URL=f"http://{LOOPBACK}:{port}/api",
        PREFECT_UI_URL=f"http://{LOOPBACK}:{port}",
        **TELEMETRY_OFF,
    )
    env[SERVER_AUTH_ENV] = auth
    return env


def start_prefect_server(home: Path, port: int, auth: str, database_url: str | None = None,
                         timeout_s: float = 60.0) -> subprocess.Popen[bytes]:
    """Start a Prefect server on 127.0.0.1:port demanding ``auth`` (SQLite in ``home`` unless ``database_url``),
    output in home/server.log; return once /health answers, or raise DaemonFailed (the server killed) when it
    exits or stays unhealthy for ``timeout_s``."""
    proc = daemon.spawn(prefect_server_command(port), home / LOG_FILE, cwd=home,
                        env=prefect_server_env(home, port, database_url or sqlite_url(home), auth))
    daemon.await_healthy(proc, lambda: is_healthy(port), timeout_s, f"prefect server on {LOOPBACK}:{port}",
                         interval_s=0.25)
    return proc


def demands_auth(port: int, auth: str, timeout: float = 2.0) -> bool:
    """Whether the Prefect server on 127.0.0.1:port refuses a request without ``auth`` (401) and accepts it with:
    a server started before authentication was on, or with another string, is not one to reuse."""
    url = f"{api_url(port)}/admin/version"
    return (daemon.http_status(url, timeout) == 401
            and daemon.http_status(url, timeout, headers=auth_header(auth)) == 200)


@contextmanager
def local_prefect_server(home: Path, port: int, auth: str, timeout_s: float = 90.0) -> Iterator[str]:
    """A Prefect server on SQLite for `runbook serve`, demanding ``auth``, stopped on exit; reused (and left
    running) when one already answers on that port."""
    if is_healthy(port, 1.0):
        yield api_url(port)
        return
    home.mkdir(parents=True, exist_ok=True)
    try:
        proc = start_prefect_server(home, port, auth, timeout_s=timeout_s)
    except daemon.DaemonFailed as exc:
        raise daemon.DaemonFailed(f"{exc} (its log: {home / LOG_FILE})") from None
    try:
        yield api_url(port)
    finally:
        daemon.stop(proc)
