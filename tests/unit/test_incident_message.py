"""The incident-channel message: the findings that matter, worst first and bounded, the plan or what changed, and
no label value able to add lines, mention the channel or leak a secret."""

from __future__ import annotations

from runbook.engine.findings import ActionResult, Change, Finding, Report, Severity
from runbook.engine.notify import MAX_FINDINGS, incident_detail, slack_escape
from runbook.engine.redact import register_secret

HOSTILE = "<!channel> x\nsecond line\u2028third & <http://evil|click>"


def _report(dry_run: bool) -> Report:
    report = Report(procedure="service-outage", env="prod", dry_run=dry_run)
    report.add(Finding(title="all fine", severity=Severity.INFO, subject="a"))
    report.add(Finding(title="slow", severity=Severity.WARNING, subject="b"))
    for i in range(MAX_FINDINGS + 3):
        report.add(Finding(title=f"down {i} {HOSTILE}", severity=Severity.CRITICAL, subject=HOSTILE))
    change = Change(action="start", subject="container web-1")
    report.actions.append(ActionResult(name="start-service-containers", target="prod/web", dry_run=dry_run,
                                       planned=[change], applied=[] if dry_run else [change],
                                       changed=not dry_run, verified=not dry_run))
    return report


def test_findings_worst_first_bounded_and_the_plan() -> None:
    text = incident_detail(_report(dry_run=True))
    lines = text.splitlines()
    assert lines[0] == "Findings (worst first):"
    assert all(line.startswith("- CRITICAL: down") for line in lines[1:MAX_FINDINGS + 1])
    assert lines[MAX_FINDINGS + 1] == "- … and 4 more"  # three more critical and the warning
    assert "all fine" not in text
    assert "Plan (DRY RUN, nothing changed):" in lines
    assert "- would: start-service-containers: start container web-1" in lines


def test_what_changed_and_its_verification() -> None:
    lines = incident_detail(_report(dry_run=False)).splitlines()
    assert "Changes:" in lines and "- changed: start-service-containers: start container web-1" in lines
    assert "  verified: yes" in lines


def test_hostile_values_stay_on_their_line_and_cannot_mention_anyone() -> None:
    text = slack_escape(incident_detail(_report(dry_run=True)))
    assert len(text.splitlines()) == 1 + MAX_FINDINGS + 1 + 2  # heading, findings, "more", plan
    assert "<!channel>" not in text and "<http" not in text and "&lt;!channel&gt;" in text
    assert all(len(line) < 400 for line in text.splitlines())


def test_secrets_are_masked() -> None:
    register_secret("hunter2-incident-secret")
    report = Report(procedure="db-slowness", env="prod", dry_run=True)
    report.add(Finding(title="dsn postgresql://u:hunter2-incident-secret@db/x", severity=Severity.CRITICAL,
                       subject="db hunter2-incident-secret"))
    assert "hunter2-incident-secret" not in incident_detail(report)
