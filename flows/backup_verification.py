"""Procedure: Backup and Recovery Monitoring (the runbook's `ls -la`, `gunzip -t`, backup log and restore test).

For the newest backup (or the one named): it exists and is fresher than the playbook's RPO; its size is sane against
the previous ones; no newer backup attempt was left unfinished; the gzip stream is intact and matches its checksum
(one streamed pass, never read whole); it is a complete pg_dump of the right database; the backup log's recent lines
have no errors; a test restore into a scratch database succeeds and its tables and key row counts equal the manifest
(or the live database within a tolerance when there is none). The scratch database is always dropped. The report
states the restore time measured (the RTO achievable) and the backup's age (the RPO achieved).

Dry run (the default) checks everything and records nothing; with dry_run=False the result is stored next to the
backup (``<backup>.verify.json``, shown by `runbook backups list`).
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import Field

from assessments.backups import assess_backups_configured
from runbook.engine.clients import database_name
from runbook.engine.config import Environment
from runbook.engine.errors import QueryFailed, RemediationFailed, TargetUnreachable
from runbook.engine.findings import Finding, Report, Severity, TableBlock
from runbook.engine.params import BackupFile, DbName, EnvName
from runbook.engine.procedure import current_run, procedure, unreachable_as_finding
from tasks.backup_checks import check_stream
from tasks.backup_files import Verification, side_name, utc_stamp
from tasks.backup_restore import derived_db_name, drop_database, restore_backup
from tasks.backup_store import BackupEntry, BackupStore, list_backups, open_store
from tasks.database_shape import compare_shapes, live_shape, shape_of

_LOG_ERROR = re.compile(r"\b(error|fatal|failed|failure|panic|abort(ed)?)\b", re.IGNORECASE)
SIZE_HISTORY = 5
Fail = Callable[[str, str], None]
"""Records one reason the backup is unusable: fail(kind, text) (a critical finding, and a reason in the verdict)."""


@procedure("backup-verification", tags=('backups',),
           summary="Backup and Recovery Monitoring: age vs RPO, size, gzip, checksum, log, test restore (RTO)")
def backup_verification(
    env: EnvName,
    database: DbName = "main",
    dry_run: bool = True,
    backup: BackupFile | None = None,
    test_restore: Annotated[bool, Field(description="restore into a scratch database and compare")] = True,
    log_lines: Annotated[int, Field(ge=1, le=10000, description="recent backup-log lines to scan")] = 200,
    live_tolerance_pct: Annotated[float, Field(ge=0, le=100, description="without a manifest: row-count "
                                                                          "tolerance against the live database")] = 5.0,
    restore_timeout_s: Annotated[float, Field(gt=0, le=86400, description="test restore time limit")] = 3600,
) -> None:
    """Verify the newest backup end to end; record the result next to it unless dry_run."""
    run = current_run()
    report, environment = run.report, run.env
    if not assess_backups_configured(report, environment):
        return
    with unreachable_as_finding(report), open_store(environment) as store:
        verdict = verify_latest(report, environment, store, database, backup, test_restore, log_lines,
                                live_tolerance_pct, restore_timeout_s)
        if verdict and not dry_run:
            record_verification(store, verdict)
            report.notes.append(f"result recorded in {store.describe()}/{side_name(verdict.file, 'verify.json')}")
        elif verdict:
            report.notes.append("dry run: result not recorded (dry_run=False stores it next to the backup)")


def verify_latest(report: Report, env: Environment, store: BackupStore, database: str, name: str | None,
                  test_restore: bool, log_lines: int, live_tolerance_pct: float,
                  restore_timeout_s: float) -> Verification | None:
    """All checks on one backup; every failure is a critical finding with its reason. Returns the verdict."""
    cfg = env.backups
    assert cfg is not None
    dbname = database_name(env, database)
    entries, partials = list_backups(store, dbname)
    regular = [e for e in entries if e.purpose == "backup"]
    reasons: list[str] = []

    def fail(kind: str, text: str, **details: Any) -> None:
        reasons.append(text)
        report.add(Finding(title=f"backup unusable: {text}", severity=Severity.CRITICAL, subject=subject,
                           details={"kind": kind, **details}, aggregation_key=f"backup-{kind}"))

    subject = f"backups of {dbname} in {store.describe()}"
    if name:
        chosen = next((e for e in entries if e.name == name), None)
        if chosen is None:
            fail("missing", f"missing: no backup named {name}")
            return None
    elif not regular:
        fail("missing", f"missing: no backup of database {dbname} in {store.describe()}")
        scan_log(report, env, store, log_lines, reasons)
        return None
    else:
        chosen = regular[0]
    subject = chosen.name
    now = datetime.now(UTC)
    age_h = chosen.age_hours(now)

    newer_partials = [p for p in partials if p.mtime > chosen.taken_at]
    for p in newer_partials:
        fail("unfinished", f"unfinished: a newer backup attempt left its temp file {p.name} "
                           f"({p.size} bytes, last written {p.mtime.isoformat(timespec='seconds')})")
    if age_h > cfg.rpo_hours:
        fail("stale", f"stale: {age_h:.1f} h old, older than the RPO of {cfg.rpo_hours:g} h", age_h=round(age_h, 2))
    check_size(chosen, [e for e in regular if e.taken_at < chosen.taken_at], cfg.min_size_ratio, fail, report)
    if chosen.manifest_error:
        fail("manifest", chosen.manifest_error)
    elif chosen.manifest is None:
        report.add(Finding(title="no manifest: restored data is compared with the live database instead",
                           severity=Severity.WARNING, subject=subject, aggregation_key="backup-no-manifest"))
    elif chosen.manifest.database != dbname:
        fail("wrong-database", f"wrong database: a dump of {chosen.manifest.database!r}, not {dbname!r}")
    if chosen.checksum is None:
        report.add(Finding(title="no checksum file: integrity rests on gzip's CRC alone", severity=Severity.WARNING,
                           subject=subject, aggregation_key="backup-no-checksum"))

    with store.open_read(chosen.name) as fh:
        stream = check_stream(fh, chosen.checksum)
    for kind, text in stream.problems:
        fail(kind, text)
    report.add(Finding(
        title=f"integrity: {'intact' if stream.ok else 'FAILED'} ({stream.compressed_bytes / 1e6:.1f} MB read in "
              f"{stream.seconds:.2f} s, {stream.uncompressed_bytes / 1e6:.1f} MB of SQL, "
              f"{stream.tables_in_dump} tables)",
        severity=Severity.INFO, subject=subject,
        details={"sha256": stream.sha256, "checksum_file": chosen.checksum or "none"},
        aggregation_key="backup-integrity",
    ))
    scan_log(report, env, store, log_lines, reasons)

    restore_s: float | None = None
    if not test_restore:
        report.notes.append("test restore skipped (test_restore=False)")
    elif not stream.ok or chosen.manifest_error or (chosen.manifest and chosen.manifest.database != dbname):
        report.notes.append("test restore skipped: the file already failed verification")
    elif env.database(database).admin_dsn is None:
        report.add(Finding(title=f"test restore not possible: databases.{database}.admin_dsn is not configured "
                                 "(a CREATEDB role that is a member of the database owner's role)",
                           severity=Severity.WARNING, subject=subject, aggregation_key="backup-no-admin"))
    else:
        restore_s = scratch_restore(report, env, store, database, chosen, live_tolerance_pct, restore_timeout_s,
                                    fail)
    passed = not reasons
    report.add(Finding(
        title=(f"backup {chosen.name} {'passed' if passed else 'FAILED'} verification: RPO achieved {age_h:.1f} h"
               + (f", RTO achievable {restore_s:.1f} s (measured restore)" if restore_s is not None else "")),
        severity=Severity.INFO if passed else Severity.CRITICAL, subject=subject,
        details={"backup_age_h": round(age_h, 2), "rpo_hours": cfg.rpo_hours,
                 "restore_s": round(restore_s, 2) if restore_s is not None else None,
                 "reasons": "; ".join(reasons) or "none"},
        aggregation_key="backup-verdict",
    ))
    return Verification(file=chosen.name, verified_at=now.isoformat(), passed=passed, reasons=reasons,
                        age_h=round(age_h, 2), restore_s=round(restore_s, 2) if restore_s is not None else None,
                        sha256=stream.sha256)


def check_size(chosen: BackupEntry, previous: list[BackupEntry], min_ratio: float, fail: Fail,
               report: Report) -> None:
    history = [e.file.size for e in previous[:SIZE_HISTORY] if e.file.size > 0]
    if not history:
        report.notes.append("size: no previous backup to compare with")
        return
    median = statistics.median(history)
    ratio = chosen.file.size / median
    if ratio < min_ratio:
        fail("shrunk", f"size: {chosen.file.size} bytes is {ratio:.0%} of the previous backups' median "
                       f"({median:.0f} bytes; below {min_ratio:.0%})")
    elif ratio > 1 / min_ratio:
        report.add(Finding(title=f"size: {ratio:.1f}x the previous backups' median", severity=Severity.WARNING,
                           subject=chosen.name, aggregation_key="backup-grew"))


def scan_log(report: Report, env: Environment, store: BackupStore, lines: int, reasons: list[str]) -> None:
    """The runbook's `tail -f /var/log/postgres-backup.log`: recent lines that report errors."""
    cfg = env.backups
    if cfg is None or cfg.log_file is None:
        report.notes.append("no backup log configured (backups.log_file)")
        return
    text = store.tail(str(cfg.log_file), max_bytes=max(4096, lines * 300))
    if text is None:
        report.add(Finding(title=f"backup log {cfg.log_file} not found", severity=Severity.WARNING,
                           subject=str(cfg.log_file), aggregation_key="backup-log-missing"))
        return
    recent = text.splitlines()[-lines:]
    bad = [ln for ln in recent if _LOG_ERROR.search(ln)]
    if bad:
        reasons.append(f"backup log: {len(bad)} error line(s) in the last {len(recent)}")
        report.add(Finding(
            title=f"backup log: {len(bad)} error line(s) in the last {len(recent)} lines",
            severity=Severity.CRITICAL, subject=str(cfg.log_file),
            blocks=[TableBlock(title="error lines", columns=["line"], rows=[[ln[:300]] for ln in bad[-20:]])],
            aggregation_key="backup-log-errors",
        ))


