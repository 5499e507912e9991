"""Procedure: Log Analysis (the runbook's four "Common Log Queries").

Diagnose: errors in the last hour, responses over ``slow_response_ms`` (5000 ms), authentication failures in 24 h
and payment errors, each with its count, top messages (terms aggregation) and a time histogram; from Elasticsearch
when configured, else from the service containers' logs. Optionally narrowed to one service.
Remediate: nothing; the report says so.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from runbook.engine.config import Thresholds
from runbook.engine.findings import Block, Finding, Report, Severity, TableBlock
from runbook.engine.params import EnvName, ServiceName
from runbook.engine.procedure import current_run, procedure, unreachable_as_finding
from tasks.logs import analyze_logs

NOTHING_TO_REMEDIATE = "log-analysis diagnoses only: there is nothing to remediate (dry_run changes nothing here)"


@procedure("log-analysis", tags=('logs',),
           summary="Log Analysis: the four Kibana queries with counts, top messages and a histogram")
def log_analysis(
    env: EnvName,
    dry_run: bool = True,
    service: Annotated[ServiceName | None, Field(description="only this service's logs")] = None,
) -> None:
    """The runbook's four Kibana queries with counts, top messages and a histogram."""
    run = current_run()
    report, environment = run.report, run.env
    with unreachable_as_finding(report):
        result = analyze_logs(environment, None, service)
        report.notes.extend(result["notes"])
        if result["source"] == "none":  # nothing looked at is not "nothing found": say so where it is seen
            report.add(Finding(title="no log source configured: the log queries were not run",
                               severity=Severity.WARNING, subject=f"environment {env}",
                               details={"configure": "elasticsearch, docker or log_files in the playbook"},
                               aggregation_key="logs:no-source"))
        assess_logs(report, result["results"], environment.thresholds)
    report.notes.append(NOTHING_TO_REMEDIATE)


def _severity(name: str, count: int, thresholds: Thresholds) -> Severity:
    if name == "errors":
        return Severity.WARNING if count > thresholds.log_errors_per_hour else Severity.INFO
    if name in ("payment_errors", "slow_responses"):
        return Severity.WARNING if count else Severity.INFO
    return Severity.INFO


def _bar(count: int, peak: int) -> str:
    return "█" * max(1, round(20 * count / peak)) if peak else ""


def assess_logs(report: Report, results: dict[str, dict[str, Any]], thresholds: Thresholds) -> None:
    for name, r in results.items():
        if r["error"]:
            report.add(Finding(title=f"{r['title']}: query failed: {r['error']}", severity=Severity.WARNING,
                               subject=r["source"], details={"query": r["query"]}, aggregation_key=f"logs:{name}"))
            continue
        peak = max((c for _, c in r["histogram"]), default=0)
        blocks: list[Block] = [
            TableBlock(title="top messages", columns=["message", "count"], rows=[[m, c] for m, c in r["top_messages"]]),
            TableBlock(title="over time", columns=["from", "count", ""],
                       rows=[[t, c, _bar(c, peak)] for t, c in r["histogram"]])]
        if r["hits"]:
            blocks.append(TableBlock(title="latest matching entries", columns=["time", "level", "service",
                                                                                "response ms", "message"],
                                     rows=[[h.get("@timestamp") or h.get("timestamp"), h.get("level"), h.get("service"),
                                            h.get("response_time"), h.get("message")] for h in r["hits"][:10]]))
        report.add(Finding(
            title=f"{r['title']}: {r['count']} matching log entries", severity=_severity(name, r["count"], thresholds),
            subject=f"{r['source']}: {r['query']}", details={"query": r["query"], "source": r["source"],
                                                            "count": r["count"]},
            blocks=blocks, aggregation_key=f"logs:{name}"))
