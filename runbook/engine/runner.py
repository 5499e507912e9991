"""The one code path that applies a remediation: plan, then apply exactly the plan that was shown, then verify.

``plan_remediation`` runs check + plan (never changes anything). ``apply_plan`` re-reads the state, keeps only the
planned changes whose identity (``Change.key``: pid + start time, container id + state, ...) still holds, applies
those, and verifies what changed. A change whose target moved on since the plan is skipped and reported, never
applied to something else; a change that appeared only now was not shown to anyone and is not applied. A failed
apply still reports what it changed, and verify runs on that. Flows and tasks never import this module (import
contract in pyproject.toml): runbook.engine.procedure drives it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from runbook.engine.errors import RemediationFailed, TargetUnreachable
from runbook.engine.findings import ActionResult, Change
from runbook.engine.redact import redact
from runbook.engine.remediation import Remediation, StateT, _permit_apply

log = logging.getLogger(__name__)

_UNSET: Any = object()


def plan_remediation(rem: Remediation[StateT], state: StateT = _UNSET) -> ActionResult:
    """check + plan as a dry run; an unreachable target is the result's error, not an exception."""
    result = ActionResult(name=rem.name, target=rem.target, dry_run=True)
    try:
        result.planned = rem.plan(rem.check() if state is _UNSET else state)
    except TargetUnreachable as exc:
        result.error = redact(str(exc))
        return result
    result.detail = (f"dry run: would make {len(result.planned)} change(s)" if result.planned
                     else "already converged: nothing to do")
    return result


def apply_plan(rem: Remediation[Any], planned: ActionResult) -> ActionResult:
    """Apply exactly ``planned.planned`` (re-checked against the current state), then verify what changed."""
    result = planned.model_copy(deep=True)
    result.dry_run, result.detail = False, ""
    try:
        fresh = {c.identity() for c in rem.plan(rem.check())}
    except TargetUnreachable as exc:
        result.error = redact(f"apply not started: {exc}")
        return result
    todo = [c for c in result.planned if c.identity() in fresh]
    result.skipped = [f"{c.action} {c.subject}: its target changed since the plan (converged or moved on)"
                      for c in result.planned if c.identity() not in fresh]
    if not todo:
        result.detail = "nothing left to change: every planned target converged or moved on since the plan"
        result.verified = True
        return result
    applied: list[Change] = []
    try:
        with _permit_apply():
            applied = rem.apply(todo)
    except RemediationFailed as exc:
        applied = list(exc.done)
        result.error = redact(f"apply failed after {len(applied)} of {len(todo)} change(s): {exc}")
    except TargetUnreachable as exc:
        result.error = redact(f"apply failed after 0 of {len(todo)} change(s) reported: {exc}")
    result.applied = applied
    result.changed = bool(applied)
    done = {c.identity() for c in applied}
    if not result.error:
        result.skipped += [f"{c.action} {c.subject}: its guard no longer held at apply time"
                           for c in todo if c.identity() not in done]
    if not applied:
        if not result.error:
            result.detail = "guards found nothing left to change (state moved on since the plan)"
            result.verified = True
        return result
    try:
        ok, detail = rem.verify(applied)
    except (RemediationFailed, TargetUnreachable) as exc:
        ok, detail = False, f"verify could not run: {exc}"
    result.verified = ok
    result.detail = redact(detail) if not result.error else redact(f"left in this state: {detail}")
    if not ok and not result.error:
        result.error = redact(f"verify failed: {detail}")
    log.info("remediation %r on %r: changed=%d verified=%r", rem.name, rem.target, len(applied), ok)
    return result


def run_remediation(rem: Remediation[Any], *, dry_run: bool = True,
                    allowed: Callable[[], str | None] | None = None) -> ActionResult:
    """plan, then (unless dry run or ``allowed`` gives a reason not to) apply that plan and verify it.

    The single-remediation path of the standard contract suite; procedures go through runbook.engine.procedure.
    """
    planned = plan_remediation(rem)
    if planned.error or not planned.planned or dry_run:
        return planned
    reason = allowed() if allowed is not None else None
    if reason:
        planned.skipped_reason = f"not applied: {reason}"
        return planned
    return apply_plan(rem, planned)
