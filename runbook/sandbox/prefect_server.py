"""A Prefect server on SQLite in the state dir, so flows run against a real API instead of ephemeral mode.

Migrating a fresh Prefect database takes ~8 s of the ~14 s a first start needs. After the first start the
migrated database is snapshotted into a cache keyed by the Prefect version, and later starts begin from a
copy of it (~5 s). The cache lives outside the state dir so `down` does not throw it away.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

import psycopg

from runbook.engine.daemon import DaemonFailed, start_ticks
from runbook.engine.prefect_env import (
    AUTH_FILE,
    DB_FILE,
    LOG_FILE,
    demands_auth,
    ensure_auth_string,
    is_healthy,
    prefect_executable,
    prefect_server_command,
    read_auth_string,
    start_prefect_server,
)

from . import process
from .base import Requirement, Service, ServiceRecord
from .errors import SandboxError
from .postgres import admin_conninfo

START_TIMEOUT_S = 120.0  # a cold start on a busy 2-core machine (CI beside other work) took over 60 s
PG_DATABASE = "prefect"


def postgres_database_url(pg: ServiceRecord) -> str:
    """Create the `prefect` database in the sandbox PostgreSQL (if missing); its URL over the unix socket.

    SQLite answers 503 'database is locked' under the concurrent writes of even one flow run (a 2 s client
    retry); PostgreSQL does not, and it is what a scaled-out deployment uses anyway.
    """
    with psycopg.connect(admin_conninfo(pg, "postgres"), autocommit=True, connect_timeout=5) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)).fetchone():
            conn.execute(f"CREATE DATABASE {PG_DATABASE}")
    return f"postgresql+asyncpg://postgres@/{PG_DATABASE}?host={pg.paths['socket_dir']}&port={pg.port}"


def cache_dir() -> Path:
    """$RUNBOOK_SANDBOX_CACHE_DIR, else $XDG_CACHE_HOME/runbook/sandbox (default ~/.cache/runbook/sandbox)."""
    explicit = os.environ.get("RUNBOOK_SANDBOX_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "runbook" / "sandbox"


def template_db() -> Path:
    """The cached, already migrated database for this Prefect version."""
    return cache_dir() / f"prefect-{importlib.metadata.version('prefect')}.db"


def save_template(db: Path) -> None:
    """Snapshot a running server's freshly migrated DB with SQLite's online backup; best effort."""
    target = template_db()
    with contextlib.suppress(OSError, sqlite3.Error):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        os.close(fd)
        try:
            with (
                contextlib.closing(sqlite3.connect(db, timeout=5)) as src,
                contextlib.closing(sqlite3.connect(tmp)) as dst,
            ):
                src.backup(dst)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)


class PrefectServer(Service):
    name = "prefect"
    uses = ("postgres",)
    requirements = (
        Requirement(str(prefect_executable()), "prefect", f"{sys.executable} -m pip install prefect", kind="Python"),
    )

    def start(self, state: Path, port: int, peers: dict[str, ServiceRecord] | None = None) -> ServiceRecord:
        home = self.fresh_dir(state)
        auth_file = state / AUTH_FILE  # beside state.json, kept while the sandbox lives (`down` removes it)
        if peers and "postgres" in peers:
            return self._start(home, port, auth_file, postgres_database_url(peers["postgres"]))
        template = template_db()
        from_template = template.is_file()
        if from_template:
            shutil.copyfile(template, home / DB_FILE)
        try:
            record = self._start(home, port, auth_file)
        except SandboxError as exc:
            if from_template:  # a bad template must not break every later up: the next one migrates afresh
                template.unlink(missing_ok=True)
                raise SandboxError(f"{exc}\n(removed the cached template {template})") from exc
            raise
        if not from_template:
            save_template(home / DB_FILE)
        return record

    def _start(self, home: Path, port: int, auth_file: Path, database_url: str | None = None) -> ServiceRecord:
        log = home / LOG_FILE
        auth = ensure_auth_string(auth_file)
        try:
            proc = process.adopt(start_prefect_server(home, port, auth, database_url, START_TIMEOUT_S))
        except DaemonFailed as exc:
            raise process.failure(str(exc), log) from None
        return ServiceRecord(
            name=self.name, pid=proc.pid, port=port, log_file=str(log),
            paths={"home": str(home), "database": database_url or str(home / DB_FILE), "auth_file": str(auth_file)},
            cmdline_markers=[prefect_server_command(port)[0], "server start", f"--port {port}"],
            proc_start=start_ticks(proc.pid), running=True,
        )

    def is_healthy(self, record: ServiceRecord) -> bool:
        """Answers, and demands the sandbox's auth string: a server from before authentication was on is
        restarted by `up`, not reused."""
        auth = read_auth_string(Path(record.paths["auth_file"])) if "auth_file" in record.paths else None
        return is_healthy(record.port) and auth is not None and demands_auth(record.port, auth)


SERVICE = PrefectServer()
