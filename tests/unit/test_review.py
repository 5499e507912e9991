"""The post-incident review's pure parts: markdown that hostile text cannot restructure, files that /metrics
reads back, and histograms per procedure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from runbook.app.intake.metrics import Metrics
from runbook.app.review import Event, Figures, Review, load_reviews, md, to_markdown, write_files

HOSTILE = "x\n## heading <script>alert(1)</script> | [a](http://e) `c` *b*"


def _review(occurrence: str, remediate: float | None, recover: float | None) -> Review:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    return Review(occurrence=occurrence, alertname=HOSTILE, fingerprint="ab12", route="r", procedure="service-outage",
                  alert_started=t0, figures=Figures(time_to_remediate_s=remediate, time_to_recover_s=recover),
                  runs=[], timeline=[Event(at=t0 + timedelta(seconds=1), kind="state", text=HOSTILE, state="Running")])


def test_hostile_text_stays_inside_its_cell() -> None:
    text = to_markdown(_review("a" * 32, 10, 20))
    assert "<script>" not in text and "\n## heading" not in text
    assert md(HOSTILE) == ("x \\#\\# heading &lt;script&gt;alert\\(1\\)&lt;/script&gt; \\| \\[a\\]\\(http://e\\) "
                           "\\`c\\` \\*b\\*")
    table = [line for line in text.splitlines() if line.startswith("| 00:00:01")]
    assert len(table) == 1 and table[0].count(" | ") == 2  # three cells: the pipe in the text is escaped


def test_written_reviews_feed_the_histograms(tmp_path: Path) -> None:
    write_files(_review("a" * 32, 10, 20), tmp_path)
    write_files(_review("b" * 32, None, 700), tmp_path)  # nothing changed: recovered when the alert resolved
    (tmp_path / "incident-review-broken.json").write_text("{not json")
    metrics = Metrics()
    for review in load_reviews(tmp_path):
        metrics.observe_review(review.procedure, review.figures.time_to_remediate_s, review.figures.time_to_recover_s)
    text = metrics.exposition()
    assert 'runbook_incident_time_to_remediate_seconds_count{procedure="service-outage"} 1.0' in text
    assert 'runbook_incident_time_to_recover_seconds_count{procedure="service-outage"} 2.0' in text
    assert 'runbook_incident_time_to_recover_seconds_bucket{le="600.0",procedure="service-outage"} 1.0' in text


def test_cli_refuses_what_is_not_an_id_before_asking_anyone(monkeypatch) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    from runbook.app.cli import app

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens: nothing may be asked
    result = CliRunner().invoke(app, ["incident", "review", "main; rm -rf / [x]"])
    assert result.exit_code == 2
    assert "is not a flow run id, an occurrence key or an alert fingerprint" in result.output
