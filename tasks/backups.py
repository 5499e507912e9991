"""PostgreSQL backups: take one (pg_dump, gzip, streamed), check one (streamed gzip + checksum + dump trailer),
list them, restore one into a new database, and describe a database's shape (tables, columns, key row counts).

Privileges. Taking a backup and reading shapes use the engine's DSN: a role with ``pg_read_all_data`` (no
superuser). Restores (the verification's scratch database and the data-corruption restore) use ``admin_dsn``: a role
with CREATEDB that is a member of the database owner's role, so it can create a database owned by that role, restore
objects owned by it, rename the database and drop the scratch copies; never a superuser. Extensions only a
superuser may create (e.g. pg_stat_statements) must already be in ``template1``: the restore reports any it could not
recreate. Nothing here builds SQL or a command line from outside text: identifiers go through ``psycopg.sql``, and
pg_dump/psql get argument lists, with the password in their environment, never on the command line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from runbook.engine.clients import APPLICATION_NAME, postgres
from runbook.engine.config import Environment
from runbook.engine.errors import ConfigError, RemediationFailed, TargetUnreachable
from runbook.engine.redact import redact
from tasks.backup_store import CHUNK, BackupStore, StoredFile

SUFFIX = ".sql.gz"
PARTIAL_SUFFIX = ".partial"
MANIFEST_FORMAT = 1
DUMP_HEADER = b"--\n-- PostgreSQL database dump"
DUMP_TRAILER = b"-- PostgreSQL database dump complete"
_OUT_MAX = 1 << 20  # decompressed bytes per step: memory stays flat whatever the compression ratio
_TAIL = 512
_CREATE_TABLE = b"\nCREATE TABLE "
_BACKUP_NAME = re.compile(r"^(?P<db>[A-Za-z0-9_-]+)-(?P<stamp>\d{8}T\d{6}Z)(?P<safety>-safety)?\.sql\.gz$")
_EXTENSION_LINE = re.compile(rb"^CREATE EXTENSION IF NOT EXISTS (\"?[A-Za-z0-9_-]+\"?) WITH SCHEMA (\S+);$")
PG_AMCHECK = Path("/usr/lib/postgresql/15/bin/pg_amcheck")


# ------------------------------------------------------------------ connections and names


def dsn_parts(env: Environment, database: str, admin: bool = False) -> dict[str, Any]:
    """The conninfo of the engine (or admin) DSN as a dict; the password stays in it and must never be printed."""
    cfg = env.database(database)
    if admin:
        if cfg.admin_dsn is None:
            raise ConfigError(
                f"{env.source}: environments.{env.name}.databases.{database}.admin_dsn: not configured (restores "
                "need a role with CREATEDB that is a member of the database owner's role)")
        value = env.resolve_secret(cfg.admin_dsn, f"databases.{database}.admin_dsn")
    else:
        value = env.resolve_secret(cfg.dsn, f"databases.{database}.dsn")
    return conninfo_to_dict(value)


def database_name(env: Environment, database: str) -> str:
    """The server-side name of the playbook's database (the DSN's dbname)."""
    name = dsn_parts(env, database).get("dbname")
    if not name:
        raise ConfigError(f"{env.source}: environments.{env.name}.databases.{database}.dsn: names no database")
    return str(name)


def client_env(parts: dict[str, Any], timeout_s: float) -> tuple[str, dict[str, str]]:
    """(conninfo without the password, environment with PGPASSWORD) for pg_dump/psql/pg_amcheck."""
    parts = dict(parts)
    password = parts.pop("password", None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({"PGCONNECT_TIMEOUT": str(max(2, math.ceil(timeout_s))), "PGAPPNAME": APPLICATION_NAME})
    if password:
        env["PGPASSWORD"] = str(password)
    return make_conninfo(**parts), env


@contextlib.contextmanager
def admin_connection(env: Environment, database: str, dbname: str | None = None,
                     statement_timeout_ms: int = 60_000) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """A connection with the admin DSN (to its maintenance database, or ``dbname``), autocommit, with timeouts."""
    cfg = env.database(database)
    parts = dsn_parts(env, database, admin=True)
    if dbname:
        parts["dbname"] = dbname
    target = f"database {env.name}/{database} (admin)"
    started = time.monotonic()
    try:
        conn = psycopg.connect(
            make_conninfo(**parts), autocommit=True, row_factory=dict_row,
            connect_timeout=max(1, math.ceil(cfg.connect_timeout_s)), application_name=APPLICATION_NAME,
            options=f"-c statement_timeout={int(statement_timeout_ms)} -c lock_timeout=10000",
        )
    except psycopg.OperationalError as exc:
        raise TargetUnreachable(target, f"{_first_line(exc)} after {time.monotonic() - started:.1f} s") from None
    try:
        yield conn
    except psycopg.OperationalError as exc:
        if not conn.broken:
            raise
        raise TargetUnreachable(target, _first_line(exc)) from None
    finally:
        conn.close()


def _first_line(exc: BaseException | str) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return redact(lines[0] if lines else type(exc).__name__)[:300]


def utc_stamp(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def backup_name(dbname: str, stamp: str, safety: bool = False) -> str:
    return f"{dbname}-{stamp}{'-safety' if safety else ''}{SUFFIX}"


def side_name(backup: str, kind: str) -> str:
    """Sidecar files: ``<backup>.sha256``, ``<backup>.manifest.json``, ``<backup>.verify.json``."""
    return f"{backup}.{kind}"


def derived_db_name(dbname: str, purpose: str, stamp: str, unique: bool = False) -> str:
    """``<db>_<purpose>_<yyyymmddhhmmss>[_<4 hex>]``, cut to PostgreSQL's 63-byte identifier limit."""
    tail = f"_{purpose}_{stamp.lower().replace('t', '').rstrip('z')}" + (f"_{secrets.token_hex(2)}" if unique else "")
    return dbname[: 63 - len(tail)] + tail


