"""Import contracts (pyproject.toml, import-linter): flows and tasks never import the engine's runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from runbook.config import PROJECT_ROOT


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout
