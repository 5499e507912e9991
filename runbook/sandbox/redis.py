"""Redis 7 for the sandbox: no persistence, loopback only, run in the foreground under our PID."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from runbook.engine.daemon import start_ticks

from . import net, process
from .base import Requirement, Service, ServiceRecord

REDIS_SERVER = "/usr/bin/redis-server"
START_TIMEOUT_S = 10.0


class Redis(Service):
    name = "redis"
    requirements = (Requirement(REDIS_SERVER, "redis-server"),)

    def start(self, state: Path, port: int, peers: dict[str, ServiceRecord] | None = None) -> ServiceRecord:
        d = self.fresh_dir(state)
        log = d / "redis.log"
        cmd = [
            REDIS_SERVER,
            "--bind",
            net.LOOPBACK,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(d),
            "--logfile",
            str(log),
            "--daemonize",
            "no",
        ]
        proc = process.spawn(cmd, log, cwd=d)
        record = ServiceRecord(
            name=self.name,
            pid=proc.pid,
            port=port,
            log_file=str(log),
            paths={"dir": str(d)},
            # redis-server rewrites its title to "redis-server 127.0.0.1:PORT"
            cmdline_markers=["redis-server", f"{net.LOOPBACK}:{port}"],
        )
        process.await_healthy(proc, lambda: self.is_healthy(record), START_TIMEOUT_S,
                              f"redis (PING) on 127.0.0.1:{port}", log)
        record.proc_start = start_ticks(proc.pid)
        record.running = True
        return record

    def is_healthy(self, record: ServiceRecord) -> bool:
        return ping(record.port)

    def playbook_fragment(self, record: ServiceRecord) -> dict[str, Any]:
        return {"redis": {"url": redis_url(record.port)}}


def redis_url(port: int) -> str:
    """The URL clients use for the sandbox redis (database 0)."""
    return f"redis://{net.LOOPBACK}:{port}/0"


def ping(port: int, timeout: float = 2.0) -> bool:
    """PING over a raw socket; True on +PONG (no redis client library needed)."""
    try:
        with socket.create_connection((net.LOOPBACK, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


SERVICE = Redis()
