"""Host diagnostics over SSH: load, memory, disk and the top processes, on many hosts at once with a bound.

One fixed command per host (``HOST_SNAPSHOT``, a string from this module: nothing from an alert, a label or the CLI
is ever sent to a shell) returns every section in one round trip; parsing happens here. Each host gets its own
connection (``runbook.engine.clients.ssh``: known_hosts + RejectPolicy, key auth, timeouts); a host that cannot be
reached is reported as such and never hides the others.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import paramiko

from runbook.engine.clients import ssh
from runbook.engine.config import Environment
from runbook.engine.errors import TargetUnreachable
from runbook.engine.steps import step

MAX_OUTPUT_BYTES = 256_000
HOST_SNAPSHOT = (
    "echo '@@load'; cat /proc/loadavg; echo '@@cpus'; nproc; echo '@@mem'; cat /proc/meminfo; "
    "echo '@@disk'; df -P -k -x tmpfs -x devtmpfs -x overlay -x squashfs; "
    "echo '@@top'; ps -eo pid=,user=,pcpu=,pmem=,rss=,comm= --sort=-pcpu | head -n 10"
)


def run_command(client: paramiko.SSHClient, command: str, timeout_s: float) -> tuple[int, str]:
    """Run a fixed command; (exit status, stdout). A read that waits longer than timeout_s raises socket.timeout,
    which the ssh() context turns into TargetUnreachable."""
    _stdin, stdout, _stderr = client.exec_command(command, timeout=timeout_s)
    out = stdout.read(MAX_OUTPUT_BYTES)
    return stdout.channel.recv_exit_status(), out.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Disk:
    """One filesystem as `df -P -k` shows it, in bytes; ``percent`` is df's Use%."""

    mount: str
    size: int
    used: int
    avail: int
    percent: float


@dataclass(frozen=True)
class Process:
    """One of the top processes by CPU (`ps`: %CPU averaged over the process's life), rss in bytes."""

    pid: int
    user: str
    cpu_percent: float
    mem_percent: float
    rss: int
    command: str


@dataclass(frozen=True)
class HostStats:
    """Load averages, cores, memory (bytes; mem_percent is the runbook's Memory Usage), disks, top processes."""

    load1: float
    load5: float
    load15: float
    cpus: int
    mem_total: int
    mem_available: int
    mem_percent: float
    disks: list[Disk]
    top: list[Process]


@dataclass(frozen=True)
class HostSnapshot:
    """One host's stats, or (``stats`` None) why it could not be read and what was unreachable."""

    host: str
    stats: HostStats | None = None
    error: str = ""
    target: str = ""


@dataclass(frozen=True)
class CommandResult:
    """A fixed command's exit status and output on one host, or (``status`` None) why it did not run."""

    host: str
    status: int | None = None
    output: str = ""
    error: str = ""


def parse_snapshot(text: str) -> HostStats:
    """Parse HOST_SNAPSHOT output into load, cpus, memory, disks and top processes."""
    sections: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("@@"):
            current = line[2:].strip()
            sections[current] = []
        elif current:
            sections[current].append(line)
    load = (sections.get("load") or ["0 0 0"])[0].split()
    cpus = int((sections.get("cpus") or ["1"])[0].strip() or 1)
    mem: dict[str, int] = {}
    for line in sections.get("mem", []):
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            mem[key] = int(parts[0]) * 1024
    total, available = mem.get("MemTotal", 0), mem.get("MemAvailable", mem.get("MemFree", 0))
    disks = []
    for line in sections.get("disk", [])[1:]:
        parts = line.split()
        if len(parts) >= 6 and parts[1].isdigit():
            size, used, avail = int(parts[1]) * 1024, int(parts[2]) * 1024, int(parts[3]) * 1024
            disks.append(Disk(mount=parts[5], size=size, used=used, avail=avail,
                              # df's Use%: used of what non-root users can have (reserved blocks excluded)
                              percent=round(used * 100 / (used + avail), 1) if used + avail else 0.0))
    top = []
    for line in sections.get("top", []):
        parts = line.split(None, 5)
        if len(parts) == 6:
            top.append(Process(pid=int(parts[0]), user=parts[1], cpu_percent=float(parts[2]),
                               mem_percent=float(parts[3]), rss=int(parts[4]) * 1024, command=parts[5]))
    return HostStats(
        load1=float(load[0]), load5=float(load[1]), load15=float(load[2]), cpus=cpus,
        mem_total=total, mem_available=available,
        mem_percent=round((1 - available / total) * 100, 1) if total else 0.0,  # the runbook's Memory Usage
        disks=disks, top=top,
    )


def snapshot_host(env: Environment, host: str) -> HostSnapshot:
    """One host's snapshot, or why it cannot be had (bad key, refused, timeout ...)."""
    timeout_s = env.ssh_hosts[host].timeout_s
    try:
        with ssh(env, host) as client:
            status, out = run_command(client, HOST_SNAPSHOT, timeout_s)
    except TargetUnreachable as exc:
        return HostSnapshot(host, error=exc.reason, target=exc.target)
    if status != 0 and "@@top" not in out:
        return HostSnapshot(host, error=f"snapshot command exited {status}", target=f"host {host}")
    return HostSnapshot(host, parse_snapshot(out))


@step
def collect_host_snapshots(env: Environment, hosts: list[str] | None = None,
                           max_parallel: int = 8) -> list[HostSnapshot]:
    """Snapshot every configured host (or the given ones) concurrently, at most ``max_parallel`` at a time."""
    names = list(hosts if hosts is not None else env.ssh_hosts)
    if not names:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(names))), thread_name_prefix="ssh") as pool:
        return list(pool.map(lambda h: snapshot_host(env, h), names))


def run_on_hosts(env: Environment, hosts: list[str], command: str, max_parallel: int = 8) -> list[CommandResult]:
    """Run one fixed command (a constant from code) on many hosts with a bound, one result per host in order."""

    def one(host: str) -> CommandResult:
        try:
            with ssh(env, host) as client:
                status, out = run_command(client, command, env.ssh_hosts[host].timeout_s)
        except TargetUnreachable as exc:
            return CommandResult(host, error=exc.reason)
        return CommandResult(host, status, out)

    with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(hosts))), thread_name_prefix="ssh") as pool:
        return list(pool.map(one, hosts))
