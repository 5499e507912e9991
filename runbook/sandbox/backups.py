"""Backup location and restore role for the sandbox (no process of its own: it prepares the sandbox PostgreSQL).

- a role ``runbook_restore``: LOGIN CREATEDB, member of the application role that owns the database, NOT a
  superuser: what a restore needs (create the scratch/restore database owned by the app role, restore its objects,
  rename databases) and no more;
- ``pg_stat_statements`` in ``template1`` (a DBA's one-time step), so databases a restore creates have the
  extension the seeded database uses: only a superuser may create it, the restore role may not;
- a backup directory and backup log in the state dir; with the sandbox sshd, a directory its user owns, for
  backups over SSH.
Its record borrows PostgreSQL's PID to tell whether it is still valid; ``stop`` never signals anything.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from . import net, pafar_seed
from .base import Service, ServiceRecord
from .errors import SandboxError
from .postgres import admin_conninfo
from .yaml_style import Flow

RESTORE_ROLE = "runbook_restore"
ENV_RESTORE_DSN = "RUNBOOK_SANDBOX_RESTORE_DSN"
MAINTENANCE_DB = "postgres"
RPO_HOURS = 26
VERIFY_CRON = "30 4 * * *"


class Backups(Service):
    name = "backups"
    uses = ("postgres", "sshd")

    def start(self, state: Path, port: int, peers: dict[str, ServiceRecord] | None = None) -> ServiceRecord:
        pg = (peers or {}).get("postgres")
        if pg is None:
            raise SandboxError("backups: needs the sandbox postgres (runbook sandbox up --only postgres,backups)")
        base = self.fresh_dir(state)
        local = base / "local"
        local.mkdir(mode=0o700)
        log = base / "postgres-backup.log"
        log.touch(mode=0o600)
        paths = {"base": str(base), "directory": str(local), "log_file": str(log), "pg_port": str(pg.port),
                 "pg_socket_dir": pg.paths["socket_dir"]}
        ssh = (peers or {}).get("sshd")
        if ssh is not None:
            remote = base / "remote"
            remote.mkdir(mode=0o700)
            user = pwd.getpwnam(ssh.paths["user"])
            os.chown(remote, user.pw_uid, user.pw_gid)
            paths["remote_directory"] = str(remote)
        password = secrets.token_urlsafe(18)
        try:
            _set_role(admin_conninfo(pg, MAINTENANCE_DB), password)
            with psycopg.connect(admin_conninfo(pg, "template1"), autocommit=True, connect_timeout=5) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        except psycopg.Error as exc:
            raise SandboxError(f"backups: preparing the restore role failed: {exc}") from exc
        record = ServiceRecord(
            name=self.name, pid=pg.pid, port=port, log_file=str(log), paths=paths,
            cmdline_markers=list(pg.cmdline_markers), proc_start=pg.proc_start,
        )
        record.secrets = {"restore_password": password}
        record.running = True
        return record

    def is_healthy(self, record: ServiceRecord) -> bool:
        return Path(record.paths["directory"]).is_dir() and net.port_accepts(int(record.paths["pg_port"]), 0.5)

    def stop(self, record: ServiceRecord) -> None:
        """Nothing runs: the role goes with the PostgreSQL cluster, the directories with clean()."""

    def clean(self, state: Path) -> None:
        shutil.rmtree(self.service_dir(state), ignore_errors=True)

    def reuse(self, record: ServiceRecord, env: dict[str, str]) -> None:
        dsn = env.get(ENV_RESTORE_DSN)
        parts = urlsplit(dsn) if dsn else None
        if parts is None or parts.username != RESTORE_ROLE or not parts.password:
            password = secrets.token_urlsafe(18)  # secrets.env was lost: set a new password
            conninfo = make_conninfo(host=record.paths["pg_socket_dir"], port=record.paths["pg_port"],
                                     user="postgres", dbname=MAINTENANCE_DB)
            _set_role(conninfo, password)
        else:
            password = unquote(parts.password)
        record.secrets = {"restore_password": password}

    def secrets_env(self, record: ServiceRecord) -> dict[str, str]:
        password = quote(record.secrets["restore_password"], safe="")
        return {ENV_RESTORE_DSN: f"postgresql://{RESTORE_ROLE}:{password}@{net.LOOPBACK}:"
                                 f"{record.paths['pg_port']}/{MAINTENANCE_DB}"}

    def playbook_fragment(self, record: ServiceRecord) -> dict[str, Any]:
        return {
            "databases": {"main": {"admin_dsn": Flow(env=ENV_RESTORE_DSN)}},
            "backups": {
                "directory": record.paths["directory"], "rpo_hours": RPO_HOURS,
                "log_file": record.paths["log_file"], "verify_cron": VERIFY_CRON,
            },
        }


def _set_role(superuser_conninfo: str, password: str) -> None:
    """Create (or reset) the restore role: LOGIN CREATEDB, member of the app role, never a superuser."""
    with psycopg.connect(superuser_conninfo, autocommit=True, connect_timeout=5) as conn:
        conn.execute("SET statement_timeout = '30s'")
        conn.execute("SET pg_stat_statements.track_utility = off")  # keep the password out of the stats
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (RESTORE_ROLE,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(sql.SQL(verb + " ROLE {} LOGIN CREATEDB NOSUPERUSER NOCREATEROLE PASSWORD {}").format(
            sql.Identifier(RESTORE_ROLE), sql.Literal(password)))
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(pafar_seed.APP_ROLE),
                                                      sql.Identifier(RESTORE_ROLE)))


SERVICE = Backups()
