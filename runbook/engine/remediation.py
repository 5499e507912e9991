"""The remediation contract (Ansible check mode): check, plan, apply, verify.

A remediation reads state (``check``), computes the changes needed (``plan``: empty means already converged),
mutates (``apply``) and re-reads to confirm (``verify``). Only the engine's runner (runbook.engine.runner) may call
``apply``: every subclass's ``apply`` is wrapped so that a call outside the runner raises, whoever makes it. Guards
that make repeats safe (pid still running the same query, container not restarted since the alert) live in
``plan`` (as each change's ``key``) and are re-checked inside ``apply``.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar, Generic, TypeVar

from runbook.engine.errors import RemediationFailed
from runbook.engine.findings import Change

StateT = TypeVar("StateT")

_APPLY_PERMIT: ContextVar[bool] = ContextVar("runbook_apply_permit", default=False)


@contextmanager
def _permit_apply() -> Iterator[None]:
    """Held by runbook.engine.runner while it applies a plan; nothing else in the project uses it (import contract)."""
    token = _APPLY_PERMIT.set(True)
    try:
        yield
    finally:
        _APPLY_PERMIT.reset(token)


class Remediation(ABC, Generic[StateT]):
    """Subclass, set ``name``, implement the four steps; ``@register`` it so the contract suite runs it."""

    name: ClassVar[str]
    whole_plan: ClassVar[bool] = False
    """True when the changes of a plan are steps of one operation (stop, back up, restore, swap, start): a run
    resumed after approval then applies the new plan only if it is still exactly what was approved, never a part."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        apply = cls.__dict__.get("apply")
        if apply is not None and not getattr(apply, "_guarded", False):
            # replacing the subclass's method is the point (mypy forbids assigning to a method: setattr says so)
            setattr(cls, "apply", _guarded(apply))  # noqa: B010

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
        """Carry out the plan, re-checking each guard; return the changes actually made.

        On failure raise RemediationFailed(..., done=[changes made so far]).
        """

    @abstractmethod
    def verify(self, applied: list[Change]) -> tuple[bool, str]:
        """Re-read state and confirm the applied changes took effect: (ok, human-readable detail)."""


def _guarded(apply: Callable[..., list[Change]]) -> Callable[..., list[Change]]:
    @functools.wraps(apply)
    def guarded(self: Remediation[Any], plan: list[Change]) -> list[Change]:
        if not _APPLY_PERMIT.get():
            raise RemediationFailed(f"{type(self).name}: apply refused: remediations are applied only by the "
                                    "procedure runner (plan, policy, approval, apply, verify)")
        return apply(self, plan)

    guarded.__dict__["_guarded"] = True  # the mark __init_subclass__ looks for (a function attribute, typed)
    return guarded


REGISTRY: dict[str, type[Remediation[Any]]] = {}

R = TypeVar("R", bound=type[Remediation[Any]])


def register(cls: R) -> R:
    """Add a remediation class to the registry that the standard contract test suite walks."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"remediation name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls
