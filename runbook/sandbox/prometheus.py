"""Prometheus 2.42 (Debian prometheus) scraping the sandbox backend and node_exporter every second.

Its own config and TSDB dir in the state dir; alerts go to the sandbox Alertmanager when it runs. Rule files are
read from ``RULE_GLOBS`` (the runbook's alert rules, deploy/prometheus/*.yml, once they exist) and can be changed
with ``POST /-/reload`` (lifecycle API enabled).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from runbook.engine.daemon import http_ok

from . import net
from .base import Requirement, Service, ServiceRecord
from .daemon import start_daemon

BINARY = "/usr/bin/prometheus"
CONFIG_FILE = "prometheus.yml"
BACKEND_JOB = "pafar-backend"  # the runbook's ServiceDown: up{job="pafar-backend"} == 0
NODE_JOB = "node"
RULE_GLOBS = [str(Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "*.yml")]


def url(port: int) -> str:
    return f"http://{net.LOOPBACK}:{port}"


def prometheus_config(peers: dict[str, ServiceRecord]) -> dict[str, Any]:
    """Scrape jobs for whichever peers run; 1 s scrape and evaluation so tests see changes within seconds."""
    jobs = []
    if "backend" in peers:
        jobs.append({"job_name": BACKEND_JOB, "static_configs": [
            {"targets": [f"{net.LOOPBACK}:{peers['backend'].port}"], "labels": {"service": "backend"}}]})
    if "node_exporter" in peers:
        jobs.append({"job_name": NODE_JOB,
                     "static_configs": [{"targets": [f"{net.LOOPBACK}:{peers['node_exporter'].port}"]}]})
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s",
                   "external_labels": {"environment": "sandbox"}},  # the shipped routes read it (env_label)
        "rule_files": RULE_GLOBS,
        "scrape_configs": jobs,
    }
    if "alertmanager" in peers:
        config["alerting"] = {"alertmanagers": [
            {"static_configs": [{"targets": [f"{net.LOOPBACK}:{peers['alertmanager'].port}"]}]}]}
    return config


class Prometheus(Service):
    name = "prometheus"
    uses = ("backend", "node_exporter", "alertmanager")
    requirements = (Requirement(BINARY, "prometheus"),)

    def start(self, state: Path, port: int, peers: dict[str, ServiceRecord] | None = None) -> ServiceRecord:
        d = self.fresh_dir(state)
        (d / "data").mkdir()
        config = d / CONFIG_FILE
        config.write_text(yaml.safe_dump(prometheus_config(peers or {}), sort_keys=False))
        listen = f"{net.LOOPBACK}:{port}"
        cmd = [BINARY, f"--config.file={config}", f"--storage.tsdb.path={d / 'data'}",
               f"--web.listen-address={listen}", "--web.enable-lifecycle", "--storage.tsdb.retention.time=1d",
               f"--web.external-url={url(port)}/"]
        return start_daemon(self.name, cmd, port=port, log=d / "prometheus.log", cwd=d,
                            health_url=f"{url(port)}/-/ready", markers=[BINARY, listen],
                            paths={"dir": str(d), "config": str(config)}, timeout_s=30)

    def is_healthy(self, record: ServiceRecord) -> bool:
        return http_ok(f"{url(record.port)}/-/ready")

    def playbook_fragment(self, record: ServiceRecord) -> dict[str, Any]:
        return {"prometheus_url": url(record.port)}


SERVICE = Prometheus()
