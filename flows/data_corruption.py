"""Procedure: Emergency Response, Data Corruption (stop writers, assess damage, restore from backup).

Assess: the live database against the chosen backup's manifest (tables and columns missing or changed, key row
counts), and pg_amcheck where the database allows it. Plan: the newest backup that passes verification (integrity,
checksum, right database; safety backups are never a restore source), the writers to stop, the safety backup's name
and the dated name the old database keeps. Then, only with approval: stop writers, safety backup, restore into a
new database, verify it, swap by renaming (nothing is dropped), start writers, verify health.

Approval: required (the procedure's default; an environment may say otherwise in ``approvals:``). The engine's
runner asks: at the terminal for `runbook run --apply` (or ``--yes``), else the run pauses with the findings and the
exact plan in the Prefect UI / `runbook approve`. No approval, a rejection or a timeout changes nothing.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from runbook.engine.config import Environment
from runbook.engine.findings import Finding, Report, Severity, TableBlock
from runbook.engine.params import BackupFile, DbName, EnvName
from runbook.engine.procedure import current_run, procedure, unreachable_as_finding
from tasks.backup_files import Shape
from tasks.backup_remediations import RestoreFromBackup, RestoreState
from tasks.database_integrity import AmcheckResult, run_amcheck
from tasks.writers import NO_DOCKER, writers_for


@procedure("data-corruption", remediations=(RestoreFromBackup,), approval="required", tags=('backups',),
           summary="Data Corruption: assess vs backup, then with approval stop writers, restore, swap, restart")
def data_corruption(
    env: EnvName,
    database: DbName = "main",
    dry_run: bool = True,
    backup: BackupFile | None = None,
    row_loss_tolerance_pct: Annotated[float, Field(ge=0, le=100, description="key-table row loss below this is "
                                                                             "not damage")] = 1.0,
    amcheck: Annotated[bool, Field(description="run pg_amcheck where the database allows it")] = True,
    writer_stop_s: Annotated[int, Field(ge=0, le=600, description="grace period for writers to stop (s)")] = 10,
) -> None:
    """Assess corruption against the newest good backup; with approval (and not dry_run) restore it by swapping."""
    run = current_run()
    report, environment = run.report, run.env
    if not _configured(report, environment, database):
        return
    with unreachable_as_finding(report):
        rem = RestoreFromBackup(environment, database, backup, row_loss_tolerance_pct, writer_stop_s=writer_stop_s)
        state = rem.check()
        assess(report, rem, state)
        if amcheck and state.exists:
            assess_amcheck(report, run_amcheck(environment, database), rem.dbname)
        run.offer(rem, state=state, after=lambda r, _result: report_progress(r, rem))


def _configured(report: Report, env: Environment, database: str) -> bool:
    missing = []
    if env.backups is None:
        missing.append("backups")
    if database in env.databases and env.databases[database].admin_dsn is None:
        missing.append(f"databases.{database}.admin_dsn")
    for what in missing:
        report.add(Finding(title=f"{what} is not configured in the playbook: cannot restore",
                           severity=Severity.CRITICAL, subject=f"environment {env.name}",
                           aggregation_key="restore-config"))
    env.database(database)  # unknown database: ConfigError (exit 2)
    return not missing


def assess(report: Report, rem: RestoreFromBackup, state: RestoreState) -> None:
    """Findings from the remediation's check: which backup, what is damaged, what was rejected and why."""
    for r in state.rejected:
        report.add(Finding(title=f"backup {r.file} cannot be a restore source: {r.problems[0]}",
                           severity=Severity.WARNING, subject=r.file, details={"problems": "; ".join(r.problems)},
                           aggregation_key=f"restore-rejected:{r.file}"))
    backup = state.backup
    if backup is None:
        report.add(Finding(title=f"no usable backup of {rem.dbname} in {state.store}", severity=Severity.CRITICAL,
                           subject=rem.target, aggregation_key="restore-no-backup"))
        return
    manifest = backup.manifest
    live = state.live or Shape()
    rows = [[t, manifest.key_rows.get(t), live.key_rows.get(t)] for t in manifest.key_rows]
    tables = TableBlock(title="key tables: rows in the backup vs now", columns=["table", "backup", "now"], rows=rows)
    if state.damage:
        report.add(Finding(
            title=f"{rem.dbname} has lost data compared with backup {backup.file}: {len(state.damage)} problem(s)",
            severity=Severity.CRITICAL, subject=f"database {rem.dbname}",
            details={"backup": backup.file, "backup_age_h": backup.age_h},
            blocks=[TableBlock(title="damage", columns=["problem"], rows=[[d] for d in state.damage]), tables],
            aggregation_key="restore-damage",
        ))
    else:
        report.add(Finding(
            title=f"{rem.dbname} matches backup {backup.file} (no table, column or key rows lost): nothing to "
                  "restore", severity=Severity.INFO, subject=f"database {rem.dbname}", blocks=[tables],
            aggregation_key="restore-damage",
        ))
    extra = sorted(set(live.tables) - set(manifest.tables))
    if extra:
        report.notes.append(f"tables not in the backup (created since): {', '.join(extra)}")
    if writers_for(rem.env) is None:
        report.add(Finding(title=NO_DOCKER, severity=Severity.WARNING, subject="writers",
                           details={"writers": ", ".join(n for n, s in rem.env.services.items() if s.writer)},
                           aggregation_key="restore-writers"))


def assess_amcheck(report: Report, result: AmcheckResult, dbname: str) -> None:
    if not result.ran:
        report.notes.append(f"pg_amcheck not run: {result.detail}")
        return
    report.add(Finding(
        title=f"pg_amcheck: {'no corruption found' if result.ok else 'CORRUPTION FOUND'}",
        severity=Severity.INFO if result.ok else Severity.CRITICAL, subject=f"database {dbname}",
        details={"output": result.detail[:1000]}, aggregation_key="restore-amcheck",
    ))


def report_progress(report: Report, rem: RestoreFromBackup) -> None:
    """The restore's steps as a finding once it ran: finished, or where it stopped and what is in place."""
    if not rem.progress:
        return
    rows = [[p.step.value, p.detail, p.at.isoformat()] for p in rem.progress]
    if rem.stopped_at:
        report.add(Finding(
            title=f"restore stopped at step '{rem.stopped_at}': the original database {rem.dbname} is in place",
            severity=Severity.CRITICAL, subject=rem.target,
            blocks=[TableBlock(title="steps completed", columns=["step", "detail", "at"], rows=rows)],
            aggregation_key="restore-stopped",
        ))
    else:
        report.add(Finding(
            title=f"restore finished: {rem.dbname} restored, old database kept as {rem.kept_as}",
            severity=Severity.INFO, subject=rem.target,
            details={"restore_s": round(rem.restore_seconds or 0, 1), "safety_backup": rem.safety_file},
            blocks=[TableBlock(title="steps", columns=["step", "detail", "at"], rows=rows)],
            aggregation_key="restore-done",
        ))