def scratch_restore(report: Report, env: Environment, store: BackupStore, database: str, entry: BackupEntry,
                    live_tolerance_pct: float, timeout_s: float, fail: Fail) -> float | None:
    """Restore into a scratch database, compare, and always drop it. Returns the measured restore time."""
    dbname = database_name(env, database)
    stamp = utc_stamp()
    scratch = derived_db_name(dbname, "verify", stamp, unique=True)
    marker = "_verify_" + "_".join(scratch.rsplit("_", 2)[-2:])
    seconds: float | None = None
    created: list[str] = []
    try:
        owner = entry.manifest.owner if entry.manifest else None
        started = time.perf_counter()
        result = restore_backup(env, database, store, entry.name, scratch, owner, timeout_s=timeout_s,
                                created=created)
        seconds = time.perf_counter() - started
        restored = shape_of(env, database, scratch)
        if entry.manifest:
            problems = compare_shapes(entry.manifest.shape, restored)
            against = "the manifest"
        else:
            problems = compare_shapes(live_shape(env, database), restored, row_tolerance_pct=live_tolerance_pct)
            against = f"the live database (±{live_tolerance_pct:g}%)"
        if not restored.tables:
            fail("empty", "empty: the restored database has no tables")
        for p in problems:
            fail("restore-mismatch", f"restored data differs from {against}: {p}")
        report.add(Finding(
            title=f"test restore into {scratch}: {len(restored.tables)} tables in {seconds:.1f} s"
                  + ("" if problems else f", equal to {against}"),
            severity=Severity.INFO, subject=entry.name,
            details={"key_rows": restored.key_rows, "skipped_extensions": ", ".join(result.skipped_extensions)
                     or "none"},
            aggregation_key="backup-test-restore",
        ))
        if result.skipped_extensions:
            report.add(Finding(title="extensions not recreated by the restore role: "
                                     + ", ".join(result.skipped_extensions),
                               severity=Severity.WARNING, subject=entry.name, aggregation_key="backup-extensions"))
    except (RemediationFailed, QueryFailed) as exc:
        fail("restore-failed", f"test restore failed: {str(exc).strip().splitlines()[0][:400]}")
    finally:
        try:
            if created:
                drop_database(env, database, scratch, marker)
        except (RemediationFailed, TargetUnreachable, QueryFailed) as exc:
            report.add(Finding(title=f"scratch database {scratch} could not be dropped: {exc}",
                               severity=Severity.CRITICAL, subject=scratch, aggregation_key="backup-scratch-left"))
    return seconds


def record_verification(store: BackupStore, verdict: Verification) -> None:
    """``<backup>.verify.json`` (not the backup log: that log is the backup job's, scanned for its errors)."""
    store.write_text(side_name(verdict.file, "verify.json"), verdict.to_json())
