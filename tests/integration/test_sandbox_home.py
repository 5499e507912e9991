"""The sandbox's PostgreSQL from a clone the postgres OS user cannot reach (root's 0700 home, a pytest temp root)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from runbook import sandbox
from runbook.sandbox.postgres import admin_conninfo

pytestmark = pytest.mark.integration


@pytest.fixture
def closed_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("home")
    home.chmod(0o700)  # like /root: only its owner may traverse it
    yield home / "clone" / ".sandbox"
    sandbox.down(home / "clone" / ".sandbox")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another OS user")
def test_postgres_starts_from_a_home_postgres_cannot_traverse(closed_home: Path) -> None:
    state = sandbox.up(only=["postgres"], state_dir=closed_home)
    rec = state.services["postgres"]
    cluster = Path(rec.paths["cluster_dir"])
    assert not cluster.is_relative_to(closed_home), "the cluster moved where the postgres user can reach it"
    with psycopg.connect(admin_conninfo(rec), connect_timeout=5) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (20000,)
    sandbox.down(closed_home)
    assert not cluster.exists(), "down removes the cluster it put outside the state dir"


def test_a_checkout_others_cannot_enter_gets_its_sandbox_under_the_temp_dir(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """sshd reads its user's key file and serves SFTP as that user, PostgreSQL runs as postgres: the state dir of a
    clone in root's 0700 home must live where they can reach it."""
    from runbook.sandbox import lifecycle

    home = tmp_path_factory.mktemp("closed")
    home.chmod(0o700)
    monkeypatch.delenv("RUNBOOK_SANDBOX_DIR", raising=False)
    monkeypatch.setattr(lifecycle, "project_root", lambda: home / "clone")
    (home / "clone").mkdir()
    chosen = lifecycle.state_dir()
    assert not chosen.is_relative_to(home) and chosen.name.startswith("runbook-sandbox-")
    assert lifecycle.state_dir() == chosen, "the same clone finds the same sandbox again"
    home.chmod(0o755)
    if lifecycle._others_can_enter(home / "clone"):
        assert lifecycle.state_dir() == home / "clone" / ".sandbox"
