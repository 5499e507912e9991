"""The communication stand-ins (runbook.sandbox.comms_app) as a sandbox service: a Statuspage-shaped API and a
Slack-compatible incoming webhook on loopback, which the generated playbook's ``status_page`` and
``incident_webhook`` point at. Their key and token are secrets: in secrets.env, never in the playbook."""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from runbook.engine.daemon import http_ok, start_ticks

from . import net, process
from .base import Service, ServiceRecord

START_TIMEOUT_S = 15.0
MODULE = "runbook.sandbox.comms_app"
PAGE_ID = "sandbox-page"
ENV_API_KEY = "RUNBOOK_SANDBOX_STATUSPAGE_KEY"
ENV_WEBHOOK = "RUNBOOK_SANDBOX_INCIDENT_WEBHOOK"
COMPONENTS = {"backend": "backend-api", "nginx": "web-frontend", "celery-worker": "background-jobs"}


class Comms(Service):
    name = "comms"
    requirements = ()  # the running interpreter only

    def start(self, state: Path, port: int, peers: dict[str, ServiceRecord] | None = None) -> ServiceRecord:
        d = self.fresh_dir(state)
        log = d / "comms.log"
        keys = d / "keys.json"
        fd = os.open(keys, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"page_id": PAGE_ID, "api_key": secrets.token_urlsafe(24),
                       "slack_token": secrets.token_urlsafe(18)}, f)
        proc = process.spawn([sys.executable, "-m", MODULE, "--port", str(port), "--keys", str(keys)], log, cwd=d)
        record = ServiceRecord(name=self.name, pid=proc.pid, port=port, log_file=str(log),
                               paths={"dir": str(d), "keys": str(keys)},
                               cmdline_markers=[MODULE, f"--port {port}"])
        process.await_healthy(proc, lambda: self.is_healthy(record), START_TIMEOUT_S,
                              f"comms stand-in on 127.0.0.1:{port}", log)
        record.proc_start = start_ticks(proc.pid)
        record.running = True
        self.reuse(record, {})
        return record

    def is_healthy(self, record: ServiceRecord) -> bool:
        return http_ok(f"{base_url(record.port)}/healthz")

    def reuse(self, record: ServiceRecord, env: dict[str, str]) -> None:
        """The key and token the running stand-in checks, read back from its own 0600 file."""
        record.secrets = json.loads(Path(record.paths["keys"]).read_text())

    def secrets_env(self, record: ServiceRecord) -> dict[str, str]:
        return {ENV_API_KEY: record.secrets["api_key"],
                ENV_WEBHOOK: f"{base_url(record.port)}/slack/{record.secrets['slack_token']}"}

    def playbook_fragment(self, record: ServiceRecord) -> dict[str, Any]:
        return {
            "status_page": {"provider": "statuspage", "url": base_url(record.port), "page_id": PAGE_ID,
                            "api_key": {"env": ENV_API_KEY}, "components": dict(COMPONENTS), "timeout_s": 3},
            "incident_webhook": {"url": {"env": ENV_WEBHOOK}, "timeout_s": 3},
        }


def base_url(port: int) -> str:
    return f"http://{net.LOOPBACK}:{port}"


SERVICE = Comms()
