"""Procedure: take a backup (the runbook's nightly `postgres-backup.sh`, and the safety step of a restore).

pg_dump of the configured database, gzip-compressed and streamed to the playbook's backup location (a local
directory, or a directory on an SSH host over SFTP), with a ``.sha256`` file and a ``.manifest.json`` (database,
server version, time, size, key row counts taken in the dump's own snapshot). Written under a temporary name and
renamed only when complete. Dry run unless dry_run=False; skipped when a backup finished within fresh_within_s.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from assessments.backups import assess_backups_configured
from runbook.engine.findings import ActionResult, Finding, Report, Severity
from runbook.engine.params import DbName, EnvName
from runbook.engine.procedure import current_run, procedure, unreachable_as_finding
from tasks.backup_remediations import TakeBackup


@procedure("backup", remediations=(TakeBackup,), tags=('backups',),
           summary="Backup: pg_dump | gzip streamed to the backup location with checksum and manifest")
def backup(
    env: EnvName,
    database: DbName = "main",
    dry_run: bool = True,
    fresh_within_s: Annotated[float, Field(ge=0, description="skip when a backup is younger (s); 0: always")] = 300,
    timeout_s: Annotated[float, Field(gt=0, le=86400, description="pg_dump must finish within (s)")] = 3600,
) -> None:
    """Back up the database to the playbook's backup location (unless dry_run or a fresh one exists)."""
    run = current_run()
    report, environment = run.report, run.env
    if not assess_backups_configured(report, environment):
        return
    with unreachable_as_finding(report):
        run.offer(TakeBackup(environment, database, fresh_within_s=fresh_within_s, timeout_s=timeout_s),
                  after=report_backup)


def report_backup(report: Report, result: ActionResult) -> None:
    """The backup's manifest as a finding once written, or the failure as a critical one."""
    if result.applied and not result.error:
        m = result.applied[0].after
        report.add(Finding(
            title=f"backup {m['file']} written ({m['size_bytes'] / 1e6:.1f} MB)",
            severity=Severity.INFO, subject=f"{report.env}/{result.target}",
            details={"file": m["file"], "sha256": m["sha256"], "key_rows": m["rows"]},
            aggregation_key="backup-taken",
        ))
    elif result.error:  # a plan's error (dry run): the backup could not be taken; an apply's: it was not
        what = "backup cannot be taken" if result.dry_run else "backup failed"
        report.add(Finding(title=f"{what}: {result.error}", severity=Severity.CRITICAL,
                           subject=result.target, aggregation_key="backup-failed"))
