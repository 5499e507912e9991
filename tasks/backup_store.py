"""Where backups live (a local directory or a directory on one of the playbook's SSH hosts, over SFTP), and
what is there: the complete backups with their sidecars, and unfinished temp files.

Both stores offer the same small surface (list, stream in, stream out under a temporary name, publish without ever
overwriting, small sidecar files, the tail of a log), so taking, verifying and restoring a backup is one code path.
SFTP is paramiko's own client on the connection ``runbook.engine.clients.ssh`` opens (host key checked, key auth only);
every channel read and write has the host's timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

import paramiko
from pydantic import ValidationError

from runbook.engine.clients import ssh
from runbook.engine.config import BackupConfig, Environment
from runbook.engine.errors import ConfigError, TargetUnreachable
from tasks.backup_files import BACKUP_NAME, PARTIAL_SUFFIX, SUFFIX, Manifest, side_name

CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredFile:
    name: str
    size: int
    mtime: datetime


class BackupStore(Protocol):
    """The operations backups need from a storage location. Names are plain file names inside the directory."""

    def describe(self) -> str: ...

    def list_files(self) -> list[StoredFile]: ...

    def open_read(self, name: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...

    def open_new(self, name: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...

    def publish(self, temp: str, final: str) -> None: ...

    def remove(self, name: str) -> None: ...

    def read_text(self, name: str, limit: int = 1 << 20) -> str | None: ...

    def write_text(self, name: str, text: str) -> None: ...

    def tail(self, path: str, max_bytes: int = 16384) -> str | None: ...

    def append_line(self, path: str, line: str) -> None: ...


def _check_name(name: str) -> str:
    if not name or "/" in name or name in {".", ".."} or "\x00" in name:
        raise ValueError(f"not a plain file name: {name!r}")
    return name


class LocalStore:
    """A directory on the machine the engine runs on."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def describe(self) -> str:
        return str(self.directory)

    def _path(self, name: str) -> Path:
        return self.directory / _check_name(name)

    def list_files(self) -> list[StoredFile]:
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            if e.is_file(follow_symlinks=False):
                st = e.stat(follow_symlinks=False)
                out.append(StoredFile(e.name, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)))
        return out

    @contextlib.contextmanager
    def open_read(self, name: str) -> Iterator[IO[bytes]]:
        with open(self._path(name), "rb", buffering=0) as fh:
            yield fh

    @contextlib.contextmanager
    def open_new(self, name: str) -> Iterator[IO[bytes]]:
        """Create a new file (never an existing one), 0600; flushed to disk when the block ends without error."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())

    def publish(self, temp: str, final: str) -> None:
        """Give a complete temp file its final name; an existing file of that name is never replaced."""
        os.link(self._path(temp), self._path(final))  # fails with FileExistsError instead of overwriting
        os.unlink(self._path(temp))
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def remove(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def read_text(self, name: str, limit: int = 1 << 20) -> str | None:
        try:
            with open(self._path(name), "rb") as fh:
                return fh.read(limit).decode("utf-8", "replace")
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        """Write a small sidecar atomically (temp + rename: readers see the old or the new one, never half)."""
        tmp = f".{name}.tmp"
        self._path(tmp).unlink(missing_ok=True)
        with self.open_new(tmp) as fh:
            fh.write(text.encode())
        os.replace(self._path(tmp), self._path(name))

    def tail(self, path: str, max_bytes: int = 16384) -> str | None:
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - max_bytes))
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return None

    def append_line(self, path: str, line: str) -> None:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line.rstrip("\n") + "\n")


class SftpStore:
    """A directory on an SSH host, through SFTP on an already authenticated connection."""

    def __init__(self, sftp: paramiko.SFTPClient, directory: str, host: str) -> None:
        self.sftp, self.directory, self.host = sftp, directory, host

    def describe(self) -> str:
        return f"{self.host}:{self.directory}"

    def _path(self, name: str) -> str:
        return posixpath.join(self.directory, _check_name(name))

    def list_files(self) -> list[StoredFile]:
        try:
            attrs = self.sftp.listdir_attr(self.directory)
        except FileNotFoundError:
            return []
        return [StoredFile(a.filename, a.st_size or 0, datetime.fromtimestamp(a.st_mtime or 0, UTC))
                for a in attrs if a.st_mode is not None and stat.S_ISREG(a.st_mode)]

    @contextlib.contextmanager
    def open_read(self, name: str) -> Iterator[IO[bytes]]:
        with self.sftp.open(self._path(name), "rb", bufsize=CHUNK) as fh:
            fh.prefetch()  # pipelined reads: streaming speed instead of one round trip per block
            yield fh  # type: ignore[misc]

    @contextlib.contextmanager
    def open_new(self, name: str) -> Iterator[IO[bytes]]:
        with self.sftp.open(self._path(name), "wxb", bufsize=CHUNK) as fh:  # x: fail if it exists
            fh.set_pipelined(True)
            fh.chmod(0o600)
            yield fh  # type: ignore[misc]

    def publish(self, temp: str, final: str) -> None:
        # SFTP v3 rename (OpenSSH: link + unlink) fails when the target exists: a backup is never overwritten
        self.sftp.rename(self._path(temp), self._path(final))

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.sftp.remove(self._path(name))

    def read_text(self, name: str, limit: int = 1 << 20) -> str | None:
        try:
            with self.sftp.open(self._path(name), "rb") as fh:
                return fh.read(limit).decode("utf-8", "replace")
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        tmp = f".{name}.tmp"
        self.remove(tmp)
        with self.open_new(tmp) as fh:
            fh.write(text.encode())
        self.sftp.posix_rename(self._path(tmp), self._path(name))

    def tail(self, path: str, max_bytes: int = 16384) -> str | None:
        try:
            with self.sftp.open(path, "rb") as fh:
                size = fh.stat().st_size or 0
                fh.seek(max(0, size - max_bytes))
                return fh.read(max_bytes).decode("utf-8", "replace")
        except FileNotFoundError:
            return None

    def append_line(self, path: str, line: str) -> None:
        with self.sftp.open(path, "a") as fh:
            fh.write((line.rstrip("\n") + "\n").encode())


def backup_config(env: Environment) -> BackupConfig:
    if env.backups is None:
        raise ConfigError(f"{env.source}: environments.{env.name}.backups: not configured")
    return env.backups


@contextlib.contextmanager
def open_store(env: Environment) -> Iterator[BackupStore]:
    """The environment's backup location: local, or over SFTP when ``backups.ssh_host`` is set."""
    cfg = backup_config(env)
    if not cfg.ssh_host:
        yield LocalStore(cfg.directory)
        return
    host = env.ssh_hosts[cfg.ssh_host]
    with ssh(env, cfg.ssh_host) as client:
        try:
            sftp = client.open_sftp()
        except (paramiko.SSHException, OSError) as exc:
            raise TargetUnreachable(f"host {cfg.ssh_host}", f"SFTP not available: {exc}") from None
        channel = sftp.get_channel()
        if channel is None:
            sftp.close()
            raise TargetUnreachable(f"host {cfg.ssh_host}", "SFTP not available: no channel")
        channel.settimeout(host.timeout_s)  # every read/write waits at most this long
        try:
            yield SftpStore(sftp, str(cfg.directory), cfg.ssh_host)
        except (paramiko.SSHException, TimeoutError, EOFError) as exc:
            raise TargetUnreachable(f"host {cfg.ssh_host}", f"SFTP: {type(exc).__name__}: {exc}") from None
        finally:
            sftp.close()


