"""A planned change carries its machine target as JSON beside the text people read, and reads it back typed."""

from __future__ import annotations

from datetime import UTC, datetime

from runbook.engine.findings import ActionResult, Change, Report, report_from_json, report_to_json, report_to_markdown
from tasks.container_remediations import ContainerTarget
from tasks.postgres_remediations import BackendTarget

STARTED = datetime(2026, 1, 1, 9, 30, 0, 123456, tzinfo=UTC)


def test_target_survives_json_and_reads_back_typed() -> None:
    target = BackendTarget(pid=4242, backend_start=STARTED, since=STARTED, waiters=[7, 9])
    change = Change(action="terminate", subject="pid 4242", key="terminate:pid=4242",
                    before={"state": "idle in transaction"}, target=Change.target_of(target))
    stored = Change.model_validate_json(change.model_dump_json())  # as a paused run's input stores it
    assert stored.target_as(BackendTarget) == target
    assert stored.identity() == change.identity() == "terminate:pid=4242"


def test_target_is_machine_data_not_text_for_people() -> None:
    change = Change(action="restart", subject="container pafar-backend-1", before={"memory": "1.0 GiB"},
                    target=Change.target_of(ContainerTarget(id="abc123", name="pafar-backend-1",
                                                            started_at=STARTED, mem_usage=1 << 30)))
    report = Report(procedure="memory-leak", env="t", dry_run=True,
                    actions=[ActionResult(name="restart-leakers", target="t", dry_run=True, planned=[change])])
    assert "abc123" not in report_to_markdown(report)
    doc = report_to_json(report)
    assert doc["actions"][0]["planned"][0]["target"]["id"] == "abc123"
    again = report_from_json(doc).actions[0].planned[0]
    assert again.target_as(ContainerTarget).started_at == STARTED


def test_planned_changes_are_a_list_that_wraps_not_a_wide_table() -> None:
    """The UI's report page is narrow: each change is one list item (before → after), never a four-column row."""
    long_query = "SELECT " + ", ".join(f"column_{i}" for i in range(40)) + " FROM bookings"
    change = Change(action="cancel", subject="pid 4242", before={"state": "active", "query": long_query},
                    after={"state": "cancelled"})
    report = Report(procedure="db-slowness", env="t", dry_run=True,
                    actions=[ActionResult(name="cancel-long-queries", target="t", dry_run=True, planned=[change])])
    md = report_to_markdown(report)
    assert "- **cancel** `pid 4242`: state=active, query=SELECT column_0" in md
    assert "→ state=cancelled" in md
    assert not [line for line in md.splitlines() if line.startswith("| action")]
