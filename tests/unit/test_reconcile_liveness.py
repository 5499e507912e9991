"""When an executor counts as dead: three missed heartbeats, never less than MIN_SILENCE_S of silence."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

from prefect.client.schemas.objects import Worker

from runbook.app.reconcile import MIN_SILENCE_S, MISSED_BEATS, heartbeat_fresh


def _worker(silent_s: float, interval_s: float, now: datetime) -> Worker:
    return Worker(id=uuid4(), name="runbook-host-1", work_pool_id=uuid4(),
                  last_heartbeat_time=now - timedelta(seconds=silent_s), heartbeat_interval_seconds=int(interval_s))


def test_a_fast_heartbeat_does_not_shrink_the_deadline_below_the_floor() -> None:
    """1 s heartbeats (tests, the multi-node storm): a live executor stalled 10 s by a busy machine stays alive."""
    now = datetime.now(UTC)
    assert heartbeat_fresh(_worker(10, 1, now), now, 1)
    assert heartbeat_fresh(_worker(MIN_SILENCE_S - 1, 1, now), now, 1)
    assert not heartbeat_fresh(_worker(MIN_SILENCE_S + 1, 1, now), now, 1)


def test_a_slow_heartbeat_allows_three_missed_beats() -> None:
    now = datetime.now(UTC)
    assert heartbeat_fresh(_worker(MISSED_BEATS * 15 - 1, 15, now), now, 15)
    assert not heartbeat_fresh(_worker(MISSED_BEATS * 15 + 1, 15, now), now, 15)


def test_an_executor_that_never_beat_is_not_alive() -> None:
    now = datetime.now(UTC)
    w = _worker(0, 15, now)
    w.last_heartbeat_time = None
    assert not heartbeat_fresh(w, now, 15)
