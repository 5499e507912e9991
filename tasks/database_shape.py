"""A database's shape (user tables, their columns, exact key-table row counts) and how two shapes differ.

The backup's manifest records the shape in the dump's own snapshot; a restore must reproduce it, and a live
database that lost tables, columns or key rows against it is what data-corruption restores.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from runbook.engine.clients import postgres, postgres_admin
from runbook.engine.config import Environment
from tasks.backup_files import KeyRows, Shape, Tables


def read_shape(conn: psycopg.Connection[Any], key_tables: list[str]) -> Shape:
    """User tables with their columns (name, type), and exact row counts of the key tables (None: missing)."""
    rows = conn.execute(
        """SELECT n.nspname || '.' || c.relname AS tbl, a.attname, format_type(a.atttypid, a.atttypmod) AS type
             FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
            WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg\\_%'
              AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
            ORDER BY 1, a.attnum"""
    ).fetchall()
    tables: Tables = {}
    for r in rows:
        tables.setdefault(r["tbl"], []).append((r["attname"], r["type"]))
    key_rows: KeyRows = {}
    for name in key_tables:
        if f"public.{name}" in tables:
            row = conn.execute(
                sql.SQL("SELECT count(*) AS n FROM {}.{}").format(sql.Identifier("public"), sql.Identifier(name))
            ).fetchone()
            key_rows[name] = row["n"] if row else None
        else:
            key_rows[name] = None
    return Shape(tables=tables, key_rows=key_rows)


def compare_shapes(expected: Shape, actual: Shape, row_tolerance_pct: float = 0.0) -> list[str]:
    """Differences that matter, in words: missing tables or columns, changed types, key row counts off."""
    problems: list[str] = []
    exp_t, act_t = expected.tables, actual.tables
    for t in sorted(set(exp_t) - set(act_t)):
        problems.append(f"table {t} missing")
    for t in sorted(set(exp_t) & set(act_t)):
        exp_c, act_c = dict(exp_t[t]), dict(act_t[t])
        for col in exp_c:
            if col not in act_c:
                problems.append(f"column {t}.{col} missing")
            elif exp_c[col] != act_c[col]:
                problems.append(f"column {t}.{col} changed type {exp_c[col]} -> {act_c[col]}")
    for name, want in expected.key_rows.items():
        got = actual.key_rows.get(name)
        if want is None or got is None:
            continue
        allowed = want * row_tolerance_pct / 100
        if abs(got - want) > allowed:
            problems.append(f"{name}: {got} rows, expected {want}" + (f" (±{row_tolerance_pct:g}%)"
                                                                       if row_tolerance_pct else ""))
    return problems


def shape_of(env: Environment, database: str, dbname: str) -> Shape:
    """Shape of any database on the server (e.g. a scratch restore), read with the admin role."""
    with postgres_admin(env, database, dbname=dbname, statement_timeout_ms=600_000) as conn:
        return read_shape(conn, env.database(database).key_tables)


def live_shape(env: Environment, database: str) -> Shape:
    """Shape of the configured database, read with the engine's role (pg_read_all_data)."""
    with postgres(env, database, statement_timeout_ms=600_000) as conn:
        return read_shape(conn, env.database(database).key_tables)