# ------------------------------------------------------------------ listing


@dataclass
class BackupEntry:
    """One complete backup file in the store with its sidecars (manifest, checksum, last verification)."""

    file: StoredFile
    manifest: dict[str, Any] | None = None
    manifest_error: str = ""
    checksum: str | None = None
    verification: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def purpose(self) -> str:
        if self.manifest and self.manifest.get("purpose"):
            return str(self.manifest["purpose"])
        m = _BACKUP_NAME.match(self.name)
        return "safety" if m and m.group("safety") else "backup"

    @property
    def database(self) -> str | None:
        if self.manifest:
            return self.manifest.get("database")
        m = _BACKUP_NAME.match(self.name)
        return m.group("db") if m else None

    @property
    def taken_at(self) -> datetime:
        if self.manifest and self.manifest.get("finished_at"):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(self.manifest["finished_at"])
        return self.file.mtime

    def age_hours(self, now: datetime | None = None) -> float:
        return ((now or datetime.now(UTC)) - self.taken_at).total_seconds() / 3600


def list_backups(store: BackupStore, dbname: str | None = None) -> tuple[list[BackupEntry], list[StoredFile]]:
    """Complete backups (newest first; of ``dbname`` when given) and unfinished temp files left in the store."""
    files = store.list_files()
    names = {f.name for f in files}
    entries: list[BackupEntry] = []
    partials = [f for f in files if f.name.endswith(SUFFIX + PARTIAL_SUFFIX)]
    for f in files:
        if not f.name.endswith(SUFFIX) or f.name.startswith("."):
            continue
        entry = BackupEntry(file=f)
        if side_name(f.name, "manifest.json") in names:
            raw = store.read_text(side_name(f.name, "manifest.json"))
            try:
                entry.manifest = json.loads(raw or "")
                if not isinstance(entry.manifest, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                entry.manifest, entry.manifest_error = None, f"manifest unreadable: {exc}"
        if side_name(f.name, "sha256") in names:
            text = (store.read_text(side_name(f.name, "sha256")) or "").split()
            entry.checksum = text[0].lower() if text else ""
        if side_name(f.name, "verify.json") in names:
            with contextlib.suppress(ValueError):
                entry.verification = json.loads(store.read_text(side_name(f.name, "verify.json")) or "")
        m = _BACKUP_NAME.match(f.name)
        named_for = m.group("db") if m else None
        if dbname is None or dbname in (named_for, entry.database) or (named_for is None and entry.database is None):
            entries.append(entry)  # a file named for this database whose manifest says otherwise is kept: flagged
    entries.sort(key=lambda e: e.taken_at, reverse=True)
    return entries, partials


# ------------------------------------------------------------------ shapes


def read_shape(conn: psycopg.Connection[dict[str, Any]], key_tables: list[str]) -> dict[str, Any]:
    """User tables with their columns (name, type), and exact row counts of the key tables (None: missing)."""
    rows = conn.execute(
        """SELECT n.nspname || '.' || c.relname AS tbl, a.attname, format_type(a.atttypid, a.atttypmod) AS type
             FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
            WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg\\_%'
              AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
            ORDER BY 1, a.attnum"""
    ).fetchall()
    tables: dict[str, list[list[str]]] = {}
    for r in rows:
        tables.setdefault(r["tbl"], []).append([r["attname"], r["type"]])
    key_rows: dict[str, int | None] = {}
    for name in key_tables:
        if f"public.{name}" in tables:
            key_rows[name] = conn.execute(
                sql.SQL("SELECT count(*) AS n FROM {}.{}").format(sql.Identifier("public"), sql.Identifier(name))
            ).fetchone()["n"]
        else:
            key_rows[name] = None
    return {"tables": tables, "key_rows": key_rows}


def compare_shapes(expected: dict[str, Any], actual: dict[str, Any],
                   row_tolerance_pct: float = 0.0) -> list[str]:
    """Differences that matter, in words: missing tables or columns, changed types, key row counts off."""
    problems: list[str] = []
    exp_t, act_t = expected.get("tables", {}), actual.get("tables", {})
    for t in sorted(set(exp_t) - set(act_t)):
        problems.append(f"table {t} missing")
    for t in sorted(set(exp_t) & set(act_t)):
        exp_c, act_c = dict(map(tuple, exp_t[t])), dict(map(tuple, act_t[t]))
        for col in exp_c:
            if col not in act_c:
                problems.append(f"column {t}.{col} missing")
            elif exp_c[col] != act_c[col]:
                problems.append(f"column {t}.{col} changed type {exp_c[col]} -> {act_c[col]}")
    for name, want in (expected.get("key_rows") or {}).items():
        got = (actual.get("key_rows") or {}).get(name)
        if want is None or got is None:
            continue
        allowed = want * row_tolerance_pct / 100
        if abs(got - want) > allowed:
            problems.append(f"{name}: {got} rows, expected {want}" + (f" (±{row_tolerance_pct:g}%)"
                                                                       if row_tolerance_pct else ""))
    return problems


# ------------------------------------------------------------------ streaming gzip


@dataclass
class StreamCheck:
    """What a streamed pass over a backup file found. ``problems`` are (kind, message); empty means intact."""

    compressed_bytes: int = 0
    uncompressed_bytes: int = 0
    sha256: str = ""
    tables_in_dump: int = 0
    head: bytes = b""
    tail: bytes = b""
    seconds: float = 0.0
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class GunzipStream:
    """Incremental gzip decoding with bounded output per step (zlib does the work, CRC and length included).

    Hand-written around ``zlib.decompressobj`` because ``gzip.GzipFile`` cannot tell a truncated stream from a
    corrupt one in its errors and reads ahead unboundedly; here each failure keeps its own clear reason.
    """

    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=31)
        self._between = False  # a member ended: the next bytes must start another member (or nothing)
        self._pending = b""  # 1 byte that may be the start of the next member's magic
        self.members = 0
        self.fed = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Yield decompressed pieces of at most 1 MiB; raises zlib.error (corrupt) or ValueError (trailing data)."""
        self.fed += len(data)
        buf = self._pending + data
        self._pending = b""
        while buf:
            if self._between:
                if len(buf) < 2:
                    self._pending = buf
                    return
                if not buf.startswith(b"\x1f\x8b"):
                    raise ValueError(f"{len(buf)} bytes of trailing data after the gzip stream")
                self._d, self._between = zlib.decompressobj(wbits=31), False
            out = self._d.decompress(buf, _OUT_MAX)
            if out:
                yield out
            if self._d.eof:
                self.members += 1
                self._between = True
                buf = self._d.unused_data
            else:
                buf = self._d.unconsumed_tail

    def drain(self) -> Iterator[bytes]:
        """Decompressed bytes still buffered inside zlib after the last input."""
        while not self._between:
            out = self._d.decompress(b"", _OUT_MAX)
            if not out:
                return
            yield out
            if self._d.eof:
                self.members += 1
                self._between = True

    @property
    def trailing(self) -> int:
        return len(self._pending)

    @property
    def complete(self) -> bool:
        """Every member ended and nothing is left over."""
        return self._between and self.members > 0 and not self._pending


def check_stream(fh: IO[bytes], expected_sha256: str | None = None) -> StreamCheck:
    """Stream a backup once: sha256 of the file, gzip integrity (CRC, length, truncation), dump header/trailer."""
    started = time.perf_counter()
    res = StreamCheck()
    sha = hashlib.sha256()
    gz = GunzipStream()
    carry = b""
    try:
        while True:
            chunk = fh.read(CHUNK)
            if not chunk:
                break
            sha.update(chunk)
            res.compressed_bytes += len(chunk)
            for out in gz.feed(chunk):
                _observe(res, out, carry)
                carry = out[-(len(_CREATE_TABLE) - 1):]
        for out in gz.drain():
            _observe(res, out, carry)
            carry = out[-(len(_CREATE_TABLE) - 1):]
    except zlib.error as exc:
        res.problems.append(("corrupted", f"corrupted: gzip stream broken at or before byte {gz.fed}: "
                                          f"{str(exc).split(': ', 1)[-1]}"))
        _finish_sha(res, fh, sha)
    except ValueError as exc:
        res.problems.append(("corrupted", f"corrupted: {exc}"))
        _finish_sha(res, fh, sha)
    res.sha256 = sha.hexdigest()
    if not res.problems:
        if res.compressed_bytes == 0:
            res.problems.append(("empty", "empty: the file has 0 bytes"))
        elif gz.members and gz.trailing:
            res.problems.append(("corrupted", f"corrupted: {gz.trailing} byte(s) of trailing data after the gzip "
                                              "stream"))
        elif not gz.complete:
            res.problems.append(("truncated", f"truncated: the gzip stream ends early (file is "
                                              f"{res.compressed_bytes} bytes, no end-of-stream marker)"))
        elif res.uncompressed_bytes == 0:
            res.problems.append(("empty", "empty: a valid gzip file that contains nothing"))
        elif not res.head.startswith(DUMP_HEADER):
            res.problems.append(("not-a-dump", "not a pg_dump plain SQL dump (no 'PostgreSQL database dump' header)"))
        elif DUMP_TRAILER not in res.tail:
            res.problems.append(("dump-incomplete", "dump incomplete: gzip is intact but pg_dump did not finish "
                                                    "(no 'dump complete' trailer)"))
        elif res.tables_in_dump == 0:
            res.problems.append(("empty", "empty: the dump contains no tables"))
    if expected_sha256 is not None and res.sha256 != expected_sha256:
        res.problems.append(("checksum-mismatch", f"checksum mismatch: file sha256 {res.sha256[:16]}…, "
                                                  f"checksum file says {expected_sha256[:16]}…"))
    res.seconds = time.perf_counter() - started
    return res


def _observe(res: StreamCheck, out: bytes, carry: bytes) -> None:
    if len(res.head) < 64:
        res.head += out[: 64 - len(res.head)]
    res.uncompressed_bytes += len(out)
    res.tail = (res.tail + out)[-_TAIL:] if len(out) < _TAIL else out[-_TAIL:]
    res.tables_in_dump += (carry + out).count(_CREATE_TABLE)


def _finish_sha(res: StreamCheck, fh: IO[bytes], sha: Any) -> None:
    """Keep hashing after a decode error so the checksum comparison still says whether the file changed."""
    while True:
        chunk = fh.read(CHUNK)
        if not chunk:
            return
        sha.update(chunk)
        res.compressed_bytes += len(chunk)


# ------------------------------------------------------------------ taking a backup


@dataclass
class _Watchdog:
    """Kills a child process when its deadline passes (a blocked pipe write cannot time out by itself)."""

    proc: subprocess.Popen[bytes]
    timeout_s: float
    fired: bool = False

    def __post_init__(self) -> None:
        self._timer = threading.Timer(self.timeout_s, self._kill)
        self._timer.daemon = True
        self._timer.start()

    def _kill(self) -> None:
        self.fired = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def cancel(self) -> None:
        self._timer.cancel()


def _stderr_summary(path: Path) -> str:
    try:
        return _error_summary(path.read_text(errors="replace"))
    except OSError:
        return ""


def _error_summary(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "ERROR" in ln or "FATAL" in ln or "error:" in ln]
    return redact((errors or lines or [""])[0].strip())[:400]


def take_backup(env: Environment, database: str, store: BackupStore, *, purpose: str = "backup",
                timeout_s: float = 3600.0, name: str | None = None) -> dict[str, Any]:
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
    if not _BACKUP_NAME.match(name):
        raise RemediationFailed(f"not a backup file name: {name!r}")
    temp = name + PARTIAL_SUFFIX
    if any(f.name == name for f in store.list_files()):
        raise RemediationFailed(f"{name} already exists in {store.describe()}: not overwriting a backup")
    conninfo, penv = client_env(dsn_parts(env, database), cfg.connect_timeout_s)
    with postgres(env, database, statement_timeout_ms=600_000) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snapshot = conn.execute("SELECT pg_export_snapshot() AS s").fetchone()["s"]
        info = conn.execute(
            """SELECT current_setting('server_version') AS server_version,
                      pg_get_userbyid(d.datdba) AS owner, pg_encoding_to_char(d.encoding) AS encoding
                 FROM pg_database d WHERE d.datname = current_database()"""
        ).fetchone()
        extensions = [r["extname"] for r in conn.execute("SELECT extname FROM pg_extension ORDER BY 1")]
        shape = read_shape(conn, cfg.key_tables)
        with tempfile.TemporaryFile() as errf:
            proc = subprocess.Popen(
                ["pg_dump", "--format=plain", "--compress=6", f"--snapshot={snapshot}", "--no-password",
                 "--dbname", conninfo],
                stdout=subprocess.PIPE, stderr=errf, env=penv,
            )
            dog = _Watchdog(proc, timeout_s)
            sha, size = hashlib.sha256(), 0
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
                    rc = proc.wait()
                    if rc != 0 or dog.fired:
                        errf.seek(0)
                        err = _error_summary(errf.read().decode(errors="replace"))
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
    manifest = {
        "format": MANIFEST_FORMAT, "file": name, "database": dbname, "purpose": purpose,
        "server_version": info["server_version"], "owner": info["owner"], "encoding": info["encoding"],
        "extensions": extensions, "started_at": started_at.isoformat(), "finished_at": finished_at.isoformat(),
        "duration_s": round((finished_at - started_at).total_seconds(), 3), "size_bytes": size,
        "sha256": sha.hexdigest(), "key_rows": shape["key_rows"], "tables": shape["tables"],
    }
    try:
        store.write_text(side_name(name, "sha256"), f"{manifest['sha256']}  {name}\n")
        store.write_text(side_name(name, "manifest.json"), json.dumps(manifest, indent=1) + "\n")
        store.publish(temp, name)  # last: a file with the final name is complete, with its sidecars beside it
    except BaseException:
        with contextlib.suppress(OSError, TargetUnreachable):
            store.remove(temp)
        raise
    return manifest


def log_line(store: BackupStore, env: Environment, text: str) -> None:
    """Append one line to the playbook's backup log (the file the runbook tails), when one is configured."""
    cfg = env.backups
    if cfg and cfg.log_file:
        with contextlib.suppress(OSError):
            store.append_line(str(cfg.log_file), f"{datetime.now(UTC).isoformat(timespec='seconds')} runbook: {text}")


