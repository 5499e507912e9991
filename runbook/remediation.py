"""The remediation contract (Ansible check mode) and the one runner that honours dry_run.

A remediation reads state (``check``), computes the changes needed (``plan``: empty means already converged),
mutates (``apply``) and re-reads to confirm (``verify``). ``run_remediation`` is the only code that calls ``apply``:
a dry run stops after ``plan``, an empty plan skips ``apply``, and a failed verify is an error, never a silent
success. Guards that make repeats safe (pid still running the same query, container not restarted since the alert)
live in ``plan`` and are re-checked inside ``apply``.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from runbook.errors import RemediationFailed, TargetUnreachable
from runbook.findings import ActionResult, Change
from runbook.redact import redact

log = logging.getLogger(__name__)

StateT = TypeVar("StateT")


class Remediation(ABC, Generic[StateT]):
    """Subclass, set ``name``, implement the four steps; ``@register`` it so the contract suite runs it."""

    name: ClassVar[str]

    @property
    @abstractmethod
    def target(self) -> str:
        """What it acts on, for the report (e.g. 'sandbox/main')."""

    @abstractmethod
    def check(self) -> StateT:
        """Read the current state. Must not change anything."""

    @abstractmethod
    def plan(self, state: StateT) -> list[Change]:
        """The changes needed to converge; empty when nothing needs doing. Must not change anything."""

    @abstractmethod
    def apply(self, plan: list[Change]) -> list[Change]:
        """Carry out the plan, re-checking each guard; return the changes actually made."""

    @abstractmethod
    def verify(self, applied: list[Change]) -> tuple[bool, str]:
        """Re-read state and confirm the applied changes took effect: (ok, human-readable detail)."""


REGISTRY: dict[str, type[Remediation[Any]]] = {}

R = TypeVar("R", bound=type[Remediation[Any]])


def register(cls: R) -> R:
    """Add a remediation class to the registry that the standard contract test suite walks."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"remediation name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passed (verify steps wait for the world to settle)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def run_remediation(rem: Remediation[Any], *, dry_run: bool = True,
                    allowed: Callable[[], str | None] | None = None) -> ActionResult:
    """Drive check -> plan -> (apply -> verify) and report it. Dry run is the default.

    ``allowed`` may return a reason to refuse applying (a policy narrowing the run to dry-run); it can only narrow.
    Unreachable targets and failed applies become an ``ActionResult`` with ``error`` set, not exceptions, so one
    failing remediation never hides the report of the others.
    """
    result = ActionResult(name=rem.name, target=rem.target, dry_run=dry_run)
    try:
        state = rem.check()
        result.planned = rem.plan(state)
    except TargetUnreachable as exc:
        result.error = redact(str(exc))
        return result
    if not result.planned:
        result.detail = "already converged: nothing to do"
        return result
    if not dry_run and allowed is not None:
        reason = allowed()
        if reason:
            result.dry_run = True
            result.skipped_reason = f"not applied: {reason}"
            return result
    if dry_run:
        result.detail = f"dry run: would make {len(result.planned)} change(s)"
        return result
    try:
        applied = rem.apply(result.planned)
    except (RemediationFailed, TargetUnreachable) as exc:
        result.error = redact(f"apply failed: {exc}")
        return result
    result.changed = bool(applied)
    if not applied:
        result.detail = "guards found nothing left to change (state moved on since the plan)"
        result.verified = True
        return result
    try:
        ok, detail = rem.verify(applied)
    except (RemediationFailed, TargetUnreachable) as exc:
        ok, detail = False, f"verify could not run: {exc}"
    result.verified = ok
    result.detail = redact(detail)
    if not ok:
        result.error = redact(f"verify failed: {detail}")
    log.info("remediation %r on %r: changed=%r verified=%r", rem.name, rem.target, result.changed, ok)
    return result
