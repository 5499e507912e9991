"""Assessment of host snapshots (tasks.hosts.snapshot_host) shared by high-cpu and service-outage."""

from __future__ import annotations

from collections.abc import Sequence

from runbook.engine.config import Thresholds
from runbook.engine.findings import Finding, Severity, TableBlock
from tasks.hosts import HostSnapshot


def host_findings(hosts: Sequence[HostSnapshot], thresholds: Thresholds, top: int = 5) -> list[Finding]:
    """Findings from host snapshots: unreachable hosts (critical), load per core, memory, disks, top processes."""
    out: list[Finding] = []
    for snap in hosts:
        name, h = snap.host, snap.stats
        if h is None:
            out.append(Finding(title=f"host {name} unreachable: {snap.error}", severity=Severity.CRITICAL,
                               subject=f"host {name}", details={"reason": snap.error},
                               aggregation_key=f"unreachable:host {name}"))
            continue
        per_core = h.load1 / max(h.cpus, 1)
        full_disks = [d for d in h.disks if d.percent >= thresholds.disk_percent]
        severity = Severity.INFO
        if per_core >= 2 or h.mem_percent >= thresholds.memory_percent or full_disks:
            severity = Severity.WARNING
        if per_core >= 4 or h.mem_percent >= 95 or any(d.percent >= 98 for d in full_disks):
            severity = Severity.CRITICAL
        out.append(Finding(
            title=(f"{name}: load {h.load1:.2f} on {h.cpus} cores ({per_core:.2f}/core), memory "
                   f"{h.mem_percent:.0f} %" + (f", {len(full_disks)} disk(s) over {thresholds.disk_percent:g} %"
                                               if full_disks else "")),
            severity=severity, subject=f"host {name}",
            details={"load 1/5/15 min": f"{h.load1} / {h.load5} / {h.load15}",
                     "memory available": f"{h.mem_available / 2**30:.1f} of {h.mem_total / 2**30:.1f} GiB"},
            blocks=[
                TableBlock(title="top processes (ps %CPU: average over each process's life)",
                           columns=["pid", "user", "cpu %", "mem %", "rss MiB", "command"],
                           rows=[[p.pid, p.user, p.cpu_percent, p.mem_percent, round(p.rss / 2**20, 1),
                                  p.command] for p in h.top[:top]]),
                TableBlock(title="disks", columns=["mount", "used %", "free GiB"],
                           rows=[[d.mount, d.percent, round(d.avail / 2**30, 1)] for d in h.disks]),
            ],
            aggregation_key=f"host:{name}",
        ))
    return out
