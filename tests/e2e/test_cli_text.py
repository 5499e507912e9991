"""What the CLI prints is what was meant: text with brackets survives rich (no markup is read from user text), and
hostile playbooks (alias bomb, 10,000-deep nesting, an oversize file) are a one-line config error with exit 2,
never a traceback. Each through a real `runbook` subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runbook.engine.config import MAX_PLAYBOOK_BYTES
from runbook.sandbox import SandboxState
from tests.integration.derived_env import derive

PATTERN = "^[a-z][a-z0-9_-]{0,62}$"


def cli(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "400", "RUNBOOK_LOCAL_SERVER": "0", **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "runbook.app.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def test_a_pattern_in_a_config_error_prints_whole(tmp_path: Path) -> None:
    """rich read ``[a-z]`` and ``[key]`` as style tags and dropped them: the message said ``^{0,62}$``."""
    (tmp_path / "p.yaml").write_text("environments:\n  Bad_Name:\n    description: x\n")
    proc = cli("check", "--playbooks", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert f"environments.Bad_Name.[key]: String should match pattern '{PATTERN}'" in proc.stderr, proc.stderr


def test_a_bad_parameter_value_with_brackets_prints_whole() -> None:
    proc = cli("run", "db-slowness", "--env", "production", "--param", "top=[bold red]x[/]", "--in-process")
    assert proc.returncode == 2, proc.stderr
    assert "--param top='[bold red]x[/]'" in proc.stderr, proc.stderr


def _route(params: str) -> str:
    return ("environments:\n  staging:\n    description: x\nroutes:\n  - name: r\n    match: {alertname: X}\n"
            "    procedure: db-slowness\n    env: staging\n    params:\n" + params)


@pytest.mark.parametrize("case", ["alias-bomb", "depth-bomb", "oversize"])
def test_hostile_playbooks_are_a_config_error_exit_2_without_traceback(tmp_path: Path, case: str) -> None:
    path = tmp_path / "p.yaml"
    if case == "alias-bomb":
        lines = ["      l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        lines += [f"      l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
        path.write_text(_route("\n".join(lines) + "\n"))
        expected = "refused: more than 100000 nodes with aliases expanded"
    elif case == "depth-bomb":
        path.write_text(_route("      deep: " + "[" * 10_000 + "]" * 10_000 + "\n"))
        expected = "refused: nested deeper than 64 levels"
    else:
        path.write_text(_route("      big: '" + "x" * MAX_PLAYBOOK_BYTES + "'\n"))
        expected = f"larger than the limit of {MAX_PLAYBOOK_BYTES} bytes for a playbook file"
    proc = cli("check", "--playbooks", str(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: {path}: ") and expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr) < 500, proc.stderr[-2000:]


@pytest.mark.integration
def test_a_report_quoting_brackets_prints_them(sandbox_state: SandboxState, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, dead_port: int) -> None:
    """A real run's report (findings, table blocks) renders a URL with ``[a-z]`` in it as it is."""
    url = f"http://127.0.0.1:{dead_port}/x[a-z]y[bold]"
    name = derive(sandbox_state, tmp_path, monkeypatch, "brackets",
                  {"http_checks": {"brackets": {"url": url, "timeout_s": 2}}}, drop=("network",))
    monkeypatch.setenv("RUNBOOK_PLAYBOOKS", os.pathsep.join([sandbox_state.engine_env()["RUNBOOK_PLAYBOOKS"],
                                                             str(tmp_path)]))
    proc = cli("run", "network-checks", "--env", name, "--in-process",
               extra_env={"PREFECT_API_URL": sandbox_state.prefect_api_url or ""})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    # the finding's title and subtitle, its details table, and the checks and timings table blocks: everywhere
    assert proc.stdout.count("x[a-z]y[bold]") >= 5 and f":{dead_port}/xy" not in proc.stdout, proc.stdout
