"""The runner applies exactly the plan that was shown, reports partial applies, and is the only way to apply.

EnsureFiles is a real filesystem remediation with several changes (one file each), so plan identity, a target
moving on between plan and apply, and a failure half-way can be shown without a mock.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from runbook.engine.errors import RemediationFailed
from runbook.engine.findings import Change
from runbook.engine.remediation import Remediation
from runbook.engine.runner import apply_plan, plan_remediation


class EnsureFiles(Remediation[dict[str, str]]):
    """Make sure each named file holds ``want``; ``fail_at`` makes the n-th write fail (a broken disk)."""

    name = "ensure-files"

    def __init__(self, root: Path, names: list[str], want: str = "ok", fail_at: int | None = None) -> None:
        self.root, self.names, self.want, self.fail_at = root, names, want, fail_at

    @property
    def target(self) -> str:
        return str(self.root)

    def check(self) -> dict[str, str]:
        return {n: (self.root / n).read_text() if (self.root / n).exists() else "" for n in self.names}

    def plan(self, state: dict[str, str]) -> list[Change]:
        return [Change(action="write", subject=n, key=f"write:{n}:{content}", before={"content": content},
                       after={"content": self.want}) for n, content in state.items() if content != self.want]

    def apply(self, plan: list[Change]) -> list[Change]:
        done: list[Change] = []
        for i, change in enumerate(plan):
            if i == self.fail_at:
                raise RemediationFailed(f"disk full writing {change.subject}", done=done)
            (self.root / change.subject).write_text(self.want)
            done.append(change)
        return done

    def verify(self, applied: list[Change]) -> tuple[bool, str]:
        bad = [c.subject for c in applied if (self.root / c.subject).read_text() != self.want]
        return not bad, f"not as wanted: {bad}" if bad else "all as wanted"


def test_apply_outside_the_runner_is_refused(tmp_path: Path) -> None:
    rem = EnsureFiles(tmp_path, ["a"])
    with pytest.raises(RemediationFailed, match="applied only by the procedure runner"):
        rem.apply(rem.plan(rem.check()))
    assert not (tmp_path / "a").exists()


def test_a_failure_half_way_reports_what_changed_and_verifies_it(tmp_path: Path) -> None:
    rem = EnsureFiles(tmp_path, ["a", "b", "c"], fail_at=2)
    result = apply_plan(rem, plan_remediation(rem))
    assert [c.subject for c in result.applied] == ["a", "b"]
    assert result.changed and result.verified  # verify ran on what changed
    assert "apply failed after 2 of 3 change(s)" in result.error
    assert "left in this state" in result.detail
    assert (tmp_path / "a").read_text() == "ok" and not (tmp_path / "c").exists()


def test_a_target_that_moved_on_is_skipped_and_a_new_one_is_not_applied(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("broken")
    (tmp_path / "b").write_text("broken")
    rem = EnsureFiles(tmp_path, ["a", "b", "c"])
    shown = plan_remediation(rem)
    assert [c.subject for c in shown.planned] == ["a", "b", "c"]
    (tmp_path / "a").write_text("broken differently")  # someone touched it after the plan was shown
    (tmp_path / "c").write_text("ok")  # converged by itself
    rem.names.append("d")  # a target that was never shown to anyone
    result = apply_plan(rem, shown)
    assert [c.subject for c in result.applied] == ["b"]
    assert (tmp_path / "a").read_text() == "broken differently", "applied to something other than the plan"
    assert not (tmp_path / "d").exists(), "applied a change nobody saw"
    assert len(result.skipped) == 2 and all("changed since the plan" in s for s in result.skipped)
    assert result.verified and not result.error
