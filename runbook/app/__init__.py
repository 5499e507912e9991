"""The application shell: the CLI, runbook serve, the executor, the alert intake and the procedure catalog."""

from __future__ import annotations

import sys

# httpx imports its own command-line client (httpx._main: click, pygments, rich.progress, rich.syntax) whenever they
# are installed, and they are (Prefect's and rich's dependencies): 20-35 ms before `runbook run`'s first request, for
# a module nothing here uses. A None entry makes that import fail, and httpx goes without it (its documented
# fallback when the client's extras are missing). Set here, before any module of the shell imports httpx.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
