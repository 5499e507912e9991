"""Restoring a backup into a new database (the verification's scratch copy, the data-corruption restore), and
dropping the copies a run created.

Privileges: ``admin_dsn``, a role with CREATEDB that is a member of the database owner's role, so it can create a
database owned by that role, restore objects owned by it and drop the scratch copies; never a superuser. Extensions
only a superuser may create (e.g. pg_stat_statements) must already be in ``template1``: the restore reports any it
could not recreate. Identifiers go through ``psycopg.sql``; psql gets an argument list, the password in its
environment.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import subprocess
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from psycopg import sql

from runbook.engine.clients import postgres_admin, postgres_program, try_statement
from runbook.engine.config import Environment
from runbook.engine.errors import QueryFailed, RemediationFailed
from runbook.engine.progress import say
from runbook.engine.redact import redact
from tasks.backup_checks import GunzipStream
from tasks.backup_store import CHUNK, BackupStore
from tasks.program_runs import Watchdog, stderr_summary

OBJECT_IN_USE = "55006"  # SQLSTATE: a database some session (autovacuum, a closing one) still holds
_EXTENSION_LINE = re.compile(rb"^CREATE EXTENSION IF NOT EXISTS (\"?[A-Za-z0-9_-]+\"?) WITH SCHEMA (\S+);$")


def derived_db_name(dbname: str, purpose: str, stamp: str, unique: bool = False) -> str:
    """``<db>_<purpose>_<yyyymmddhhmmss>[_<4 hex>]``, cut to PostgreSQL's 63-byte identifier limit."""
    tail = f"_{purpose}_{stamp.lower().replace('t', '').rstrip('z')}" + (f"_{secrets.token_hex(2)}" if unique else "")
    return dbname[: 63 - len(tail)] + tail


@dataclass(frozen=True)
class RestoreResult:
    """The database restored, how long it took, and the extensions the restore role could not recreate."""

    database: str
    seconds: float
    skipped_extensions: list[str] = field(default_factory=list)


def _split_preamble(gz: GunzipStream, fh: IO[bytes], limit: int = 4 << 20) -> tuple[list[bytes], bytes]:
    """Decode the start of the dump up to its first table-level statement: (preamble lines, the decoded rest)."""
    markers = (b"\nSET default_table_access_method", b"\nCREATE TABLE", b"\nCOPY ")
    buf, ended = b"", False
    while not any(m in buf for m in markers) and len(buf) < limit:
        chunk = fh.read(CHUNK)
        if not chunk:
            buf += b"".join(gz.drain())
            ended = True
            break
        buf += b"".join(gz.feed(chunk))
    found = [i for i in (buf.find(m) for m in markers) if i >= 0]
    cut = min(found) + 1 if found else (len(buf) if ended else buf.rfind(b"\n") + 1)
    return buf[:cut].split(b"\n"), buf[cut:]


def restore_backup(env: Environment, database: str, store: BackupStore, name: str, target_db: str,
                   owner: str | None, timeout_s: float = 3600.0, created: list[str] | None = None) -> RestoreResult:
    """Create ``target_db`` (owned by ``owner``) and stream the backup into it through psql; ON_ERROR_STOP.

    Extensions: ``CREATE EXTENSION`` lines of the dump run only for extensions the admin role may create or that the
    template already has; the others are skipped and reported; ``COMMENT ON EXTENSION`` (owner-only, cosmetic) is
    left out. ``target_db`` is appended to ``created`` once it exists: the caller drops it (and only it) when this
    raises, so a name clash never makes a caller drop a database someone else created.
    """
    started = time.perf_counter()
    say("restoring %s into a new database %s", name, target_db)
    with postgres_admin(env, database) as admin:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target_db))
        if owner:
            query += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        admin.execute(query)
    if created is not None:
        created.append(target_db)
    conninfo, penv = postgres_program(env, database, admin=True, dbname=target_db)
    skipped: list[str] = []
    with store.open_read(name) as fh:
        gz = GunzipStream()
        try:
            lines, rest = _split_preamble(gz, fh)
        except (zlib.error, ValueError) as exc:
            raise RemediationFailed(f"backup {name} cannot be decoded: {_first_line(exc)}") from None
        with postgres_admin(env, database, dbname=target_db) as tconn:
            have = {r["extname"] for r in tconn.execute("SELECT extname FROM pg_extension")}
            kept: list[bytes] = []
            for line in lines:
                m = _EXTENSION_LINE.match(line)
                if m:
                    ext = m.group(1).decode().strip('"')
                    if ext not in have:
                        refused = try_statement(tconn, sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(
                            sql.Identifier(ext)))
                        if refused:
                            skipped.append(f"{ext} ({refused})")
                    continue
                if line.startswith(b"COMMENT ON EXTENSION "):
                    continue
                kept.append(line)
        with tempfile.NamedTemporaryFile(prefix="runbook-psql-", suffix=".err") as errf:
            proc = subprocess.Popen(
                ["psql", "-X", "-q", "--no-password", "-v", "ON_ERROR_STOP=1", "--dbname", conninfo],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errf, env=penv,
            )
            dog = Watchdog(proc, timeout_s)
            assert proc.stdin is not None
            decode_error = ""
            try:
                proc.stdin.write(b"\n".join(kept))
                proc.stdin.write(rest)
                while True:
                    chunk = fh.read(CHUNK)
                    if not chunk:
                        for out in gz.drain():
                            proc.stdin.write(out)
                        break
                    for out in gz.feed(chunk):
                        proc.stdin.write(out)
                if not gz.complete:
                    decode_error = "backup file is truncated"
                    proc.kill()
            except (zlib.error, ValueError) as exc:
                decode_error = f"backup file is corrupted: {_first_line(exc)}"
                proc.kill()
            except BrokenPipeError:
                pass  # psql stopped (ON_ERROR_STOP or killed): its exit code and stderr say why
            finally:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
                rc = proc.wait()
                dog.cancel()
            if decode_error:
                raise RemediationFailed(f"restore into {target_db} stopped: {decode_error}")
            if dog.fired:
                raise RemediationFailed(f"restore into {target_db} timed out after {timeout_s:g} s")
            if rc != 0:
                raise RemediationFailed(f"restore into {target_db} failed (psql exit {rc}): "
                                        f"{stderr_summary(Path(errf.name))}")
    return RestoreResult(database=target_db, seconds=time.perf_counter() - started, skipped_extensions=skipped)


def drop_database(env: Environment, database: str, name: str, created_by_us: str) -> None:
    """Drop a scratch/restore database this run created (``name`` must carry the run's ``created_by_us`` marker)."""
    if created_by_us not in name:
        raise RemediationFailed(f"refusing to drop {name}: not a database this run created")
    for attempt in range(3):  # an autovacuum worker or a closing session can hold it for a moment
        try:
            with postgres_admin(env, database) as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            return
        except QueryFailed as exc:
            if exc.sqlstate != OBJECT_IN_USE or attempt == 2:
                raise
            time.sleep(1.0)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return redact(lines[0] if lines else type(exc).__name__)[:300]
