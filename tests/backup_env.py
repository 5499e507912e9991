"""Test helper: a small Pafar database of its own (``pafar_bk``) and a playbook environment ``bk`` for backup tests.

The backup, verification and restore tests rename, corrupt and restore a database; they do it to their own small
copy on the sandbox's real PostgreSQL (same schema and roles as ``pafar``) so the seeded ``pafar`` other tests use
is never touched, and a restore takes a fraction of a second. The environment is the sandbox's (same restore role,
same sshd, same Docker API when the sandbox runs Podman) with the database and backup directory swapped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from runbook.engine.config import Environment, load_playbooks
from runbook.sandbox import SandboxState, pafar_seed

DB = "pafar_bk"
ENV = "bk"
DSN_VAR = "RUNBOOK_TEST_BK_DSN"
APP_DSN_VAR = "RUNBOOK_TEST_BK_APP_DSN"
KEY_TABLES = ["users", "bookings", "payments"]
ROWS = {"users": 2000, "bookings": 30000, "payments": 15000}

DATA = [
    f"""INSERT INTO users (id, email, full_name, created_at)
        SELECT md5('user' || i)::uuid, 'user' || i || '@example.com', 'User ' || i,
               timestamptz '2024-01-01 00:00:00+00' + i * interval '17 minutes'
          FROM generate_series(1::bigint, {ROWS['users']}) AS i""",
    f"""INSERT INTO bookings (id, user_id, status, amount, created_at)
        SELECT i, md5('user' || (1 + (i * 7919) % {ROWS['users']}))::uuid,
               (ARRAY['completed', 'confirmed', 'pending', 'cancelled'])[1 + i % 4], (i % 50000) / 100.0,
               timestamptz '2024-01-01 00:00:00+00' + i * interval '47 seconds'
          FROM generate_series(1::bigint, {ROWS['bookings']}) AS i""",
    f"""INSERT INTO payments (id, booking_id, status, amount, provider, created_at)
        SELECT i, 2 * i, (ARRAY['succeeded', 'failed', 'refunded'])[1 + i % 3], (i % 50000) / 100.0,
               (ARRAY['stripe', 'paypal', 'mpesa'])[1 + i % 3],
               timestamptz '2024-01-01 00:05:00+00' + i * interval '94 seconds'
          FROM generate_series(1::bigint, {ROWS['payments']}) AS i""",
]


def superuser(state: SandboxState, dbname: str = "postgres") -> psycopg.Connection:
    rec = state.services["postgres"]
    return psycopg.connect(make_conninfo(host=rec.paths["socket_dir"], port=rec.port, user="postgres",
                                         dbname=dbname), autocommit=True, connect_timeout=5)


def databases(state: SandboxState, like: str = DB + "%") -> set[str]:
    with superuser(state) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (like,))}


def drop_all(state: SandboxState) -> None:
    """Test cleanup (as the superuser: the engine itself never drops these)."""
    with superuser(state) as conn:
        for name in databases(state):
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def create_db(state: SandboxState) -> None:
    """A fresh ``pafar_bk`` owned by the app role, with the seed schema and a small deterministic data set."""
    drop_all(state)
    with superuser(state) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DB),
                                                                   sql.Identifier(pafar_seed.APP_ROLE)))
    with superuser(state, DB) as conn, conn.transaction():
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(pafar_seed.APP_ROLE)))
        conn.execute(pafar_seed.SCHEMA)
        for stmt in DATA:
            conn.execute(stmt)


def row_counts(state: SandboxState, dbname: str = DB) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    with superuser(state, dbname) as conn:
        for t in KEY_TABLES:
            exists = conn.execute("SELECT to_regclass(%s)", (f"public.{t}",)).fetchone()[0]
            out[t] = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t))).fetchone()[0] \
                if exists else None
    return out


def corrupt(state: SandboxState) -> None:
    """The incident: a tenth of the bookings deleted, the payments table dropped."""
    with superuser(state, DB) as conn:
        conn.execute("DELETE FROM bookings WHERE id % 10 = 0")
        conn.execute("DROP TABLE payments")


def _with_db(dsn: str, dbname: str) -> str:
    parts = conninfo_to_dict(dsn)
    parts["dbname"] = dbname
    return make_conninfo(**parts)


@contextmanager
def backup_env(state: SandboxState, *, ssh: bool = False, name: str = ENV,
               extra: dict[str, Any] | None = None) -> Iterator[tuple[Environment, Path]]:
    """Environment ``name`` (RUNBOOK_PLAYBOOKS points at it while the block runs) and its backup directory.

    ssh=True keeps the backups on the sandbox sshd's host (app-1) in a directory its user owns.
    """
    doc = yaml.safe_load(state.playbook_path.read_text())
    sbx = doc["environments"]["sandbox"]
    tmp = Path(tempfile.mkdtemp(prefix="runbook-bk-"))
    tmp.chmod(0o755)
    secrets = state.env_vars()
    secrets[DSN_VAR] = _with_db(secrets["RUNBOOK_SANDBOX_DB_DSN"], DB)
    secrets[APP_DSN_VAR] = _with_db(secrets["RUNBOOK_SANDBOX_APP_DSN"], DB)
    (tmp / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in secrets.items()))
    (tmp / "secrets.env").chmod(0o600)
    if ssh:
        remote = Path(state.services["backups"].paths["remote_directory"]) / name
        directory = remote
        _run_as_ssh_user(state, ["mkdir", "-p", str(remote)])
    else:
        directory = tmp / "backups"
        directory.mkdir()
    env: dict[str, Any] = {
        "env_file": "secrets.env",
        "databases": {"main": {"dsn": {"env": DSN_VAR}, "admin_dsn": {"env": "RUNBOOK_SANDBOX_RESTORE_DSN"},
                               "key_tables": KEY_TABLES, "connect_timeout_s": 3, "statement_timeout_ms": 10000}},
        "backups": {"directory": str(directory), "rpo_hours": 26, "log_file": str(tmp / "postgres-backup.log"),
                    "verify_cron": "30 4 * * *", **({"ssh_host": "app-1"} if ssh else {})},
        "services": sbx.get("services", {}),
    }
    for key in ("docker", "ssh_hosts"):
        if key in sbx:
            env[key] = sbx[key]
    env.update(extra or {})
    if ssh:  # the log lives on the SSH host too
        env["backups"]["log_file"] = str(directory / "postgres-backup.log")
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump({"environments": {name: env}}, sort_keys=False))
    before = os.environ.get("RUNBOOK_PLAYBOOKS")
    os.environ["RUNBOOK_PLAYBOOKS"] = str(tmp)
    try:
        yield load_playbooks().environment(name), directory
    finally:
        if before is None:
            os.environ.pop("RUNBOOK_PLAYBOOKS", None)
        else:
            os.environ["RUNBOOK_PLAYBOOKS"] = before
        shutil.rmtree(tmp, ignore_errors=True)
        if ssh:
            shutil.rmtree(directory, ignore_errors=True)


def _run_as_ssh_user(state: SandboxState, cmd: list[str]) -> None:
    import subprocess

    user = state.services["sshd"].paths["user"]
    subprocess.run(["runuser", "-u", user, "--", *cmd], check=True, timeout=10)
