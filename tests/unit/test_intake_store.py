"""The intake store's pending count, which /healthz reports without a query (it is unauthenticated: a call must
not read up to 1,000 rows, as it once did)."""

from __future__ import annotations

from pathlib import Path

from runbook.app.intake.routing import RunRequest
from runbook.app.intake.store import Store


def _req(key: str) -> RunRequest:
    return RunRequest(key=key, route="r", procedure="db-slowness", env="staging", params={}, target=key,
                      fingerprint="ab12", starts_at="2026-11-27T05:16:15+00:00", alertname="X")


def _counted(store: Store) -> int:
    return int(store._db.execute("SELECT count(*) FROM occurrences WHERE status = 'pending'").fetchone()[0])


def test_pending_count_follows_every_write_and_survives_a_restart(tmp_path: Path) -> None:
    store = Store(tmp_path / "intake.sqlite")
    store.accept([(_req(f"k{i}"), "pending", "") for i in range(5)] + [(_req("s"), "suppressed", "cooldown")])
    store.accept([(_req("k0"), "pending", "")])  # a resend: not a new row
    assert store.pending_count() == _counted(store) == 5
    store.mark_created("k0", "run-0")
    store.mark("k1", "failed", "rejected by Prefect")
    store.mark_resolved("k2")  # pending -> cancelled
    store.mark_resolved("k2")  # twice: nothing more
    store.mark_resolved("nope")
    store.mark_created("k0", "run-0")  # already created
    assert store.pending_count() == _counted(store) == 2
    store.close()
    assert Store(tmp_path / "intake.sqlite").pending_count() == 2
