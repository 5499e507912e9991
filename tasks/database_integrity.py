"""Physical integrity of the live database: pg_amcheck (heap and every index), where the database allows it."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from runbook.engine.clients import postgres, postgres_program
from runbook.engine.config import Environment
from runbook.engine.redact import redact

PG_AMCHECK = Path("/usr/lib/postgresql/15/bin/pg_amcheck")


@dataclass(frozen=True)
class AmcheckResult:
    """``ran``: the check actually ran (else ``detail`` says why not); ``ok``: it found no corruption."""

    ran: bool
    ok: bool
    detail: str


def run_amcheck(env: Environment, database: str, timeout_s: float = 300.0) -> AmcheckResult:
    """pg_amcheck of the live database with the engine's role.

    Needs the amcheck extension in the database and EXECUTE on its functions (both a superuser's to grant); without
    them the result says so instead of pretending the database was checked.
    """
    if not PG_AMCHECK.exists():
        return AmcheckResult(ran=False, ok=True, detail=f"{PG_AMCHECK} not installed")
    with postgres(env, database) as conn:
        if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'").fetchone():
            return AmcheckResult(ran=False, ok=True,
                                 detail="amcheck extension not installed in the database (a superuser runs CREATE "
                                        "EXTENSION amcheck and grants EXECUTE on its functions to the engine's role)")
    conninfo, penv = postgres_program(env, database)
    try:
        proc = subprocess.run([str(PG_AMCHECK), "--no-password", "--heapallindexed", conninfo],
                              capture_output=True, text=True, env=penv, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return AmcheckResult(ran=True, ok=False, detail=f"pg_amcheck did not finish within {timeout_s:g} s")
    output = redact((proc.stdout + proc.stderr).strip())
    if "permission denied" in output:
        return AmcheckResult(ran=False, ok=True, detail=f"pg_amcheck not permitted for the engine's role: "
                                                        f"{output.splitlines()[0][:200]}")
    return AmcheckResult(ran=True, ok=proc.returncode == 0,
                         detail="no corruption found" if proc.returncode == 0 else output[:2000])
