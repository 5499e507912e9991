"""Procedure: Emergency Response, Data Corruption (stop writers, assess damage, restore from backup).

Assess: the live database against the chosen backup's manifest (tables and columns missing or changed, key row
counts), and pg_amcheck where the database allows it. Plan: the newest backup that passes verification (integrity,
checksum, right database; safety backups are never a restore source), the writers to stop, the safety backup's name
and the dated name the old database keeps. Then, only with approval: stop writers, safety backup, restore into a
new database, verify it, swap by renaming (nothing is dropped), start writers, verify health.

Approval: ``approved_by`` (the CLI's ``--apply --approve`` fills it with the operator at the terminal); otherwise,
under a Prefect server, the run pauses with a form that shows the plan and waits ``approval_timeout_s``. No
approval, a rejection or a timeout changes nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from runbook.config import Environment
from runbook.findings import ActionResult, Change, Finding, Report, Severity, TableBlock
from runbook.procedure import finish_report, remediate, start_report, unreachable_as_finding
from runbook.remediation import run_remediation
from tasks.backup_remediations import RestoreFromBackup
from tasks.backups import run_amcheck
from tasks.writers import NO_DOCKER, writers_for

EnvName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$", description="environment from playbooks/")]
DbName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$", description="database name from the playbook")]
BackupFile = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,200}\.sql\.gz$", description="a backup file name")]
Approver = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$", description="who approved the restore")]
APPROVAL_POLL_S = 2


class RestoreApproval(RunInput):
    """The restore this run will carry out once approved. Tick 'approve' and give your name to go ahead."""

    backup_file: str = Field(description="the backup to restore")
    backup_age_h: float = Field(description="its age in hours: data written since then is not in it")
    database: str = Field(description="the database that will be replaced")
    damage: str = Field(description="what the assessment found")
    old_database_kept_as: str = Field(description="the current database is renamed to this, never dropped")
    safety_backup: str = Field(description="backup of the current database taken first")
    writers_to_stop: str = Field(description="services stopped during the restore")
    approve: bool = Field(False, description="restore now")
    approver: str = Field("", max_length=64, description="your name (recorded in the report)")
    reason: str = Field("", max_length=500, description="why (recorded in the report); `runbook approve` sends it")


@flow(name="data-corruption", log_prints=False)
def data_corruption(
    env: EnvName,
    database: DbName = "main",
    dry_run: bool = True,
    backup: BackupFile | None = None,
    approved_by: Approver | None = None,
    approval_timeout_s: Annotated[float, Field(gt=0, le=86400, description="wait this long for approval")] = 1800,
    row_loss_tolerance_pct: Annotated[float, Field(ge=0, le=100, description="key-table row loss below this is "
                                                                             "not damage")] = 1.0,
    amcheck: Annotated[bool, Field(description="run pg_amcheck where the database allows it")] = True,
    writer_stop_s: Annotated[int, Field(ge=0, le=600, description="grace period for writers to stop (s)")] = 10,
) -> dict[str, Any]:
    """Assess corruption against the newest good backup; with approval (and not dry_run) restore it by swapping."""
    report, environment = start_report("data-corruption", env, dry_run)
    if not _configured(report, environment, database):
        return finish_report(report)
    with unreachable_as_finding(report):
        rem = RestoreFromBackup(environment, database, backup, row_loss_tolerance_pct, writer_stop_s=writer_stop_s)
        state = rem.check()
        assess(report, rem, state)
        if amcheck and state["exists"]:
            assess_amcheck(report, run_amcheck(environment, database), rem.dbname)
        planned = remediate(rem, dry_run=True)
        if dry_run or not planned.planned or planned.error:
            report.actions.append(planned)
            return finish_report(report)
        approver, how = get_approval(report, rem, state, approved_by, approval_timeout_s)
        if approver is None:
            planned.skipped_reason = f"not applied: {how}; nothing was changed"
            report.actions.append(planned)
            return finish_report(report)
        report.add(Finding(title=f"restore approved by {approver} ({how})", severity=Severity.INFO,
                           subject=rem.target, details={"at": datetime.now(UTC).isoformat(timespec="seconds")},
                           aggregation_key="restore-approval"))
        result = apply_restore(rem, planned.planned)
        report.actions.append(result)
        report_progress(report, rem)
    return finish_report(report)


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


def assess(report: Report, rem: RestoreFromBackup, state: dict[str, Any]) -> None:
    """Findings from the remediation's check: which backup, what is damaged, what was rejected and why."""
    for r in state["rejected"]:
        report.add(Finding(title=f"backup {r['file']} cannot be a restore source: {r['problems'][0]}",
                           severity=Severity.WARNING, subject=r["file"], details={"problems": "; ".join(r["problems"])},
                           aggregation_key=f"restore-rejected:{r['file']}"))
    backup = state["backup"]
    if backup is None:
        report.add(Finding(title=f"no usable backup of {rem.dbname} in {state['store']}", severity=Severity.CRITICAL,
                           subject=rem.target, aggregation_key="restore-no-backup"))
        return
    manifest = backup["manifest"]
    live = state["live"] or {"tables": {}, "key_rows": {}}
    rows = [[t, manifest["key_rows"].get(t), (live.get("key_rows") or {}).get(t)] for t in manifest["key_rows"]]
    tables = TableBlock(title="key tables: rows in the backup vs now", columns=["table", "backup", "now"], rows=rows)
    if state["damage"]:
        report.add(Finding(
            title=f"{rem.dbname} has lost data compared with backup {backup['file']}: "
                  f"{len(state['damage'])} problem(s)",
            severity=Severity.CRITICAL, subject=f"database {rem.dbname}",
            details={"backup": backup["file"], "backup_age_h": backup["age_h"]},
            blocks=[TableBlock(title="damage", columns=["problem"], rows=[[d] for d in state["damage"]]), tables],
            aggregation_key="restore-damage",
        ))
    else:
        report.add(Finding(
            title=f"{rem.dbname} matches backup {backup['file']} (no table, column or key rows lost): nothing to "
                  "restore", severity=Severity.INFO, subject=f"database {rem.dbname}", blocks=[tables],
            aggregation_key="restore-damage",
        ))
    extra = sorted(set(live.get("tables", {})) - set(manifest.get("tables", {})))
    if extra:
        report.notes.append(f"tables not in the backup (created since): {', '.join(extra)}")
    if writers_for(rem.env) is None:
        report.add(Finding(title=NO_DOCKER, severity=Severity.WARNING, subject="writers",
                           details={"writers": ", ".join(n for n, s in rem.env.services.items() if s.writer)},
                           aggregation_key="restore-writers"))


