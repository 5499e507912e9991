"""The application's connection-pool status, the runbook's "Database Optimization > Connection pooling":

    docker-compose exec backend python -c "from app.core.database import engine; print(engine.pool.status())"

A service declares the command in the playbook (``services.<name>.pool_status_command``, an argument list validated
by the playbook schema); it runs in each of the service's running containers through the Docker exec API, never
through a shell, with the service's ``pool_status_timeout_s`` as the API call's timeout (a command that hangs is a
row saying so, not a stuck run). The output is read as a JSON object (pool_size, checked_out, checked_in, overflow)
or as SQLAlchemy's ``pool.status()`` line ("Pool size: 5  Connections in pool: 4 Current Overflow: -4 Current
Checked out connections: 1").
"""

from __future__ import annotations

import json
import re
import select
import time
from dataclasses import dataclass
from typing import Any

import docker.errors

from runbook.engine.clients import docker_client
from runbook.engine.config import Environment
from runbook.engine.errors import TargetUnreachable
from runbook.engine.steps import step
from tasks.containers import project_filters, summarize

FIELDS = ("pool_size", "checked_out", "checked_in", "overflow")
_SQLALCHEMY = {"pool_size": r"Pool size:\s*(-?\d+)", "checked_in": r"Connections in pool:\s*(-?\d+)",
               "overflow": r"Current Overflow:\s*(-?\d+)", "checked_out": r"Checked out connections:\s*(-?\d+)"}
MAX_OUTPUT = 4000


@dataclass(frozen=True)
class PoolStatus:
    """One container's pool as its application reports it (None where the output did not say)."""

    service: str
    container: str
    ok: bool
    pool_size: int | None = None
    checked_out: int | None = None
    checked_in: int | None = None
    overflow: int | None = None
    output: str = ""
    error: str = ""


def parse_pool_status(text: str) -> dict[str, int]:
    """The pool's figures from a JSON object or SQLAlchemy's status line; {} when neither."""
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        return {k: int(doc[k]) for k in FIELDS if isinstance(doc.get(k), int) and not isinstance(doc.get(k), bool)}
    found = {k: re.search(p, text) for k, p in _SQLALCHEMY.items()}
    return {k: int(m.group(1)) for k, m in found.items() if m}


@step
def get_pool_status(env: Environment, service: str) -> list[PoolStatus]:
    """Run the service's pool_status_command in each of its running containers; one row per container."""
    cfg = env.services[service]
    if not cfg.pool_status_command:
        return []
    with docker_client(env) as client:
        running = [summarize(c.attrs) for c in client.containers.list(filters=project_filters(env, service))]
    return [_exec_pool_status(env, service, c.id, c.name, cfg.pool_status_command, cfg.pool_status_timeout_s)
            for c in sorted(running, key=lambda c: c.name)]


def _exec_pool_status(env: Environment, service: str, container_id: str, name: str, command: list[str],
                      timeout_s: float) -> PoolStatus:
    try:
        with docker_client(env, timeout_s=timeout_s) as client:
            exit_code, raw = exec_with_deadline(client, container_id, command, timeout_s)
    except TargetUnreachable as exc:
        return PoolStatus(service, name, False, error=f"no status: {exc.reason}")
    except docker.errors.APIError as exc:  # the container stopped or went away meanwhile
        return PoolStatus(service, name, False, error=f"no status: {exc.explanation or exc}"[:300])
    output = raw.decode("utf-8", errors="replace").strip()[-MAX_OUTPUT:]
    if exit_code is None:
        return PoolStatus(service, name, False, output=output, error=f"no status: no answer within {timeout_s:g} s")
    if exit_code != 0:
        return PoolStatus(service, name, False, output=output, error=f"pool_status_command exited {exit_code}")
    figures = parse_pool_status(output)
    if not figures:
        return PoolStatus(service, name, False, output=output, error="output is neither JSON nor pool.status()")
    return PoolStatus(service, name, True, figures.get("pool_size"), figures.get("checked_out"),
                      figures.get("checked_in"), figures.get("overflow"), output)


def exec_with_deadline(client: Any, container_id: str, command: list[str], timeout_s: float,
                       max_bytes: int = 64_000) -> tuple[int | None, bytes]:
    """Run ``command`` (an argument list) in the container and read its output until it ends or ``timeout_s``
    passes: (exit code, or None when it did not finish in time; stdout and stderr).

    docker-py's own exec_start reads the hijacked connection with poll() and no timeout, whatever the client's
    timeout says, so a command that hangs would hang the run: the socket is read here against a deadline. The
    Docker API cannot stop an exec; a command left running past the deadline ends on its own in the container.
    """
    deadline = time.monotonic() + timeout_s
    exec_id = client.api.exec_create(container_id, command, stdout=True, stderr=True)["Id"]
    conn = client.api.exec_start(exec_id, socket=True)
    sock = getattr(conn, "_sock", conn)
    data = bytearray()
    try:
        while len(data) < max_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
                return None, demux(bytes(data))
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        conn.close()
    for _ in range(20):  # the exit code is set a moment after the stream closes
        info = client.api.exec_inspect(exec_id)
        if not info.get("Running"):
            return info.get("ExitCode"), demux(bytes(data))
        time.sleep(0.05)
    return None, demux(bytes(data))


def demux(data: bytes) -> bytes:
    """stdout and stderr from the API's multiplexed stream (8-byte frame headers when there is no TTY)."""
    if not data or data[0] not in (0, 1, 2) or data[1:4] != b"\0\0\0":
        return data  # not multiplexed (a TTY, or an engine that sends it plain)
    out, i = bytearray(), 0
    while i + 8 <= len(data):
        size = int.from_bytes(data[i + 4:i + 8], "big")
        out += data[i + 8:i + 8 + size]
        i += 8 + size
    return bytes(out)
