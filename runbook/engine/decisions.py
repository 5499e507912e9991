"""What a person sees and decides about a run: the plan view, the decision and who decided (the run-input keys
they are stored under: runbook.engine.run_inputs). No Prefect import: the CLI's warm path (`runbook run`,
`approvals`, `approve`) reads and answers these over the REST API; runbook.engine.approval does the pausing."""

from __future__ import annotations

import getpass
import json
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

from pydantic import BaseModel, Field

DEFAULT_APPROVAL_TIMEOUT_S = 1800.0
APPROVER_PATTERN = r"^[A-Za-z0-9_.@+ -]{1,128}$"
TIMEOUT_APPROVER = "runbook-approval-timeout"  # who "answers" a suspended run nobody decided in time


class Decision(BaseModel):
    approved: bool
    approver: str = ""
    reason: str = ""
    how: str = ""
    approved_changes: list[str] | None = None  # a resumed run: the identities of the changes that were shown


class PlanView(BaseModel):
    """What a person approves: the findings that matter and the exact changes. Stored with the paused run."""

    procedure: str
    env: str
    run_id: str = ""
    route: str = ""
    targets: list[str] = Field(default_factory=list)
    findings: list[str] = Field(default_factory=list)
    changes: list[str] = Field(default_factory=list)
    identities: list[str] = Field(default_factory=list, description="``remediation|Change.identity()`` per change: "
                                  "what a run resumed after approval may apply")
    asked_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    deadline: datetime | None = None

    def text(self) -> str:
        lines = [f"{self.procedure} on {self.env}: approve these changes?", "found:"]
        lines += [f"  - {f}" for f in self.findings] or ["  - nothing above info"]
        lines += ["plan (nothing has been changed yet):"] + [f"  - {c}" for c in self.changes]
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = [f"## Approve remediation: {self.procedure} on `{self.env}`", "", "What was found:"]
        lines += [f"- {f}" for f in self.findings] or ["- nothing above info"]
        lines += ["", "The plan (nothing has been changed yet):"] + [f"- {c}" for c in self.changes]
        lines += ["", "Set **approve**, give your name and submit to apply exactly this plan; reject (or let it "
                  "time out) and nothing changes."]
        return "\n".join(lines)


LocalApprover = Callable[[PlanView], Decision]
_LOCAL: ContextVar[LocalApprover | None] = ContextVar("runbook_local_approver", default=None)


@contextmanager
def local_approver(fn: LocalApprover) -> Iterator[None]:
    """Install how an in-process run asks (the CLI's terminal prompt or ``--yes``) for the block's runs."""
    token = _LOCAL.set(fn)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def operator_identity() -> str:
    """Who is at this terminal or runs this script: OS user and host."""
    return f"{getpass.getuser()}@{socket.gethostname()}"[:128]


def parse_plan_input(raw: str) -> PlanView | None:
    """The stored plan of a paused run (``runbook approvals``); None when it is not one of ours."""
    try:
        value = json.loads(raw)
        if isinstance(value, str):  # Prefect stores inputs JSON-encoded
            value = json.loads(value)
        return PlanView.model_validate(value)
    except (ValueError, TypeError):
        return None
