"""``@step``: the task decorator of every diagnostic step and of the runner's plan/apply steps.

A Prefect task, never cached (every call reads live state), whose exceptions leave it with secrets masked
(``runbook.engine.redact.mask_exception``): Prefect turns an exception into the task run's state message, its
"Task run failed" log line and the flow's state in turn, all shown in the UI. Third-party errors are mapped to
secret-free ones in runbook.engine.clients; this is the net under that boundary.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar, overload

from prefect import Task, task
from prefect.cache_policies import NONE
from prefect.context import TaskRunContext

from runbook.engine.findings import StepRecord
from runbook.engine.redact import masked_exceptions

P = ParamSpec("P")
R = TypeVar("R")

# The steps of the run in progress, as they end (shared by every step thread of the run: Prefect runs a submitted
# task in a copy of the submitting context, which holds this same list).
_RECORD: ContextVar[list[StepRecord] | None] = ContextVar("runbook_steps", default=None)


@contextmanager
def recording_steps() -> Iterator[list[StepRecord]]:
    """Record every step that ends inside the block: the run's report carries them, so `runbook run` shows each step
    of a finished run without asking the Prefect server, whose task-run records trail the run by up to a second."""
    steps: list[StepRecord] = []
    token = _RECORD.set(steps)
    try:
        yield steps
    finally:
        _RECORD.reset(token)


def _record(body: Callable[..., Any], state: str, started: float) -> None:
    steps = _RECORD.get()
    if steps is None:
        return
    ctx = TaskRunContext.get()
    name, run_id = body.__name__, ""
    if ctx is not None:
        run_id = str(ctx.task_run.id)
        name = ctx.task_run.name if ctx.task.task_run_name is not None else ctx.task.name
    steps.append(StepRecord(name=name, state=state, seconds=round(time.monotonic() - started, 3),
                            task_run_id=run_id))


@overload
def step(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def step(*, task_run_name: str | None = None, retries: int | None = None) -> Callable[[Callable[P, R]], Task[P, R]]:
    ...


def step(fn: Callable[P, R] | None = None, /, *, task_run_name: str | None = None,
         retries: int | None = None) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """``@step`` or ``@step(task_run_name=..., retries=...)`` on a module-level function."""

    def deco(body: Callable[P, R]) -> Task[P, R]:
        @functools.wraps(body)
        def masked(*args: P.args, **kwargs: P.kwargs) -> R:
            started, state = time.monotonic(), "Failed"
            try:
                with masked_exceptions():
                    result = body(*args, **kwargs)
                state = "Completed"
                return result
            finally:
                _record(body, state, started)

        # Prefect names the task, keys it and reads its parameters from the function itself, not this wrapper
        masked.__prefect_task_source__ = body  # type: ignore[attr-defined]
        options: dict[str, Any] = {"cache_policy": NONE}
        if task_run_name is not None:
            options["task_run_name"] = task_run_name
        if retries is not None:
            options["retries"] = retries
        made: Task[P, R] = task(masked, **options)
        return made

    return deco(fn) if fn is not None else deco