# ------------------------------------------------------------------ restoring


@dataclass
class RestoreResult:
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
    cfg = env.database(database)
    started = time.perf_counter()
    with admin_connection(env, database) as admin:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target_db))
        if owner:
            query += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        admin.execute(query)
    if created is not None:
        created.append(target_db)
    parts = dsn_parts(env, database, admin=True)
    parts["dbname"] = target_db
    conninfo, penv = client_env(parts, cfg.connect_timeout_s)
    skipped: list[str] = []
    with store.open_read(name) as fh:
        gz = GunzipStream()
        try:
            lines, rest = _split_preamble(gz, fh)
        except (zlib.error, ValueError) as exc:
            raise RemediationFailed(f"backup {name} cannot be decoded: {_first_line(exc)}") from None
        with admin_connection(env, database, dbname=target_db) as tconn:
            have = {r["extname"] for r in tconn.execute("SELECT extname FROM pg_extension")}
            kept: list[bytes] = []
            for line in lines:
                m = _EXTENSION_LINE.match(line)
                if m:
                    ext = m.group(1).decode().strip('"')
                    if ext not in have:
                        try:
                            tconn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(ext)))
                        except psycopg.Error as exc:
                            skipped.append(f"{ext} ({_first_line(exc)})")
                    continue
                if line.startswith(b"COMMENT ON EXTENSION "):
                    continue
                kept.append(line)
        with tempfile.NamedTemporaryFile(prefix="runbook-psql-", suffix=".err") as errf:
            proc = subprocess.Popen(
                ["psql", "-X", "-q", "--no-password", "-v", "ON_ERROR_STOP=1", "--dbname", conninfo],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errf, env=penv,
            )
            dog = _Watchdog(proc, timeout_s)
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
                                        f"{_stderr_summary(Path(errf.name))}")
    return RestoreResult(database=target_db, seconds=time.perf_counter() - started, skipped_extensions=skipped)


