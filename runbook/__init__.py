"""runbook: the Pafar monitoring runbook as Prefect flows of diagnostics and dry-run-first remediations."""

from __future__ import annotations

import os

# Telemetry off wherever Prefect runs (set before anything imports prefect).
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"

__version__ = "0.1.0"

# An embedded (ephemeral) Prefect API takes 15-30 s to start here; Prefect's default 20 s limit fails a cold start.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