# ------------------------------------------------------------------ listing


@dataclass(frozen=True)
class BackupEntry:
    """One complete backup file in the store with its sidecars (manifest, checksum, last verification).

    ``verification`` is the raw ``.verify.json`` (see ``backup_files.Verification``) as `runbook backups list`
    reads it.
    """

    file: StoredFile
    manifest: Manifest | None = None
    manifest_error: str = ""
    checksum: str | None = None
    verification: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def purpose(self) -> str:
        if self.manifest and self.manifest.purpose:
            return self.manifest.purpose
        m = BACKUP_NAME.match(self.name)
        return "safety" if m and m.group("safety") else "backup"

    @property
    def database(self) -> str | None:
        if self.manifest:
            return self.manifest.database
        m = BACKUP_NAME.match(self.name)
        return m.group("db") if m else None

    @property
    def taken_at(self) -> datetime:
        if self.manifest and self.manifest.finished_at:
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(self.manifest.finished_at)
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
        manifest, manifest_error = None, ""
        if side_name(f.name, "manifest.json") in names:
            manifest, manifest_error = _read_manifest(store.read_text(side_name(f.name, "manifest.json")))
        checksum = None
        if side_name(f.name, "sha256") in names:
            text = (store.read_text(side_name(f.name, "sha256")) or "").split()
            checksum = text[0].lower() if text else ""
        verification = None
        if side_name(f.name, "verify.json") in names:
            with contextlib.suppress(ValueError):
                verification = json.loads(store.read_text(side_name(f.name, "verify.json")) or "")
        entry = BackupEntry(file=f, manifest=manifest, manifest_error=manifest_error, checksum=checksum,
                            verification=verification)
        m = BACKUP_NAME.match(f.name)
        named_for = m.group("db") if m else None
        if dbname is None or dbname in (named_for, entry.database) or (named_for is None and entry.database is None):
            entries.append(entry)  # a file named for this database whose manifest says otherwise is kept: flagged
    entries.sort(key=lambda e: e.taken_at, reverse=True)
    return entries, partials


def _read_manifest(raw: str | None) -> tuple[Manifest | None, str]:
    """(the manifest, "") or (None, why it cannot be read)."""
    try:
        data = json.loads(raw or "")
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return Manifest.model_validate(data), ""
    except ValidationError as exc:
        return None, f"manifest unreadable: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
    except ValueError as exc:
        return None, f"manifest unreadable: {exc}"
