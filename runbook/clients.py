"""Clients built from playbook config, each with its own timeouts, and the one place third-party errors are mapped.

A target that cannot be reached raises ``TargetUnreachable`` with a short, secret-free reason; flows turn it into
a finding ("db unreachable: connection refused after 3 s") instead of crashing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.rows import dict_row

from runbook.config import Environment
from runbook.errors import TargetUnreachable
from runbook.redact import redact

APPLICATION_NAME = "runbook"


@contextmanager
def postgres(env: Environment, database: str = "main", *, autocommit: bool = True,
             statement_timeout_ms: int | None = None) -> Iterator[psycopg.Connection]:
    """A psycopg connection with connect and statement timeouts; rows come back as dicts.

    ``application_name=runbook`` lets remediations recognise (and never touch) the engine's own sessions.
    """
    cfg = env.database(database)
    dsn = env.resolve_secret(cfg.dsn, f"databases.{database}.dsn")
    target = f"{env.name}/{database}"
    timeout_ms = statement_timeout_ms or cfg.statement_timeout_ms
    started = time.monotonic()
    try:
        conn = psycopg.connect(
            dsn,
            autocommit=autocommit,
            row_factory=dict_row,
            connect_timeout=max(1, math.ceil(cfg.connect_timeout_s)),
            application_name=APPLICATION_NAME,
            options=f"-c statement_timeout={int(timeout_ms)} -c lock_timeout={int(timeout_ms)}",
            keepalives=1,
            keepalives_idle=5,
            tcp_user_timeout=int(cfg.connect_timeout_s * 1000),
        )
    except psycopg.OperationalError as exc:
        elapsed = time.monotonic() - started
        raise TargetUnreachable(f"database {target}", f"{_first_line(exc)} after {elapsed:.1f} s") from None
    try:
        yield conn
    except psycopg.OperationalError as exc:
        if not conn.broken:  # a statement timeout or lock timeout: the caller's business
            raise
        # the server went away mid-conversation: still "unreachable", never a crash
        raise TargetUnreachable(f"database {target}", _first_line(exc)) from None
    finally:
        conn.close()


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return redact(lines[0] if lines else type(exc).__name__)[:300]
