"""Alertmanager 0.25 (Debian prometheus-alertmanager) with its own config and storage, no cluster gossip port.

The receiver is a webhook whose URL is configurable: ``RUNBOOK_SANDBOX_ALERT_WEBHOOK_URL`` at `up`, or
``write_config(dir, url)`` + ``reload(port)`` later (the alert intake points it at itself). Without one, alerts
go to a receiver with no integrations. Grouping waits are 1 s so a test sees a notification within seconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import yaml

from runbook.engine.daemon import http_ok

from . import net
from .base import Requirement, Service, ServiceRecord
from .daemon import start_daemon

BINARY = "/usr/bin/prometheus-alertmanager"
ENV_WEBHOOK_URL = "RUNBOOK_SANDBOX_ALERT_WEBHOOK_URL"
CONFIG_FILE = "alertmanager.yml"
RECEIVER = "runbook"
MAX_ALERTS = 200  # per notification, as deploy/alertmanager/runbook-receiver.yml: within the intake's bounds


def alertmanager_config(webhook_url: str | None) -> dict[str, Any]:
    """The sandbox's Alertmanager config: one route to the runbook receiver (a webhook when a URL is given)."""
    receiver: dict[str, Any] = {"name": RECEIVER}
    if webhook_url:
        receiver["webhook_configs"] = [{"url": webhook_url, "send_resolved": True, "max_alerts": MAX_ALERTS}]
    return {
        "route": {"receiver": RECEIVER, "group_by": ["alertname", "job"], "group_wait": "1s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [receiver],
    }


def write_config(directory: Path, webhook_url: str | None) -> Path:
    path = directory / CONFIG_FILE
    path.write_text(yaml.safe_dump(alertmanager_config(webhook_url), sort_keys=False))
    return path


def reload(port: int, timeout: float = 5.0) -> None:
    """Ask a running Alertmanager to re-read its config (POST /-/reload); raises httpx.HTTPError on failure."""
    httpx.post(f"http://{net.LOOPBACK}:{port}/-/reload", timeout=timeout, trust_env=False).raise_for_status()


class Alertmanager(Service):
    name = "alertmanager"
    requirements = (Requirement(BINARY, "prometheus-alertmanager"),)

    def start(self, state: Path, port: int, peers: dict[str, ServiceRecord] | None = None) -> ServiceRecord:
        d = self.fresh_dir(state)
        (d / "data").mkdir()
        config = write_config(d, os.environ.get(ENV_WEBHOOK_URL) or None)
        listen = f"{net.LOOPBACK}:{port}"
        cmd = [BINARY, f"--config.file={config}", f"--storage.path={d / 'data'}", f"--web.listen-address={listen}",
               "--cluster.listen-address=", f"--web.external-url=http://{listen}/"]
        return start_daemon(self.name, cmd, port=port, log=d / "alertmanager.log", cwd=d,
                            health_url=f"http://{listen}/-/ready", markers=[BINARY, listen],
                            paths={"dir": str(d), "config": str(config)})

    def is_healthy(self, record: ServiceRecord) -> bool:
        return http_ok(f"http://{net.LOOPBACK}:{record.port}/-/ready")


SERVICE = Alertmanager()
