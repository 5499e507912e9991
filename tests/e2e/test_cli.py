"""The operator's CLI: exit codes, bad input named clearly, JSON output, and no secret anywhere."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from runbook.app.cli import app
from tests.prefect_runs import api_headers, run_artifacts

RUNNER = CliRunner()
GOOD = "environments:\n  staging:\n    databases:\n      main:\n        dsn: {env: CLI_TEST_DSN}\n"


def invoke(*args: str, env: dict[str, str] | None = None):  # noqa: ANN201
    result = RUNNER.invoke(app, list(args), env=env)
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def cli(*args: str, extra_env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "runbook.app.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def test_list_shows_procedures_with_parameters() -> None:
    code, text = invoke("list")
    assert code == 0
    assert "db-slowness" in text and "long_query_s" in text and "dry_run" not in text  # --apply, not --param


def test_unknown_procedure_exits_2() -> None:
    code, text = invoke("run", "nope", "--env", "sandbox")
    assert code == 2 and "unknown procedure 'nope'" in text


def test_bad_param_exits_2_naming_it(tmp_path: Path) -> None:
    code, text = invoke("run", "db-slowness", "--env", "staging", "--param", "top=lots",
                        env={"RUNBOOK_PLAYBOOKS": str(tmp_path)})
    assert code == 2 and "--param top='lots'" in text
    code, text = invoke("run", "db-slowness", "--env", "staging", "--param", "dry_run=false")
    assert code == 2 and "use --apply" in text
    code, text = invoke("run", "db-slowness", "--env", "staging", "--param", "rm -rf /")
    assert code == 2 and "expected key=value" in text


def test_invalid_playbook_exits_2_with_file_and_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD + "    thresholds: {db_connections: many}\n    surprise: 1\n")
    for args in (["check", "--playbooks", str(tmp_path)], ["run", "db-slowness", "--env", "staging"]):
        code, text = invoke(*args, env={"RUNBOOK_PLAYBOOKS": str(tmp_path)})
        assert code == 2, text
        assert f"{bad}: environments.staging.thresholds.db_connections" in text.replace("\n", "")
        assert "environments.staging.surprise: unknown key" in text.replace("\n", "")


def test_missing_secret_exits_2_naming_variable(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(GOOD)
    env = {"RUNBOOK_PLAYBOOKS": str(tmp_path), "CLI_TEST_DSN": ""}
    code, text = invoke("run", "db-slowness", "--env", "staging", env=env)
    assert code == 2
    assert "environments.staging.databases.main.dsn: environment variable CLI_TEST_DSN is not set" in " ".join(
        text.split())
    code, text = invoke("check", "--playbooks", str(tmp_path), "--env", "staging", env=env)
    assert code == 2 and "CLI_TEST_DSN" in text


def test_check_project_playbooks_and_schema() -> None:
    code, text = invoke("check")
    assert code == 0 and "production" in text
    code, text = invoke("check", "--schema")
    assert code == 0 and json.loads(text)["title"] == "PlaybookFile"


def test_check_env_resolves_every_secret_and_the_env_file(tmp_path: Path) -> None:
    """`check --env` is honest: a missing env_file and an unresolvable admin_dsn are errors naming them."""
    (tmp_path / "p.yaml").write_text(GOOD.replace("dsn: {env: CLI_TEST_DSN}\n", "dsn: {env: CLI_TEST_DSN}\n"
                                                  "        admin_dsn: {env: CLI_TEST_ADMIN_DSN}\n"))
    env = {"RUNBOOK_PLAYBOOKS": str(tmp_path), "CLI_TEST_DSN": "postgresql://u@127.0.0.1/db"}
    code, text = invoke("check", "--env", "staging", env=env)
    assert code == 2 and "databases.main.admin_dsn" in text and "CLI_TEST_ADMIN_DSN" in text, text
    code, _ = invoke("check", "--env", "staging", env={**env, "CLI_TEST_ADMIN_DSN": "postgresql://a@127.0.0.1/db"})
    assert code == 0
    (tmp_path / "p.yaml").write_text(GOOD.replace("  staging:\n", "  staging:\n    env_file: nowhere.env\n"))
    code, text = invoke("check", "--env", "staging", env=env)
    assert code == 2 and "env_file" in text and "nowhere.env" in text and "not a readable file" in text, text


@pytest.mark.integration
def test_run_json_against_sandbox_has_the_documented_shape_and_no_secret(sandbox_state) -> None:  # noqa: ANN001
    password = sandbox_state.env_vars()["RUNBOOK_SANDBOX_DB_DSN"].split(":")[2].split("@")[0]
    proc = cli("run", "db-slowness", "--env", "sandbox", "--output", "json",
               extra_env={"PREFECT_API_URL": sandbox_state.prefect_api_url})
    assert proc.returncode in (0, 3), proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) >= {"procedure", "env", "dry_run", "started", "finished", "findings", "actions", "steps"}
    assert doc["procedure"] == "db-slowness" and doc["env"] == "sandbox" and doc["dry_run"] is True
    steps = {st["name"]: st for st in doc["steps"]}  # every step the run ran, the runner's plan steps included
    assert {"get_activity_snapshot", "get_pool_status", "plan-cancel-long-queries"} <= set(steps), doc["steps"]
    assert all(st["state"] == "Completed" and st["task_run_id"] for st in steps.values()), doc["steps"]
    for a in doc["actions"]:
        assert set(a) >= {"name", "target", "planned", "changed", "verified"}
    assert password not in proc.stdout + proc.stderr

    # nor in what the Prefect server stored: the run's logs and artifacts
    api = sandbox_state.prefect_api_url
    run_id = doc["flow_run_id"]
    with httpx.Client(timeout=10, headers=api_headers()) as http:
        logs = http.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}}).json()
    arts = run_artifacts(api, run_id)
    assert any("# db-slowness on `sandbox`" in (a.get("data") or "") for a in arts)
    assert password not in json.dumps(logs) + json.dumps(arts)


@pytest.mark.integration
def test_unreachable_database_exits_3(tmp_path: Path, sandbox_state) -> None:  # noqa: ANN001
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    (tmp_path / "p.yaml").write_text(GOOD)
    proc = cli("run", "db-slowness", "--env", "staging", extra_env={
        "RUNBOOK_PLAYBOOKS": str(tmp_path), "PREFECT_API_URL": sandbox_state.prefect_api_url,
        "CLI_TEST_DSN": f"postgresql://runbook:Cli-Secret-99@127.0.0.1:{port}/pafar"})
    assert proc.returncode == 3, proc.stderr
    assert "unreachable" in proc.stdout
    assert "Cli-Secret-99" not in proc.stdout + proc.stderr
