"""node_exporter (Debian prometheus-node-exporter) on a loopback port: the host metrics of the runbook."""

from __future__ import annotations

from pathlib import Path

from runbook.engine.daemon import http_ok

from . import net
from .base import Requirement, Service, ServiceRecord
from .daemon import start_daemon

BINARY = "/usr/bin/prometheus-node-exporter"
# The collectors behind the runbook's system metrics (CPU, memory, disk, network I/O, load); the rest stay off
# so a 1 s scrape stays cheap on a 2-core machine.
COLLECTORS = ("cpu", "meminfo", "filesystem", "netdev", "loadavg")


class NodeExporter(Service):
    name = "node_exporter"
    requirements = (Requirement(BINARY, "prometheus-node-exporter"),)

    def start(self, state: Path, port: int, peers: dict[str, ServiceRecord] | None = None) -> ServiceRecord:
        d = self.fresh_dir(state)
        listen = f"{net.LOOPBACK}:{port}"
        cmd = [BINARY, f"--web.listen-address={listen}", "--collector.disable-defaults",
               *(f"--collector.{c}" for c in COLLECTORS)]
        return start_daemon(self.name, cmd, port=port, log=d / "node_exporter.log", cwd=d,
                            health_url=f"http://{listen}/metrics", markers=[BINARY, listen], paths={"dir": str(d)})

    def is_healthy(self, record: ServiceRecord) -> bool:
        return http_ok(f"http://{net.LOOPBACK}:{record.port}/metrics")


SERVICE = NodeExporter()
