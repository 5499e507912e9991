"""The house's type rules: mypy over the files pyproject.toml configures ([tool.mypy]) passes.

In the suite, not only in `make lint`, so that CI (`make test`) fails on a type error the same way it fails on a
broken import contract.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from runbook.engine.config import PROJECT_ROOT


def test_mypy_passes_on_the_configured_files() -> None:
    mypy = Path(sys.executable).parent / "mypy"
    proc = subprocess.run([str(mypy)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
