"""Test helper: a playbook environment derived from the running sandbox's, with some keys changed or added.

Written to a temporary directory (with a copy of secrets.env) that RUNBOOK_PLAYBOOKS points at, so a flow can be
run by environment name against real services plus a deliberately broken or unusual target.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook.sandbox import SandboxState


def derive(state: SandboxState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
           changes: dict[str, Any], drop: tuple[str, ...] = ()) -> str:
    """Write environment ``name`` = the sandbox environment updated with ``changes`` (dicts merged one level)."""
    doc = yaml.safe_load(state.playbook_path.read_text())
    env = dict(doc["environments"]["sandbox"])
    for key in drop:
        env.pop(key, None)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(env.get(key), dict):
            env[key] = {**env[key], **value}
        else:
            env[key] = value
    shutil.copy(state.secrets_env_path, tmp_path / "secrets.env")
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"environments": {name: env}}, sort_keys=False))
    monkeypatch.setenv("RUNBOOK_PLAYBOOKS", str(tmp_path))
    return name
