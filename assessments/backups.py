"""Assessments shared by the backup procedures (backup, backup-verification)."""

from __future__ import annotations

from runbook.engine.config import Environment
from runbook.engine.findings import Finding, Report, Severity


def assess_backups_configured(report: Report, environment: Environment) -> bool:
    """False (and a critical finding) when the environment has no ``backups:`` section to work with."""
    if environment.backups is not None:
        return True
    report.add(Finding(title="no backups: section in the playbook", severity=Severity.CRITICAL,
                       subject=f"environment {environment.name}", aggregation_key="backup-config"))
    return False
