"""Findings and reports: data first, rendering later (the Robusta shape).

A flow collects ``Finding``s (what it saw) and ``ActionResult``s (what it did or would do) into one ``Report``.
The same report is rendered as Prefect artifacts for the UI, a rich view for the terminal and JSON for machines;
every renderer redacts secrets on the way out.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, Field
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from runbook.engine.redact import redact, redact_obj


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "critical": 2}[self.value]


class MarkdownBlock(BaseModel):
    kind: Literal["markdown"] = "markdown"
    text: str


class TableBlock(BaseModel):
    kind: Literal["table"] = "table"
    title: str = ""
    columns: list[str]
    rows: list[list[Any]]


class CodeBlock(BaseModel):
    kind: Literal["code"] = "code"
    title: str = ""
    language: str = ""
    text: str


Block = Annotated[MarkdownBlock | TableBlock | CodeBlock, Field(discriminator="kind")]


class Finding(BaseModel):
    """One thing a diagnostic saw. ``aggregation_key`` groups repeats of the same problem (e.g. per subject)."""

    title: str
    severity: Severity = Severity.INFO
    subject: str = Field(description="what the finding is about: a database, a pid, a container, a host")
    details: dict[str, Any] = Field(default_factory=dict)
    blocks: list[Block] = Field(default_factory=list)
    aggregation_key: str = ""


TargetT = TypeVar("TargetT", bound=BaseModel)


class Change(BaseModel):
    """One planned change of a remediation, with the before/after a dry run shows (Ansible's diff).

    ``subject``, ``before`` and ``after`` are for people; ``target`` is for the remediation itself: what ``apply``
    and ``verify`` act on, written by ``plan`` from the remediation's own target model and read back with
    ``target_as``, so no remediation ever parses its own display text. It is plain JSON, so the plan survives
    being stored with a paused run and coming back for the apply.
    """

    action: str = Field(description="verb: cancel, terminate, scale, restart ...")
    subject: str = Field(description="exactly what it acts on, e.g. 'pid 4242'")
    before: dict[str, Any] = Field(default_factory=dict)
    after: dict[str, Any] = Field(default_factory=dict)
    key: str = Field(default="", description="machine identity of the target as planned (pid+start time, container "
                                             "id+state, ...): the runner applies an approved change only while it "
                                             "still holds")
    target: dict[str, Any] = Field(default_factory=dict, description="the remediation's typed target as JSON "
                                                                      "(see target_as); not shown to approvers")

    def identity(self) -> str:
        return self.key or f"{self.action}:{self.subject}"

    @staticmethod
    def target_of(model: BaseModel) -> dict[str, Any]:
        """``model`` as the JSON ``target`` field (datetimes as ISO text, read back exactly by ``target_as``)."""
        dumped: dict[str, Any] = model.model_dump(mode="json")
        return dumped

    def target_as(self, model: type[TargetT]) -> TargetT:
        """The typed target this change was planned with; ``model`` is the remediation's own target model."""
        return model.model_validate(self.target)


class ActionResult(BaseModel):
    """What the remediation runner did: the plan, whether it changed anything, whether verify confirmed it."""

    name: str
    target: str
    dry_run: bool
    planned: list[Change] = Field(default_factory=list)
    applied: list[Change] = Field(default_factory=list, description="what apply actually changed (also on failure)")
    skipped: list[str] = Field(default_factory=list, description="planned changes not applied, each with why")
    changed: bool = False
    verified: bool | None = None
    skipped_reason: str = ""
    error: str = ""
    detail: str = ""


class StepRecord(BaseModel):
    """One step (Prefect task run) of the run, as it ended: what `runbook run` prints for it."""

    name: str
    state: str = Field(description="Completed or Failed")
    seconds: float
    task_run_id: str = ""


class Report(BaseModel):
    procedure: str
    env: str
    dry_run: bool
    started: datetime = Field(default_factory=lambda: datetime.now(UTC))
    finished: datetime | None = None
    findings: list[Finding] = Field(default_factory=list)
    actions: list[ActionResult] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    audit: list[str] = Field(default_factory=list, description="every decision the runner took, in order")
    outcome: str = Field("", description="Completed | Remediated | Needs attention | Not applied")
    flow_run_id: str | None = None
    steps: list[StepRecord] = Field(default_factory=list, description="the run's steps in the order they ended")

    def add(self, finding: Finding) -> Finding:
        self.findings.append(finding)
        return finding

    @property
    def worst(self) -> Severity:
        return max((f.severity for f in self.findings), key=lambda s: s.rank, default=Severity.INFO)

    @property
    def has_critical(self) -> bool:
        return self.worst is Severity.CRITICAL or any(a.error for a in self.actions)

    def finish(self) -> Report:
        self.finished = datetime.now(UTC)
        return self


# ---------------------------------------------------------------- JSON


def report_to_json(report: Report) -> dict[str, Any]:
    """The machine-readable document of ``runbook run --output json``: stable keys, secrets masked."""
    doc = {
        "procedure": report.procedure,
        "env": report.env,
        "dry_run": report.dry_run,
        "started": report.started.isoformat(),
        "finished": report.finished.isoformat() if report.finished else None,
        "flow_run_id": report.flow_run_id,
        "worst_severity": report.worst.value,
        "findings": [
            {
                "severity": f.severity.value,
                "title": f.title,
                "subject": f.subject,
                "details": f.details,
                "blocks": [b.model_dump(mode="json") for b in f.blocks],
            }
            for f in report.findings
        ],
        "actions": [
            {
                "name": a.name,
                "target": a.target,
                "dry_run": a.dry_run,
                "planned": [c.model_dump(mode="json") for c in a.planned],
                "applied": [c.model_dump(mode="json") for c in a.applied],
                "skipped": a.skipped,
                "changed": a.changed,
                "verified": a.verified,
                "skipped_reason": a.skipped_reason,
                "error": a.error,
                "detail": a.detail,
            }
            for a in report.actions
        ],
        "notes": report.notes,
        "audit": report.audit,
        "outcome": report.outcome,
        "steps": [st.model_dump(mode="json") for st in report.steps],
    }
    redacted: dict[str, Any] = redact_obj(json.loads(json.dumps(doc, default=str)))
    return redacted


def report_from_json(doc: dict[str, Any]) -> Report:
    """Rebuild a Report from ``report_to_json`` output (a flow's return value crossing a process boundary)."""
    return Report(
        procedure=doc["procedure"],
        env=doc["env"],
        dry_run=doc["dry_run"],
        started=doc["started"],
        finished=doc.get("finished"),
        flow_run_id=doc.get("flow_run_id"),
        findings=[Finding(**f) for f in doc.get("findings", [])],
        actions=[ActionResult(**a) for a in doc.get("actions", [])],
        notes=doc.get("notes", []),
        audit=doc.get("audit", []),
        outcome=doc.get("outcome", ""),
        steps=[StepRecord(**st) for st in doc.get("steps", [])],
    )


# ---------------------------------------------------------------- Markdown (Prefect UI)


def _md_cell(value: Any) -> str:
    text = redact(_short(value, 160))
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(columns: list[str], rows: list[list[Any]]) -> str:
    head = "| " + " | ".join(_md_cell(c) for c in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    return "\n".join([head, sep, *body])


def _md_block(block: Block) -> str:
    if isinstance(block, MarkdownBlock):
        return redact(block.text)
    if isinstance(block, TableBlock):
        title = f"**{redact(block.title)}**\n\n" if block.title else ""
        return title + (_md_table(block.columns, block.rows) if block.rows else "_(none)_")
    title = f"**{redact(block.title)}**\n\n" if block.title else ""
    return f"{title}```{block.language}\n{redact(block.text)}\n```"


_LABEL = {Severity.CRITICAL: "CRITICAL", Severity.WARNING: "WARNING", Severity.INFO: "info"}


def report_to_markdown(report: Report) -> str:
    """The report as one markdown document: the Prefect artifact an operator reads in the UI.

    Every paragraph, table and heading is its own block separated by a blank line: markdown merges a table with
    whatever follows it on the next line.
    """
    mode = "DRY RUN (nothing was changed)" if report.dry_run else "APPLY"
    parts = [
        f"# {report.procedure} on `{report.env}`: {mode}" + (f" · {report.outcome}" if report.outcome else ""),
        f"Worst severity: **{report.worst.value}** · {len(report.findings)} findings · "
        f"{sum(a.changed for a in report.actions)} of {len(report.actions)} remediations changed something",
        "## Findings",
    ]
    for f in sorted(report.findings, key=lambda f: -f.severity.rank):
        parts += [f"### {_LABEL[f.severity]}: {redact(f.title)}", f"subject `{redact(f.subject)}`"]
        if f.details:
            parts.append(_md_table(["detail", "value"], [[k, v] for k, v in f.details.items()]))
        parts += [_md_block(b) for b in f.blocks]
    parts.append("## Remediations")
    if not report.actions:
        parts.append("_None ran._")
    for a in report.actions:
        parts.append(f"### {a.name} → `{redact(a.target)}`: {_action_status(a)}")
        if a.planned:  # a list, not a table: before/after text wraps on a narrow page instead of running off it
            parts.append("\n".join(_change_item(c) for c in a.planned))
        if a.applied and not a.dry_run:
            parts.append("Changed: " + ", ".join(f"{c.action} `{redact(c.subject)}`" for c in a.applied))
        parts += [f"Skipped: {redact(s)}" for s in a.skipped]
        parts += [redact(text) for text in (a.skipped_reason, a.detail, a.error) if text]
    if report.notes:
        parts += ["## Notes", "\n".join(f"- {redact(n)}" for n in report.notes)]
    if report.audit:
        parts += ["## Decisions", "\n".join(f"- {redact(n)}" for n in report.audit)]
    return "\n\n".join(parts)


def _action_status(a: ActionResult) -> str:
    if a.error:
        return "FAILED"
    if not a.planned:
        return "no change needed"
    if a.dry_run:
        return f"would change {len(a.planned)} (dry run)"
    if a.changed:
        return "changed, verified" if a.verified else "changed, NOT verified"
    if a.skipped_reason:
        return "not applied"
    return "no change"


def _change_item(c: Change) -> str:
    before, after = kv_text(c.before), kv_text(c.after)
    line = f"- **{_md_cell(c.action)}** `{redact(c.subject)}`"
    if before:
        line += f": {_md_cell(before)}"
    if after:
        line += f" → {_md_cell(after)}"
    return line


def kv_text(d: dict[str, Any]) -> str:
    """A change's before/after as one short line (report tables, the approval plan)."""
    return ", ".join(f"{k}={_short(v, 80)}" for k, v in d.items())


def _short(value: Any, limit: int) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------- Prefect artifacts


# ---------------------------------------------------------------- terminal


_STYLE = {Severity.CRITICAL: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def render_terminal(report: Report, console: Console) -> None:
    """A view a person can scan at 3 a.m.: findings by severity, then what was (or would be) done.

    Every piece of report text goes in as a ``Text``, never as a markup string: a finding that quotes
    ``^[a-z][a-z0-9_-]{0,62}$`` or ``[Errno 111]`` prints as it is, on any console."""
    mode = (Text.assemble(("DRY RUN", "bold green"), " — nothing was changed") if report.dry_run
            else Text("APPLY", style="bold magenta"))
    console.rule(Text.assemble((report.procedure, "bold"), " on ", (report.env, "bold")))
    console.print(mode)
    for f in sorted(report.findings, key=lambda f: -f.severity.rank):
        parts: list[Any] = []
        if f.details:
            t = Table(show_header=False, box=None, pad_edge=False)
            for k, v in f.details.items():
                t.add_row(Text(k, style="dim"), Text(redact(_short(v, 200))))
            parts.append(t)
        for b in f.blocks:
            parts.append(_rich_block(b))
        title = Text.assemble((f"{f.severity.value.upper()} ", _STYLE[f.severity]), redact(f.title))
        console.print(Panel(Group(*parts) if parts else Text(redact(f.subject), style="dim"), title=title,
                            title_align="left", subtitle=Text(redact(f.subject)), subtitle_align="right"))
    if report.actions:
        t = Table(title="Remediations", show_lines=False)
        for col in ("remediation", "target", "status", "planned changes"):
            t.add_column(col)
        for a in report.actions:
            planned = "\n".join(f"{c.action} {c.subject}: {kv_text(c.before)}" for c in a.planned) or "-"
            status = _action_status(a) + (f"\n{a.error}" if a.error else "") + (
                f"\n{a.skipped_reason}" if a.skipped_reason else "")
            t.add_row(Text(a.name), Text(redact(a.target)), Text(redact(status)), Text(redact(planned)))
        console.print(t)
    for n in report.notes:
        console.print(Text.assemble(("note: ", "dim"), redact(n)), highlight=False)
    for n in report.audit:
        console.print(Text.assemble(("decision: ", "dim"), redact(n)), highlight=False)
    worst = Text.assemble("worst severity: ", (report.worst.value, _STYLE[report.worst]))
    if report.outcome:
        worst.append_text(Text.assemble(" · outcome: ", (report.outcome, "bold")))
    console.print(worst)


def _rich_block(block: Block) -> RenderableType:
    if isinstance(block, TableBlock):
        t = Table(title=Text(redact(block.title)) if block.title else None, title_justify="left")
        for c in block.columns:
            t.add_column(Text(c))
        for row in block.rows:
            t.add_row(*(Text(redact(_short(v, 120))) for v in row))
        return t
    if isinstance(block, CodeBlock):
        return Text(redact(block.text), style="dim")
    return Text(redact(block.text))
