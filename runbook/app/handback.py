"""One writer for a run's last state: a draining executor's hand-back, or the run's own final state, never both.

``Executor.stop`` hands the runs still running after the grace period back to the pool (``AwaitingRetry``, forced:
Prefect lets a run leave RUNNING for SCHEDULED only by force). A run's thread lets go of the run a moment after its
final state is accepted (the after-final-state hook writes its artifacts first), so "still claimed" does not mean
"unfinished": a forced hand-back in that window turned a Completed run back into a scheduled one, for the next
executor to run a second time (caught once in CI). The other order is as bad: a handed-back run whose thread
still runs would write its final state over the hand-back, or over the successor's run of it.

Prefect's orchestration cannot settle this (it lets a Completed run without a persisted result be rescheduled;
its state API has no compare-and-set), and both writers live in this process, so the gate is here: every flow-run
state the engine proposes for a run this executor holds goes through the run's lock, and so does the hand-back.
Whichever comes first wins; the hand-back skips a run whose final state was accepted, and a handed-back run's
thread is stopped (Prefect's ``Abort``) at its next flow-run state instead of writing it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import prefect.flow_engine
from prefect.client.schemas import State
from prefect.exceptions import Abort

RUNNING, FINAL, HANDED_BACK = "running", "final", "handed back"


class _Held:
    __slots__ = ("lock", "phase")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.phase = RUNNING


_guard = threading.Lock()
_held: dict[str, _Held] = {}
_original: Callable[..., State[Any]] | None = None


def install() -> None:
    """Route the flow engine's flow-run state proposals through the gate (once per process; Prefect 3.9's sync
    engine calls ``propose_state_sync`` from ``FlowRunEngine.set_state`` for every flow-run state it writes)."""
    global _original
    with _guard:
        if _original is None and hasattr(prefect.flow_engine, "propose_state_sync"):
            _original = prefect.flow_engine.propose_state_sync
            prefect.flow_engine.propose_state_sync = _gated_propose


@contextmanager
def holding(run_id: str) -> Iterator[None]:
    """While the caller runs ``run_id``: its states go through the gate. Leaving forgets the run."""
    with _guard:
        _held[run_id] = _Held()
    try:
        yield
    finally:
        with _guard:
            _held.pop(run_id, None)


def hand_back_unless_final(run_id: str, write: Callable[[], None]) -> bool:
    """Call ``write`` (the forced hand-back) unless the run's final state was accepted or its thread let go of it;
    from then on the run's own thread writes no flow-run state. False when nothing was written; if ``write``
    raises, the run is its thread's again and the error goes to the caller."""
    with _guard:
        held = _held.get(run_id)
    if held is None:
        return False  # its thread let go: it finished (or never started) here
    with held.lock:  # waits out a proposal in flight: its answer decides
        if held.phase != RUNNING:
            return False
        held.phase = HANDED_BACK
        try:
            write()
        except BaseException:
            held.phase = RUNNING
            raise
    return True


def _gated_propose(client: Any, state: State[Any], flow_run_id: Any = None, *args: Any, **kwargs: Any) -> State[Any]:
    assert _original is not None
    with _guard:
        held = _held.get(str(flow_run_id))
    if held is None:  # not a run an executor holds (an in-process `runbook run`, a test's flow)
        return _original(client, state, flow_run_id, *args, **kwargs)
    with held.lock:
        if held.phase == HANDED_BACK:
            raise Abort(f"run {flow_run_id} was handed back to the pool by its draining executor: "
                        f"this thread writes none of its states")
        result = _original(client, state, flow_run_id, *args, **kwargs)
        if result.is_final():
            held.phase = FINAL
        return result
