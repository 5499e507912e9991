"""backup and backup-verification against the sandbox's real PostgreSQL: a good backup passes; every broken kind fails
with its reason; the scratch database is gone after every verification, passed or failed."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flows.backup import backup
from flows.backup_verification import backup_verification
from tests.backup_env import ROWS, backup_env, create_db, databases, drop_all
from tests.require import require_service, unavailable

pytestmark = pytest.mark.integration


def scratch_left(state) -> set[str]:  # noqa: ANN001
    return databases(state, "%\\_verify\\_%")


def critical(doc: dict[str, Any]) -> list[str]:
    return [f["title"] for f in doc["findings"] if f["severity"] == "critical"]


def taken(doc: dict[str, Any]) -> str:
    return next(f["details"]["file"] for f in doc["findings"] if f["title"].startswith("backup ")
                and "written" in f["title"])


def verdict(doc: dict[str, Any]) -> dict[str, Any]:
    return next(f for f in doc["findings"] if f["title"].startswith("backup ") and "verification" in f["title"])


@pytest.fixture(scope="module")
def good(sandbox_state) -> Iterator[dict[str, Any]]:  # noqa: ANN001
    """pafar_bk and one backup of it, taken by the backup flow (dry run first: it must write nothing)."""
    create_db(sandbox_state)
    with backup_env(sandbox_state) as (env, directory):
        dry = backup(env="bk", dry_run=True)
        assert dry["actions"][0]["planned"] and not dry["actions"][0]["changed"]
        assert list(directory.iterdir()) == [], "a dry run wrote a file"
        doc = backup(env="bk", dry_run=False)
        action = doc["actions"][0]
        assert action["changed"] and action["verified"], action
        yield {"env": env, "dir": directory, "file": taken(doc), "doc": doc}
    drop_all(sandbox_state)


def test_backup_is_complete_with_checksum_manifest_and_log(good: dict[str, Any]) -> None:
    directory: Path = good["dir"]
    name = good["file"]
    files = sorted(p.name for p in directory.iterdir())
    assert files == [name, f"{name}.manifest.json", f"{name}.sha256"], files
    manifest = json.loads((directory / f"{name}.manifest.json").read_text())
    assert manifest["database"] == "pafar_bk" and manifest["purpose"] == "backup"
    assert manifest["key_rows"] == ROWS
    assert set(manifest["tables"]) == {"public.users", "public.bookings", "public.payments"}
    assert manifest["server_version"].startswith("15")
    assert (directory / f"{name}.sha256").read_text().split()[0] == manifest["sha256"]
    assert (directory / name).stat().st_mode & 0o777 == 0o600
    log = Path(good["env"].backups.log_file).read_text()
    assert f"OK backup {name}" in log
    again = backup(env="bk", dry_run=False)  # a backup younger than fresh_within_s: nothing to do
    assert not again["actions"][0]["changed"] and again["actions"][0]["planned"] == []


def test_good_backup_passes_records_result_and_drops_scratch(good: dict[str, Any], sandbox_state) -> None:  # noqa: ANN001
    dry = backup_verification(env="bk")
    assert critical(dry) == [], critical(dry)
    assert not (good["dir"] / f"{good['file']}.verify.json").exists(), "a dry run recorded its result"
    doc = backup_verification(env="bk", dry_run=False)
    v = verdict(doc)
    assert v["severity"] == "info" and "passed verification" in v["title"]
    assert "RPO achieved" in v["title"] and "RTO achievable" in v["title"]
    assert v["details"]["restore_s"] > 0 and v["details"]["backup_age_h"] < 1
    assert any("test restore into pafar_bk_verify_" in f["title"] and "equal to the manifest" in f["title"]
               for f in doc["findings"])
    recorded = json.loads((good["dir"] / f"{good['file']}.verify.json").read_text())
    assert recorded["passed"] is True and recorded["file"] == good["file"]
    assert scratch_left(sandbox_state) == set()


# ------------------------------------------------------------------ every broken kind


def _rewrite_checksum(d: Path, name: str) -> None:
    import hashlib

    digest = hashlib.sha256((d / name).read_bytes()).hexdigest()
    (d / f"{name}.sha256").write_text(f"{digest}  {name}\n")
    m = json.loads((d / f"{name}.manifest.json").read_text())
    m["sha256"] = digest
    (d / f"{name}.manifest.json").write_text(json.dumps(m))


def _edit_manifest(d: Path, name: str, **changes: Any) -> None:
    m = json.loads((d / f"{name}.manifest.json").read_text())
    m.update(changes)
    (d / f"{name}.manifest.json").write_text(json.dumps(m))


def _rewrap(d: Path, name: str, edit: Callable[[bytes], bytes]) -> None:
    """Decompress, edit the SQL, recompress (a valid gzip of a changed dump), then fix the checksum."""
    sql = gzip.decompress((d / name).read_bytes())
    (d / name).write_bytes(gzip.compress(edit(sql)))
    _rewrite_checksum(d, name)


def truncated(d: Path, name: str) -> None:
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: len(data) // 2])
    _rewrite_checksum(d, name)  # so that only the truncation can be the reason


def corrupted(d: Path, name: str) -> None:
    data = bytearray((d / name).read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0x5A
    (d / name).write_bytes(bytes(data))
    _rewrite_checksum(d, name)


def empty(d: Path, name: str) -> None:
    (d / name).write_bytes(b"")
    _rewrite_checksum(d, name)


def stale(d: Path, name: str) -> None:
    _edit_manifest(d, name, finished_at=(datetime.now(UTC) - timedelta(hours=30)).isoformat())


def checksum_mismatch(d: Path, name: str) -> None:
    (d / f"{name}.sha256").write_text("0" * 64 + f"  {name}\n")


def wrong_database(d: Path, name: str) -> None:
    _edit_manifest(d, name, database="orders")


def unfinished(d: Path, name: str) -> None:
    (d / "pafar_bk-29990101T000000Z.sql.gz.partial").write_bytes(b"\x1f\x8b\x08\x00partial")


def dump_incomplete(d: Path, name: str) -> None:
    _rewrap(d, name, lambda sql: sql[: sql.index(b"-- PostgreSQL database dump complete")])


def not_a_dump(d: Path, name: str) -> None:
    _rewrap(d, name, lambda sql: b"this is not an SQL dump\n" * 1000)


def sql_error(d: Path, name: str) -> None:
    _rewrap(d, name, lambda sql: sql.replace(b"\nCREATE TABLE public.payments", b"\nSELECT * FROM nowhere;\n"
                                                                                    b"CREATE TABLE public.payments"))


def rows_differ(d: Path, name: str) -> None:
    _edit_manifest(d, name, key_rows={**ROWS, "bookings": ROWS["bookings"] + 1})


def shrunk(d: Path, name: str) -> None:
    older = (datetime.now(UTC) - timedelta(hours=2)).strftime("%Y%m%dT%H%M%SZ")
    big = d / f"pafar_bk-{older}.sql.gz"
    big.write_bytes(os.urandom((d / name).stat().st_size * 3))
    past = time.time() - 7200
    os.utime(big, (past, past))


def log_errors(d: Path, name: str) -> None:
    log = d.parent / "postgres-backup.log"
    log.write_text("2026-01-01T04:00:00 backup started\npg_dump: error: connection to server failed\n")


def missing(d: Path, name: str) -> None:
    for p in d.iterdir():
        p.unlink()


BROKEN: dict[str, tuple[Callable[[Path, str], None], str]] = {
    "truncated": (truncated, "truncated"),
    "corrupted": (corrupted, "corrupted"),
    "empty": (empty, "empty"),
    "stale": (stale, "stale"),
    "missing": (missing, "missing"),
    "checksum-mismatch": (checksum_mismatch, "checksum mismatch"),
    "wrong-database": (wrong_database, "wrong database"),
    "unfinished-temp-file": (unfinished, "unfinished"),
    "dump-incomplete": (dump_incomplete, "dump incomplete"),
    "not-a-dump": (not_a_dump, "not a pg_dump"),
    "restore-fails": (sql_error, "test restore failed"),
    "rows-differ-from-manifest": (rows_differ, "restored data differs from the manifest: bookings"),
    "shrunk": (shrunk, "of the previous backups' median"),
    "log-errors": (log_errors, "backup log: 1 error line"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_each_broken_kind_fails_with_its_reason(kind: str, good: dict[str, Any], sandbox_state) -> None:  # noqa: ANN001
    breaker, reason = BROKEN[kind]
    with backup_env(sandbox_state, name="bkbroken") as (_env, d):
        for p in good["dir"].iterdir():
            if not p.name.endswith(".verify.json"):
                shutil.copy2(p, d / p.name)
        breaker(d, good["file"])
        doc = backup_verification(env="bkbroken", dry_run=False)
        titles = critical(doc)
        assert any(reason in t for t in titles), f"{kind}: expected {reason!r} in {titles}"
        if kind != "missing":
            v = verdict(doc)
            assert v["severity"] == "critical" and "FAILED verification" in v["title"]
            recorded = json.loads((d / f"{good['file']}.verify.json").read_text())
            assert recorded["passed"] is False and any(reason in r for r in recorded["reasons"])
    assert scratch_left(sandbox_state) == set(), f"a scratch database was left behind: {titles}"


def test_backup_and_verification_over_ssh(good: dict[str, Any], sandbox_state) -> None:  # noqa: ANN001
    require_service(sandbox_state, "sshd", "the backups are written over SFTP")
    with backup_env(sandbox_state, ssh=True, name="bkssh") as (env, remote):
        doc = backup(env="bkssh", dry_run=False)
        action = doc["actions"][0]
        if "SFTP not available" in action["error"]:
            unavailable("the sandbox sshd serves no SFTP subsystem (needs `Subsystem sftp internal-sftp`)")
        assert action["changed"] and action["verified"], action
        name = taken(doc)
        owner = (remote / name).stat().st_uid
        assert owner == __import__("pwd").getpwnam(sandbox_state.services["sshd"].paths["user"]).pw_uid
        ver = backup_verification(env="bkssh", dry_run=False)
        assert critical(ver) == [], critical(ver)
        assert "passed verification" in verdict(ver)["title"]
        assert (remote / f"{name}.verify.json").exists()
        assert "OK backup" in (remote / "postgres-backup.log").read_text()
    assert scratch_left(sandbox_state) == set()
