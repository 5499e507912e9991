"""pool_status_command: validated as an argument list by the playbook schema; its output parsed (JSON or
SQLAlchemy's pool.status()) and judged beside the server's counts (pure parts; tests/integration/test_pools.py runs
it in the sandbox backend)."""

from __future__ import annotations

from pathlib import Path

import pytest

from assessments.pools import pool_finding
from runbook.engine.config import load_playbooks
from runbook.engine.errors import ConfigError
from runbook.engine.findings import Severity
from tasks.pool_status import PoolStatus, demux, parse_pool_status
from tasks.postgres import ConnectionTotals

PLAYBOOK = """
environments:
  staging:
    services:
      backend: {pool_status_command: %s}
"""


def _load(tmp_path: Path, command: str) -> list[str] | None:
    (tmp_path / "p.yaml").write_text(PLAYBOOK % command)
    return load_playbooks([tmp_path]).environment("staging").services["backend"].pool_status_command


def test_an_argument_list_is_accepted_as_it_is(tmp_path: Path) -> None:
    argv = ["python", "-c", "from app.core.database import engine; print(engine.pool.status())"]
    assert _load(tmp_path, '[python, -c, "from app.core.database import engine; print(engine.pool.status())"]') \
        == argv


@pytest.mark.parametrize(("command", "why"), [
    ('"python -c \'print(1)\'"', "valid list"),  # a string would need a shell to split it: refused
    ("[]", "at least 1 item"),
    ('["python", "a\\nb"]', "should match pattern"),
    ('["sh", "a\\u0000b"]', "should match pattern"),
    ('[""]', "at least 1 character"),
    ("[" + ", ".join(["x"] * 65) + "]", "at most 64 items"),
])
def test_anything_but_a_bounded_argument_list_is_refused(tmp_path: Path, command: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"services\.backend\.pool_status_command") as err:
        _load(tmp_path, command)
    assert why in str(err.value)


def test_json_and_sqlalchemy_status_parse_alike() -> None:
    json_out = '{"pool_size": 5, "checked_out": 2, "checked_in": 3, "overflow": 0, "note": "x", "flag": true}'
    assert parse_pool_status(json_out) == {"pool_size": 5, "checked_out": 2, "checked_in": 3, "overflow": 0}
    text = ("Pool size: 5  Connections in pool: 3 Current Overflow: -3 Current Checked out connections: 2")
    assert parse_pool_status(text) == {"pool_size": 5, "checked_in": 3, "overflow": -3, "checked_out": 2}
    assert parse_pool_status("Traceback (most recent call last): ...") == {}
    assert parse_pool_status("[1, 2]") == {}


def test_a_saturated_or_unreadable_pool_is_a_warning_beside_the_server_counts() -> None:
    totals = [ConnectionTotals("pafar", 12, 15, 100, 3, "15.6")]
    fine = pool_finding([PoolStatus("backend", "b-1", True, 5, 1, 4, 0)], totals)
    assert fine is not None and fine.severity is Severity.INFO
    assert fine.title == ("connection pools: b-1 1 of 5 checked out | server: 12 connections to pafar "
                          "(15 of 97 usable server-wide)")
    full = pool_finding([PoolStatus("backend", "b-1", True, 5, 7, 0, 2),
                         PoolStatus("backend", "b-2", False, error="no status: no answer within 1 s")], totals)
    assert full is not None and full.severity is Severity.WARNING
    assert full.details == {"saturated": "b-1", "unreadable": "b-2: no status: no answer within 1 s"}
    assert full.blocks[0].rows[0][-1] == "saturated"  # type: ignore[union-attr]
    assert pool_finding([], totals) is None


def test_the_exec_stream_is_demultiplexed_and_a_plain_one_left_alone() -> None:


    framed = b"\x01\x00\x00\x00\x00\x00\x00\x03abc" + b"\x02\x00\x00\x00\x00\x00\x00\x02de"
    assert demux(framed) == b"abcde"
    assert demux(b'{"pool_size": 5}') == b'{"pool_size": 5}'
    assert demux(b"") == b""