def drop_database(env: Environment, database: str, name: str, created_by_us: str) -> None:
    """Drop a scratch/restore database this run created (``name`` must carry the run's ``created_by_us`` marker)."""
    if created_by_us not in name:
        raise RemediationFailed(f"refusing to drop {name}: not a database this run created")
    for attempt in range(3):  # an autovacuum worker or a closing session can hold it for a moment
        try:
            with admin_connection(env, database) as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            return
        except psycopg.errors.ObjectInUse:
            if attempt == 2:
                raise
            time.sleep(1.0)


def database_exists(env: Environment, database: str, name: str) -> bool:
    with admin_connection(env, database) as admin:
        return admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def database_owner(env: Environment, database: str, name: str) -> str | None:
    with admin_connection(env, database) as admin:
        row = admin.execute("SELECT pg_get_userbyid(datdba) AS owner FROM pg_database WHERE datname = %s",
                            (name,)).fetchone()
    return row["owner"] if row else None


def shape_of(env: Environment, database: str, dbname: str) -> dict[str, Any]:
    """Shape of any database on the server (e.g. a scratch restore), read with the admin role."""
    with admin_connection(env, database, dbname=dbname, statement_timeout_ms=600_000) as conn:
        return read_shape(conn, env.database(database).key_tables)


