"""The CLI around backups: the procedures in `runbook list`, approval is never a parameter, `runbook backups list`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from typer.testing import CliRunner

from runbook.app.cli import app
from runbook.sandbox import SandboxState
from tests.integration.derived_env import derive

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


@pytest.mark.integration
def test_backup_dry_run_with_a_wrong_password_is_an_error_naming_the_environment(
        sandbox_state: SandboxState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to plan a backup and exit 0 (the dry run never logged in); now it tries the login pg_dump would use
    on the sandbox's real PostgreSQL, and the refused password is a critical finding, exit 3, nothing written."""
    right = sandbox_state.env_vars()["RUNBOOK_SANDBOX_DB_DSN"]
    wrong_password = "Wrong-Pw-7311"
    parts = conninfo_to_dict(right)
    assert parts.get("password") and parts["password"] != wrong_password
    name = derive(sandbox_state, tmp_path, monkeypatch, "wrongpw",
                  {"databases": {"main": {"dsn": {"env": "RUNBOOK_TEST_WRONG_PW_DSN"}}}})
    monkeypatch.setenv("RUNBOOK_TEST_WRONG_PW_DSN", make_conninfo(**{**parts, "password": wrong_password}))
    monkeypatch.setenv("RUNBOOK_PLAYBOOKS", os.pathsep.join([sandbox_state.engine_env()["RUNBOOK_PLAYBOOKS"],
                                                             str(tmp_path)]))
    backups = Path(yaml.safe_load(sandbox_state.playbook_path.read_text())
                   ["environments"]["sandbox"]["backups"]["directory"])
    before = sorted(p.name for p in backups.iterdir())
    proc = subprocess.run([sys.executable, "-m", "runbook.app.cli", "run", "backup", "--env", name, "--in-process",
                           "--output", "json"], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PREFECT_API_URL": sandbox_state.prefect_api_url or ""})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    [action] = doc["actions"]
    assert action["planned"] == [] and "password authentication failed" in action["error"], action
    critical = [f for f in doc["findings"] if f["severity"] == "critical"]
    assert any(f["title"].startswith(f"backup cannot be taken: database {name}/main unreachable")
               and "password authentication failed" in f["title"] and f["subject"] == f"{name}/main"
               for f in critical), doc["findings"]
    assert doc["outcome"] == "Needs attention"
    assert wrong_password not in proc.stdout + proc.stderr and parts["password"] not in proc.stdout + proc.stderr
    assert sorted(p.name for p in backups.iterdir()) == before  # a dry run writes nothing
