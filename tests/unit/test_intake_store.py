"""The intake's SQLite store: the pending count /healthz reports without a query (it is unauthenticated: a call
must not read up to 1,000 rows, as it once did), dispatch claims, and a damaged file stopping it rather than being
replaced. The shared-state behaviour of both backends is in tests/integration/test_intake_shared_state.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from runbook.app.intake.routing import RunRequest
from runbook.app.intake.store import KnownKeys, SqliteStore
from runbook.engine.errors import ConfigError


def _req(key: str) -> RunRequest:
    return RunRequest(key=key, route="r", procedure="db-slowness", env="staging", params={}, target=key,
                      fingerprint="ab12", starts_at="2026-11-27T05:16:15+00:00", alertname="X")


def _counted(store: SqliteStore) -> int:
    return int(store._db.execute("SELECT count(*) FROM occurrences WHERE status = 'pending'").fetchone()[0])


def test_pending_count_follows_every_write_and_survives_a_restart(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "intake.sqlite")
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
    assert SqliteStore(tmp_path / "intake.sqlite").pending_count() == 2


def _filled(path: Path, rows: int = 300) -> None:
    store = SqliteStore(path)
    store.accept([(_req(f"k{i}"), "pending", "") for i in range(rows)])
    store.close()


def test_a_file_that_is_not_a_database_stops_the_store_and_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "intake.sqlite"
    path.write_bytes(b"these are not the bytes of a SQLite database\n" * 200)
    before = path.read_bytes()
    with pytest.raises(ConfigError) as caught:
        SqliteStore(path)
    assert str(path) in str(caught.value) and "not a usable SQLite database" in str(caught.value)
    assert path.read_bytes() == before, "the damaged store was modified"


def test_a_damaged_page_fails_the_integrity_check_and_history_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "intake.sqlite"
    _filled(path)
    raw = bytearray(path.read_bytes())
    page = int.from_bytes(raw[16:18], "big")  # the header's page size
    raw[page * 3:page * 3 + 64] = b"\xff" * 64  # a b-tree page header of the occurrences table or an index
    path.write_bytes(bytes(raw))
    with pytest.raises(ConfigError) as caught:
        SqliteStore(path)
    assert str(path) in str(caught.value) and "integrity check failed" in str(caught.value)
    assert path.read_bytes() == bytes(raw), "the damaged store was modified"


def test_a_claim_is_one_dispatcher_s_until_released_and_a_restart_frees_it(tmp_path: Path) -> None:
    path = tmp_path / "intake.sqlite"
    store = SqliteStore(path)
    store.accept([(_req(f"k{i}"), "pending", "") for i in range(3)])
    assert [o.key for o in store.claim()] == ["k0", "k1", "k2"]
    assert store.claim() == [] and store.pending_count() == 3
    store.release("k1")
    assert [o.key for o in store.claim()] == ["k1"]
    store.mark_created("k0", "run-0")
    store.close()
    again = SqliteStore(path)  # the process that claimed k1 and k2 is gone
    assert [o.key for o in again.claim()] == ["k1", "k2"] and again.pending_count() == 2


def test_known_keys_are_remembered_once_stored_and_bounded(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "intake.sqlite")
    store.accept([(_req("k0"), "pending", ""), (_req("k1"), "suppressed", "cooldown")])
    store._db.close()  # any query would fail now: what was stored is known from memory
    assert store.known_keys(["k0", "k1", "k0"]) == {"k0", "k1"}
    known = KnownKeys(limit=2)
    known.add(["a", "b", "c"])  # the oldest is forgotten (and would be looked up again)
    found, ask = known.split(["a", "b", "c", "d"])
    assert found == {"b", "c"} and sorted(ask) == ["a", "d"]
