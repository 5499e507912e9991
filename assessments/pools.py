"""Connection pools beside the server's connection counts, shared by db-slowness and service-outage.

The application's side (tasks.pool_status: size, checked out, idle in the pool, overflow per container) and the
database's side (tasks.postgres.ConnectionTotals) in one finding, as the runbook's "Database Optimization" reads
them together: a pool with every connection checked out while the server has room points at the application, a
server near max_connections at the pools' sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

from runbook.engine.findings import Block, Finding, Severity, TableBlock
from tasks.pool_status import PoolStatus
from tasks.postgres import ConnectionTotals


def saturated(p: PoolStatus) -> bool:
    """Every connection of the pool checked out (requests now wait or overflow)."""
    return bool(p.ok and p.pool_size and p.checked_out is not None and p.checked_out >= p.pool_size
                and not p.checked_in)


def pool_finding(pools: Sequence[PoolStatus], totals: Sequence[ConnectionTotals],
                 server_errors: Sequence[str] = ()) -> Finding | None:
    """One finding: each container's pool (warning when saturated or unreadable) and each database's counts."""
    if not pools:
        return None
    bad = [p for p in pools if not p.ok]
    full = [p for p in pools if saturated(p)]
    parts = [f"{p.container} {p.checked_out} of {p.pool_size} checked out" if p.ok else f"{p.container} unreadable"
             for p in pools]
    server = [f"{t.numbackends} connections to {t.database} "
              f"({t.total_clients} of {t.max_connections - t.reserved} usable server-wide)" for t in totals]
    blocks: list[Block] = [TableBlock(
        title="application connection pools (pool_status_command)",
        columns=["service", "container", "pool size", "checked out", "in pool", "overflow", "status"],
        rows=[[p.service, p.container, _n(p.pool_size), _n(p.checked_out), _n(p.checked_in), _n(p.overflow),
               p.error or ("saturated" if saturated(p) else "ok")] for p in pools])]
    if totals or server_errors:
        blocks.append(TableBlock(
            title="server-side connections", columns=["database", "connections", "server clients", "usable"],
            rows=[[t.database, _n(t.numbackends), t.total_clients, t.max_connections - t.reserved] for t in totals]
            + [[e, "-", "-", "-"] for e in server_errors]))
    return Finding(
        title="connection pools: " + "; ".join(parts) + (f" | server: {'; '.join(server)}" if server else ""),
        severity=Severity.WARNING if bad or full else Severity.INFO,
        subject="connection pools",
        details={"saturated": ", ".join(p.container for p in full) or "none",
                 "unreadable": ", ".join(f"{p.container}: {p.error}" for p in bad) or "none"},
        blocks=blocks, aggregation_key="connection-pools",
    )


def _n(value: int | None) -> str | int:
    return "-" if value is None else value
