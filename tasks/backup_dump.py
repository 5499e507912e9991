"""Taking a backup: pg_dump of a database, gzip-compressed, streamed into the store with its checksum and manifest.

Privileges: the engine's DSN, a role with ``pg_read_all_data`` (no superuser). pg_dump gets an argument list with the
password in its environment, never on its command line. A failed backup leaves no file that looks good: the dump is
written under a temporary name and given its final name last, after its sidecars.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

import psycopg

from runbook.engine.clients import database_name, postgres, postgres_program
from runbook.engine.config import Environment
from runbook.engine.errors import RemediationFailed, TargetUnreachable
from runbook.engine.progress import say
from tasks.backup_files import BACKUP_NAME, MANIFEST_FORMAT, PARTIAL_SUFFIX, Manifest, backup_name, side_name, utc_stamp
from tasks.backup_store import CHUNK, BackupStore
from tasks.database_shape import read_shape
from tasks.program_runs import Watchdog, error_summary

PROGRESS_EVERY_S = 5.0  # a progress line in the run's log while a long dump streams


def take_backup(env: Environment, database: str, store: BackupStore, *, purpose: str = "backup",
                timeout_s: float = 3600.0, name: str | None = None) -> Manifest:
    """pg_dump the database into the store; returns the manifest. A failed backup leaves no file that looks good.

    The key row counts are taken in the very snapshot pg_dump dumps (``--snapshot``), so a restore of this file
    must reproduce them exactly. Bytes flow pg_dump (gzip) -> sha256 -> store in 1 MiB chunks.
    """
    cfg = env.database(database)
    dbname = database_name(env, database)
    if shutil.which("pg_dump") is None:
        raise RemediationFailed("pg_dump is not installed (Debian: postgresql-client-15)")
    started_at = datetime.now(UTC)
    name = name or backup_name(dbname, utc_stamp(started_at), safety=purpose == "safety")
    if not BACKUP_NAME.match(name):
        raise RemediationFailed(f"not a backup file name: {name!r}")
    temp = name + PARTIAL_SUFFIX
    if any(f.name == name for f in store.list_files()):
        raise RemediationFailed(f"{name} already exists in {store.describe()}: not overwriting a backup")
    conninfo, penv = postgres_program(env, database)
    with postgres(env, database, statement_timeout_ms=600_000) as conn:
        snapshot, info, extensions = _dump_facts(conn)
        shape = read_shape(conn, cfg.key_tables)
        with tempfile.TemporaryFile() as errf:
            proc = subprocess.Popen(
                ["pg_dump", "--format=plain", "--compress=6", f"--snapshot={snapshot}", "--no-password",
                 "--dbname", conninfo],
                stdout=subprocess.PIPE, stderr=errf, env=penv,
            )
            dog = Watchdog(proc, timeout_s)
            sha, size = hashlib.sha256(), 0
            say("pg_dump of %s to %s started", dbname, store.describe())
            next_say = time.monotonic() + PROGRESS_EVERY_S
            try:
                with store.open_new(temp) as out:
                    assert proc.stdout is not None
                    while True:
                        chunk = proc.stdout.read(CHUNK)
                        if not chunk:
                            break
                        sha.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                        if time.monotonic() >= next_say:
                            say("pg_dump of %s: %.1f MB compressed so far", dbname, size / 1e6)
                            next_say = time.monotonic() + PROGRESS_EVERY_S
                    rc = proc.wait()
                    if rc != 0 or dog.fired:
                        errf.seek(0)
                        err = error_summary(errf.read().decode(errors="replace"))
                        reason = f"timed out after {timeout_s:g} s" if dog.fired else f"exit {rc}: {err}"
                        raise RemediationFailed(f"pg_dump of {dbname} failed: {reason}")
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
                with contextlib.suppress(OSError, TargetUnreachable):
                    store.remove(temp)
                raise
            finally:
                dog.cancel()
        conn.execute("COMMIT")
    finished_at = datetime.now(UTC)
    manifest = Manifest(
        format=MANIFEST_FORMAT, file=name, database=dbname, purpose=purpose,
        server_version=info["server_version"], owner=info["owner"], encoding=info["encoding"],
        extensions=extensions, started_at=started_at.isoformat(), finished_at=finished_at.isoformat(),
        duration_s=round((finished_at - started_at).total_seconds(), 3), size_bytes=size,
        sha256=sha.hexdigest(), key_rows=shape.key_rows, tables=shape.tables,
    )
    try:
        store.write_text(side_name(name, "sha256"), f"{manifest.sha256}  {name}\n")
        store.write_text(side_name(name, "manifest.json"), manifest.to_json())
        store.publish(temp, name)  # last: a file with the final name is complete, with its sidecars beside it
    except BaseException:
        with contextlib.suppress(OSError, TargetUnreachable):
            store.remove(temp)
        raise
    return manifest


def check_dump_login(env: Environment, database: str) -> None:
    """The login pg_dump will use works: one read-only statement on the engine's DSN. A wrong password (or a
    database that is down) raises TargetUnreachable naming the environment, so a dry run reports it instead of
    planning a backup that cannot be taken."""
    with postgres(env, database) as conn:
        conn.execute("SELECT 1")


def _dump_facts(conn: psycopg.Connection[Any]) -> tuple[str, dict[str, Any], list[str]]:
    """Opens the dump's transaction: its exported snapshot, the server version, owner and encoding, extensions."""
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    snapshot = conn.execute("SELECT pg_export_snapshot() AS s").fetchone()
    info = conn.execute(
        """SELECT current_setting('server_version') AS server_version,
                  pg_get_userbyid(d.datdba) AS owner, pg_encoding_to_char(d.encoding) AS encoding
             FROM pg_database d WHERE d.datname = current_database()"""
    ).fetchone()
    assert snapshot is not None and info is not None  # each query answers one row
    extensions = [r["extname"] for r in conn.execute("SELECT extname FROM pg_extension ORDER BY 1")]
    return snapshot["s"], info, extensions


def log_line(store: BackupStore, env: Environment, text: str) -> None:
    """Append one line to the playbook's backup log (the file the runbook tails), when one is configured."""
    cfg = env.backups
    if cfg and cfg.log_file:
        with contextlib.suppress(OSError):
            store.append_line(str(cfg.log_file), f"{datetime.now(UTC).isoformat(timespec='seconds')} runbook: {text}")
