"""Process helpers: spawn, identify and stop the processes the sandbox started, by PID.

A PID from state.json is only signalled when /proc still shows the command line (and start time) we
recorded, so a PID the kernel has since handed to an unrelated process is never touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from runbook.engine import daemon
from runbook.engine.daemon import start_ticks
from runbook.engine.polling import wait_until

from .errors import SandboxError

# Popen objects of children spawned by this process, so they are reaped (no zombies, no ResourceWarning).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
_CHILDREN_LOCK = threading.Lock()


def spawn(
    cmd: Sequence[str], log_file: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a long-running service in its own session (Ctrl-C of the caller must not kill it)."""
    return adopt(daemon.spawn(cmd, log_file, env=env, cwd=cwd))


def adopt(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """Remember a child this process spawned so it is reaped (no zombies, no ResourceWarning)."""
    with _CHILDREN_LOCK:
        _CHILDREN[proc.pid] = proc
    return proc


def run(
    cmd: Sequence[str], *, timeout: float, what: str, log_file: Path | None = None, as_user: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion; a failure raises SandboxError with its output (and log tail)."""
    full = [*as_user_prefix(as_user), *cmd]
    try:
        res = subprocess.run(full, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise SandboxError(f"{what} timed out after {timeout:.0f}s{_log_suffix(log_file)}") from exc
    if res.returncode != 0:
        out = (res.stdout + res.stderr).strip()
        raise SandboxError(f"{what} failed (exit {res.returncode}): {out}{_log_suffix(log_file)}")
    return res


def as_user_prefix(user: str | None) -> list[str]:
    """`runuser -u USER --` when root must act as another OS user (initdb refuses to run as root)."""
    if user is None or os.geteuid() != 0:
        return []
    return ["runuser", "-u", user, "--"]


def read_cmdline(pid: int) -> str | None:
    """The process's argv joined by spaces (None when gone or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    return " ".join(args) or None


def pid_matches(pid: int, markers: Sequence[str], ticks: int | None) -> bool:
    """True when PID is alive and is still the process we started (cmdline markers and start time)."""
    if pid <= 0:
        return False
    _reap(pid)
    cmdline = read_cmdline(pid)
    if cmdline is None or not all(m in cmdline for m in markers):
        return False
    now_ticks = start_ticks(pid)
    if now_ticks is None:
        return False
    return ticks is None or now_ticks == ticks


def _reap(pid: int) -> None:
    """Collect the exit status of a child we spawned so its PID stops looking alive."""
    with _CHILDREN_LOCK:
        proc = _CHILDREN.get(pid)
        if proc is not None and proc.poll() is not None:
            del _CHILDREN[pid]


def is_gone(pid: int) -> bool:
    """True when PID no longer names a live (non-zombie) process."""
    _reap(pid)
    return start_ticks(pid) is None


def terminate(pid: int, markers: Sequence[str], ticks: int | None, timeout: float = 10.0) -> bool:
    """SIGTERM, wait up to timeout, then SIGKILL; only if PID is still ours. Returns True if it was ours.

    When the process leads its own process group (we start services with a new session), the whole
    group is signalled so helper children go too.
    """
    if not pid_matches(pid, markers, ticks):
        return False
    _signal(pid, signal.SIGTERM)
    if not wait_until(lambda: is_gone(pid), timeout):
        if pid_matches(pid, markers, ticks):
            _signal(pid, signal.SIGKILL)
        if not wait_until(lambda: is_gone(pid), 5.0):
            raise SandboxError(f"process {pid} did not exit after SIGKILL")
    return True


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def log_tail(path: Path, lines: int = 40) -> str:
    """Last lines of a service log, for error messages."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _log_suffix(log_file: Path | None) -> str:
    if log_file is None:
        return ""
    return f"\n--- tail of {log_file} ---\n{log_tail(log_file)}"


def failure(what: str, log_file: Path) -> SandboxError:
    """A SandboxError carrying the tail of the service's log file."""
    return SandboxError(f"{what}{_log_suffix(log_file)}")


def await_healthy(proc: subprocess.Popen[bytes], healthy: Callable[[], bool], timeout: float, what: str,
                  log_file: Path, interval: float = 0.05) -> None:
    """Wait until ``healthy()`` or the child exits; on failure kill it if still running and raise with the log.

    The one start-up wait of every spawned sandbox service: fail fast when the process dies, never wait forever.
    """
    try:
        daemon.await_healthy(proc, healthy, timeout, what, interval)
    except daemon.DaemonFailed as exc:
        raise failure(str(exc), log_file) from None