def live_shape(env: Environment, database: str) -> dict[str, Any]:
    """Shape of the configured database, read with the engine's role (pg_read_all_data)."""
    with postgres(env, database, statement_timeout_ms=600_000) as conn:
        return read_shape(conn, env.database(database).key_tables)


# ------------------------------------------------------------------ pg_amcheck


def run_amcheck(env: Environment, database: str, timeout_s: float = 300.0) -> dict[str, Any]:
    """pg_amcheck of the live database with the engine's role: {'ran': bool, 'ok': bool, 'detail': str}.

    Needs the amcheck extension in the database and EXECUTE on its functions (both a superuser's to grant); without
    them the result says so instead of pretending the database was checked.
    """
    if not PG_AMCHECK.exists():
        return {"ran": False, "ok": True, "detail": f"{PG_AMCHECK} not installed"}
    cfg = env.database(database)
    with postgres(env, database) as conn:
        if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'").fetchone():
            return {"ran": False, "ok": True,
                    "detail": "amcheck extension not installed in the database (a superuser runs CREATE EXTENSION "
                              "amcheck and grants EXECUTE on its functions to the engine's role)"}
    conninfo, penv = client_env(dsn_parts(env, database), cfg.connect_timeout_s)
    try:
        proc = subprocess.run([str(PG_AMCHECK), "--no-password", "--heapallindexed", conninfo],
                              capture_output=True, text=True, env=penv, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"ran": True, "ok": False, "detail": f"pg_amcheck did not finish within {timeout_s:g} s"}
    output = redact((proc.stdout + proc.stderr).strip())
    if "permission denied" in output:
        return {"ran": False, "ok": True, "detail": f"pg_amcheck not permitted for the engine's role: "
                                                      f"{output.splitlines()[0][:200]}"}
    return {"ran": True, "ok": proc.returncode == 0,
            "detail": "no corruption found" if proc.returncode == 0 else output[:2000]}
