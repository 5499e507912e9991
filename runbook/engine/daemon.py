"""A local daemon we start ourselves: spawned in its own session with its output in a log, probed over HTTP, waited
for until healthy (or until it exits), stopped by process group.

One implementation for the Prefect server `runbook serve` starts and every service of the sandbox (which adds
PID-file safety and log tails on top), so a start-up wait can never hang on a process that already died.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

from runbook.engine.errors import RunbookError
from runbook.engine.polling import wait_until


class DaemonFailed(RunbookError):
    """A daemon exited or did not become healthy in time; the message says which."""


def start_ticks(pid: int) -> int | None:
    """Process start time (clock ticks since boot): with the PID it identifies a process, so a PID the kernel has
    reused for another process is never mistaken for ours. None when gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def free_ports(count: int) -> list[int]:
    """Ask the kernel for ``count`` distinct free loopback ports (all sockets held open until all are chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when GET url answers 200; the one HTTP health probe (no proxy from the environment: loopback only)."""
    return http_status(url, timeout) == 200


def http_status(url: str, timeout: float = 2.0, headers: Mapping[str, str] | None = None) -> int | None:
    """The status GET url answers with, or None when it cannot be reached (no proxy from the environment)."""
    try:
        return httpx.get(url, timeout=timeout, trust_env=False, headers=headers).status_code
    except httpx.HTTPError:
        return None


def spawn(cmd: Sequence[str], log_file: Path, env: Mapping[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a long-running process in its own session (Ctrl-C of the caller must not reach it), output appended
    to ``log_file``."""
    with open(log_file, "ab") as log:
        return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True)


def await_healthy(proc: subprocess.Popen[bytes], healthy: Callable[[], bool], timeout_s: float, what: str,
                  interval_s: float = 0.05) -> None:
    """Return once ``healthy()``; if the process exits first or ``timeout_s`` passes, kill it (when still running)
    and raise DaemonFailed saying which."""
    ok = wait_until(lambda: proc.poll() is not None or healthy(), timeout_s, interval_s)
    if ok and healthy():
        return
    exited = proc.poll()
    if exited is None:
        _signal_group(proc, signal.SIGKILL)
        proc.wait(5)
    reason = f"exited with {exited}" if exited is not None else f"not healthy within {timeout_s:.0f} s"
    raise DaemonFailed(f"{what} {reason}")


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """SIGTERM the process group, SIGKILL it after ``timeout_s``; returns once the process is reaped."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait(5)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the whole group the process leads (spawn() starts a session), so its helpers go too; never a reaped
    process's PID (it may name another process by now)."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
