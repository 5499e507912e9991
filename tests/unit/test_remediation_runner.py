"""The single runner honours the contract: dry run stops at plan, empty plan skips apply, failed verify is an error."""

from __future__ import annotations

from pathlib import Path

from runbook.engine.findings import Change
from runbook.engine.remediation import REGISTRY, Remediation
from runbook.engine.runner import run_remediation


class EnsureLine(Remediation[str]):
    """A real (filesystem) remediation small enough to reason about: make sure a file holds one line."""

    name = "ensure-line"

    def __init__(self, path: Path, line: str, sabotage_verify: bool = False) -> None:
        self.path, self.line, self.sabotage = path, line, sabotage_verify
        self.applies = 0

    @property
    def target(self) -> str:
        return str(self.path)

    def check(self) -> str:
        return self.path.read_text() if self.path.exists() else ""

    def plan(self, state: str) -> list[Change]:
        if state == self.line + "\n":
            return []
        return [Change(action="write", subject=self.path.name, before={"content": state}, after={"content": self.line})]

    def apply(self, plan: list[Change]) -> list[Change]:
        self.applies += 1
        self.path.write_text(self.line + "\n")
        if self.sabotage:
            self.path.write_text("someone else won the race\n")
        return plan

    def verify(self, applied: list[Change]) -> tuple[bool, str]:
        ok = self.check() == self.line + "\n"
        return ok, "content as wanted" if ok else f"content is {self.check()!r}"


def test_dry_run_plans_without_touching(tmp_path: Path) -> None:
    rem = EnsureLine(tmp_path / "f", "x")
    result = run_remediation(rem)  # dry run is the default
    assert result.dry_run and not result.changed and rem.applies == 0
    assert [c.action for c in result.planned] == ["write"]
    assert not (tmp_path / "f").exists()


def test_apply_verifies_and_second_apply_changes_nothing(tmp_path: Path) -> None:
    rem = EnsureLine(tmp_path / "f", "x")
    dry = run_remediation(rem, dry_run=True)
    first = run_remediation(rem, dry_run=False)
    assert first.changed and first.verified and not first.error
    assert [c.model_dump() for c in first.planned] == [c.model_dump() for c in dry.planned]
    second = run_remediation(rem, dry_run=False)
    assert not second.changed and second.planned == [] and rem.applies == 1
    assert "already converged" in second.detail


def test_failed_verify_is_an_error_not_a_success(tmp_path: Path) -> None:
    result = run_remediation(EnsureLine(tmp_path / "f", "x", sabotage_verify=True), dry_run=False)
    assert result.changed and result.verified is False
    assert result.error.startswith("verify failed")


def test_policy_can_narrow_to_dry_run_but_not_widen(tmp_path: Path) -> None:
    rem = EnsureLine(tmp_path / "f", "x")
    refused = run_remediation(rem, dry_run=False, allowed=lambda: "circuit breaker open")
    assert refused.dry_run and not refused.changed and rem.applies == 0
    assert "circuit breaker open" in refused.skipped_reason
    dry = run_remediation(rem, dry_run=True, allowed=lambda: None)
    assert dry.dry_run and rem.applies == 0


def test_registry_holds_the_database_remediations() -> None:
    import tasks.postgres_remediations  # noqa: F401  (registers on import)

    assert {"cancel-long-queries", "terminate-idle-blockers"} <= set(REGISTRY)
