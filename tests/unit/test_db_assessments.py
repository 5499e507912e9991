"""Pure parts of db-slowness: blocking tree, EXPLAIN safety rules, index candidates from plans."""

from __future__ import annotations

import pytest

from tasks.postgres import BlockedBy, blocking_tree, explain_mode, seq_scan_filters


def test_blocking_tree_finds_root_through_chains() -> None:
    sessions = [BlockedBy(1, []), BlockedBy(2, [1]), BlockedBy(3, [2]), BlockedBy(4, [1]), BlockedBy(5, [])]
    assert blocking_tree(sessions) == {1: [2, 3, 4]}


def test_blocking_tree_survives_cycles() -> None:
    sessions = [BlockedBy(1, [2]), BlockedBy(2, [1])]
    assert blocking_tree(sessions) == {}


@pytest.mark.parametrize(
    ("query", "mode"),
    [
        ("SELECT * FROM bookings WHERE user_id = $1", "generic"),
        ("SELECT count(*) FROM bookings", "analyze"),
        ("select * from t for update", "plain"),
        ("UPDATE payments SET status = 'x'", "plain"),
        ("DELETE FROM users WHERE id = $1", "generic"),
        ("SELECT 1; DROP TABLE users", "skip"),
        ("VACUUM bookings", "skip"),
        ("CREATE TABLE x (a int)", "skip"),
        ("  SELECT 1;  ", "analyze"),
    ],
)
def test_explain_mode_never_executes_writes(query: str, mode: str) -> None:
    assert explain_mode(query)[0] == mode


def test_seq_scan_filters_finds_filter_columns() -> None:
    plan = {"Plan": {"Node Type": "Gather", "Plans": [
        {"Node Type": "Seq Scan", "Relation Name": "bookings", "Schema": "public",
         "Filter": "(user_id = $1)"},
        {"Node Type": "Index Scan", "Relation Name": "users", "Index Cond": "(id = $2)"},
    ]}}
    assert seq_scan_filters(plan) == [("public", "bookings", ["user_id"])]
    assert seq_scan_filters(None) == []
