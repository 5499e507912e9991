"""The CLI around backups: the procedures in `runbook list`, approval is never a parameter, `runbook backups list`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from runbook.app.cli import app

RUNNER = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    result = RUNNER.invoke(app, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_list_shows_the_backup_procedures() -> None:
    code, text = invoke("list")
    assert code == 0
    for name in ("backup ", "backup-verification", "data-corruption"):
        assert name in text
    assert "approved_by" not in text and "test_restore" in text


def test_approval_is_never_a_parameter_and_yes_needs_apply() -> None:
    code, text = invoke("run", "data-corruption", "--env", "production", "--yes")
    assert code == 2 and "--yes needs --apply" in text
    code, text = invoke("run", "data-corruption", "--env", "production", "--param", "approved_by=mallory")
    assert code == 2 and "approved_by: data-corruption has no such parameter" in text
    code, text = invoke("run", "data-corruption", "--env", "production", "--apply", "--approve")
    assert code == 2 and "No such option: --approve" in text


def test_backups_list_unknown_env_exits_2() -> None:
    code, text = invoke("backups", "list", "--env", "nowhere")
    assert code == 2 and "unknown environment 'nowhere'" in text


@pytest.mark.integration
def test_backups_list_shows_age_size_and_last_verification(sandbox_state) -> None:  # noqa: ANN001
    from flows.backup import backup
    from flows.backup_verification import backup_verification
    from tests.backup_env import backup_env, create_db, drop_all

    create_db(sandbox_state)
    try:
        with backup_env(sandbox_state) as (_env, directory):
            code, text = invoke("backups", "list", "--env", "bk")
            assert code == 0 and "no backups of pafar_bk" in text
            backup(env="bk", dry_run=False)
            code, text = invoke("backups", "list", "--env", "bk", "--output", "json")
            assert code == 0
            doc = json.loads(text)
            [entry] = doc["backups"]
            assert entry["verification"] == "never verified" and entry["purpose"] == "backup"
            assert entry["size_bytes"] == (directory / entry["file"]).stat().st_size and entry["age_h"] < 1
            backup_verification(env="bk", dry_run=False, test_restore=False)
            code, text = invoke("backups", "list", "--env", "bk")
            assert code == 0 and entry["file"] in text and "passed" in text
    finally:
        drop_all(sandbox_state)
