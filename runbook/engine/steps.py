"""``@step``: the task decorator of every diagnostic step and of the runner's plan/apply steps.

A Prefect task, never cached (every call reads live state), whose exceptions leave it with secrets masked
(``runbook.engine.redact.mask_exception``): Prefect turns an exception into the task run's state message, its
"Task run failed" log line and the flow's state in turn, all shown in the UI. Third-party errors are mapped to
secret-free ones in runbook.engine.clients; this is the net under that boundary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, overload

from prefect import Task, task
from prefect.cache_policies import NONE

from runbook.engine.redact import masked_exceptions

P = ParamSpec("P")
R = TypeVar("R")


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
            with masked_exceptions():
                return body(*args, **kwargs)

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