def assess_amcheck(report: Report, result: dict[str, Any], dbname: str) -> None:
    if not result["ran"]:
        report.notes.append(f"pg_amcheck not run: {result['detail']}")
        return
    report.add(Finding(
        title=f"pg_amcheck: {'no corruption found' if result['ok'] else 'CORRUPTION FOUND'}",
        severity=Severity.INFO if result["ok"] else Severity.CRITICAL, subject=f"database {dbname}",
        details={"output": result["detail"][:1000]}, aggregation_key="restore-amcheck",
    ))


def get_approval(report: Report, rem: RestoreFromBackup, state: dict[str, Any], approved_by: str | None,
                 timeout_s: float) -> tuple[str | None, str]:
    """(approver, how) or (None, why not). A Prefect pause when running against a server, else only approved_by."""
    if approved_by:
        return approved_by, "at the terminal (--approve)"
    from prefect.settings import PREFECT_API_URL

    if FlowRunContext.get() is None or not PREFECT_API_URL.value():
        return None, "no approval: run with --apply --approve, or through a Prefect server to approve in the UI"
    backup = state["backup"]
    form = RestoreApproval.with_initial_data(
        description=(f"**Restore {rem.dbname} from {backup['file']}** ({backup['age_h']:.1f} h old).\n\n"
                     f"Damage: {'; '.join(state['damage'])[:1000]}\n\nNothing changes unless you tick *approve*."),
        backup_file=backup["file"], backup_age_h=backup["age_h"], database=rem.dbname,
        damage="; ".join(state["damage"])[:1000], old_database_kept_as=rem.kept_as,
        safety_backup=rem.safety_file,
        writers_to_stop=", ".join(n for n, s in rem.env.services.items() if s.writer) or "none",
    )
    report.notes.append(f"waiting up to {timeout_s:g} s for approval in the Prefect UI")
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=int(timeout_s), poll_interval=APPROVAL_POLL_S,
                                key="restore-approval")
    except FlowPauseTimeout:
        return None, f"approval timed out after {timeout_s:g} s"
    who = answer.approver.strip() or "someone in the Prefect UI"
    if answer.reason:
        report.notes.append(f"approval reason given by {who}: {answer.reason}")
    if not answer.approve:
        return None, f"rejected by {who}"
    if answer.backup_file != backup["file"] or answer.database != rem.dbname:
        return None, "the approval form was changed (backup or database differ from the plan)"
    return who, "in the Prefect UI"


@task(cache_policy=NONE, task_run_name="remediate-restore-from-backup")
def apply_restore(rem: RestoreFromBackup, approved: list[Change]) -> ActionResult:
    """Apply exactly the approved plan: if a fresh check plans anything else, nothing is done."""
    key = [(c.action, c.subject) for c in approved]

    def same_plan() -> str | None:
        now = [(c.action, c.subject) for c in rem.last_plan]
        return None if now == key else "the plan changed after it was approved: run again to see the new plan"

    return run_remediation(rem, dry_run=False, allowed=same_plan)


def report_progress(report: Report, rem: RestoreFromBackup) -> None:
    if not rem.progress:
        return
    rows = [[p["step"], p["detail"], p["at"]] for p in rem.progress]
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
