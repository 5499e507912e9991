"""Roles, schema and deterministic data of a Pafar-like database, generated server-side.

Sized so `SELECT * FROM bookings WHERE user_id = ...` seq-scans visibly: bookings.user_id has no index
on purpose (the missing-index runbook has something real to find).
"""

from __future__ import annotations

import psycopg
from psycopg import sql

DATABASE = "pafar"
APP_ROLE = "pafar_app"
ENGINE_ROLE = "runbook"
ENGINE_ROLE_GRANTS = ("pg_monitor", "pg_signal_backend", "pg_read_all_data")

USERS = 20_000
BOOKINGS = 600_000
PAYMENTS = 300_000

SCHEMA = """
CREATE TABLE users (
    id uuid PRIMARY KEY,
    email text UNIQUE,
    full_name text,
    created_at timestamptz
);
CREATE TABLE bookings (
    id bigserial PRIMARY KEY,
    user_id uuid,
    status text,
    amount numeric(10,2),
    created_at timestamptz
);
CREATE TABLE payments (
    id bigserial PRIMARY KEY,
    booking_id bigint,
    status text,
    amount numeric(10,2),
    provider text,
    created_at timestamptz
);
"""

# Deterministic: ids are md5-derived uuids, everything else is arithmetic on the series index.
DATA = [
    f"""
    INSERT INTO users (id, email, full_name, created_at)
    SELECT md5('user' || i)::uuid, 'user' || i || '@example.com', 'User ' || i,
           timestamptz '2024-01-01 00:00:00+00' + i * interval '17 minutes'
    FROM generate_series(1::bigint, {USERS}) AS i
    """,
    f"""
    INSERT INTO bookings (id, user_id, status, amount, created_at)
    SELECT i, md5('user' || (1 + (i * 7919) % {USERS}))::uuid,
           (ARRAY['completed', 'completed', 'confirmed', 'pending', 'cancelled'])[1 + (i / 3) % 5],
           ((i * 7907) % 50000 + 500) / 100.0,
           timestamptz '2024-01-01 00:00:00+00' + i * interval '47 seconds'
    FROM generate_series(1::bigint, {BOOKINGS}) AS i
    """,
    f"""
    INSERT INTO payments (id, booking_id, status, amount, provider, created_at)
    SELECT i, 2 * i,
           (ARRAY['succeeded', 'succeeded', 'succeeded', 'failed', 'refunded'])[1 + (i / 3) % 5],
           ((2 * i * 7907) % 50000 + 500) / 100.0,
           (ARRAY['stripe', 'paypal', 'mpesa'])[1 + i % 3],
           timestamptz '2024-01-01 00:05:00+00' + 2 * i * interval '47 seconds'
    FROM generate_series(1::bigint, {PAYMENTS}) AS i
    """,
    f"SELECT setval(pg_get_serial_sequence('bookings', 'id'), {BOOKINGS})",
    f"SELECT setval(pg_get_serial_sequence('payments', 'id'), {PAYMENTS})",
]


def create_roles(admin: psycopg.Connection, app_password: str, engine_password: str) -> None:
    """Create the application and engine roles and the database (connection: superuser, autocommit)."""
    admin.execute("SET statement_timeout = '60s'")
    admin.execute("SET pg_stat_statements.track_utility = off")  # keep passwords out of statement stats
    admin.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(APP_ROLE), sql.Literal(app_password))
    )
    admin.execute(
        sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
            sql.Identifier(ENGINE_ROLE), sql.Literal(engine_password)
        )
    )
    admin.execute(
        sql.SQL("GRANT {} TO {}").format(
            sql.SQL(", ").join(map(sql.Identifier, ENGINE_ROLE_GRANTS)), sql.Identifier(ENGINE_ROLE)
        )
    )
    admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DATABASE), sql.Identifier(APP_ROLE)))


def set_passwords(admin: psycopg.Connection, app_password: str, engine_password: str) -> None:
    """Reset both role passwords (used when a reused server's secrets.env was lost)."""
    admin.execute("SET pg_stat_statements.track_utility = off")
    for role, pw in ((APP_ROLE, app_password), (ENGINE_ROLE, engine_password)):
        admin.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(pw)))


def seed(db: psycopg.Connection) -> None:
    """Extension, schema owned by the app role, data, ANALYZE, then clean statement stats.

    `db` is a superuser connection to the pafar database in autocommit mode.
    """
    db.execute("SET statement_timeout = '60s'")
    db.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    with db.transaction():
        db.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(APP_ROLE)))
        db.execute(SCHEMA)
        db.execute("RESET ROLE")
        for stmt in DATA:
            db.execute(stmt)
    db.execute("ANALYZE users, bookings, payments")
    db.execute("SELECT pg_stat_statements_reset()")
