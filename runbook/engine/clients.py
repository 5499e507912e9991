"""Clients built from playbook config, each with its own timeouts, and the one place third-party errors are mapped.

PostgreSQL (psycopg), Docker/Podman (docker SDK), SSH (paramiko), Prometheus (httpx), Elasticsearch (the official
client) and Redis (redis-py).

A target that cannot be reached raises ``TargetUnreachable`` with a short, secret-free reason; flows turn it into
a finding ("db unreachable: connection refused after 3 s") instead of crashing. A statement PostgreSQL refuses
raises ``QueryFailed`` (its first line and SQLSTATE) once it leaves a session, so no flow needs to know psycopg.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import docker
import docker.constants
import docker.errors
import elastic_transport
import elasticsearch
import httpx
import paramiko
import psycopg
import redis
import requests
from elastic_transport._node import NodeApiResponse  # not re-exported by elastic_transport itself
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import DictRow, dict_row

from runbook.engine.config import Environment, iter_secret_refs
from runbook.engine.errors import ConfigError, QueryFailed, TargetUnreachable
from runbook.engine.redact import redact

APPLICATION_NAME = "runbook"


class _Sessions:
    """One run's idle PostgreSQL sessions, by connection parameters (see ``run_sessions``)."""

    def __init__(self) -> None:
        self._idle: dict[str, list[psycopg.Connection[DictRow]]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def take(self, key: str) -> psycopg.Connection[DictRow] | None:
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def give(self, key: str, conn: psycopg.Connection[DictRow]) -> bool:
        """Keep ``conn`` for the run's next step only if it is a clean autocommit session (no transaction open,
        nothing failed on it); the caller closes it otherwise."""
        if conn.closed or conn.broken or not conn.autocommit \
                or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            return False
        with self._lock:
            if self._closed:
                return False
            self._idle.setdefault(key, []).append(conn)
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


_RUN_SESSIONS: ContextVar[_Sessions | None] = ContextVar("runbook_run_sessions", default=None)


@contextmanager
def run_sessions() -> Iterator[None]:
    """Within this block (one procedure run) a step hands its PostgreSQL session to the next step instead of closing
    it: db-slowness opened six sessions one after another (10 ms or more each, on a server that may be short of
    connections: DatabaseConnectionHigh is one of the alerts it answers), now at most as many as run at once (two).
    Only clean autocommit sessions with the same parameters are passed on, only while the run diagnoses and plans
    (``release_sessions``); all are closed when the block ends.
    Steps run in Prefect's worker threads with a copy of this context, so they share the one set."""
    sessions = _Sessions()
    token = _RUN_SESSIONS.set(sessions)
    try:
        yield
    finally:
        _RUN_SESSIONS.reset(token)
        sessions.close()


def release_sessions() -> None:
    """Close the run's idle sessions and pass none on from now: before it waits for a person (an approval may take
    minutes, and the database may be short of connections) and before it applies anything (a remediation may need
    the database to itself: a restore renames it, which PostgreSQL refuses while any session is connected)."""
    sessions = _RUN_SESSIONS.get()
    if sessions is not None:
        sessions.close()


@contextmanager
def postgres(env: Environment, database: str = "main", *, autocommit: bool = True,
             statement_timeout_ms: int | None = None) -> Iterator[psycopg.Connection[DictRow]]:
    """A psycopg connection with connect and statement timeouts; rows come back as dicts. Inside ``run_sessions``
    an earlier step's idle session with the same parameters is used again.

    ``application_name=runbook`` lets remediations recognise (and never touch) the engine's own sessions.
    """
    cfg = env.database(database)
    dsn = make_conninfo(**_dsn_parts(env, database))  # parsed here: a malformed DSN is a ConfigError, not a leak
    target = f"{env.name}/{database}"
    timeout_ms = statement_timeout_ms or cfg.statement_timeout_ms
    sessions = _RUN_SESSIONS.get() if autocommit else None
    key = f"{timeout_ms}|{cfg.connect_timeout_s}|{dsn}"  # in memory only: the DSN holds the password
    conn = sessions.take(key) if sessions is not None else None
    if conn is None:
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
    done = False
    try:
        with _mapped_errors(conn, f"database {target}"):
            yield conn
        done = True
    finally:
        if not (done and sessions is not None and sessions.give(key, conn)):
            conn.close()


@contextmanager
def _mapped_errors(conn: psycopg.Connection[Any], target: str) -> Iterator[None]:
    """psycopg errors leaving a session: the server gone is TargetUnreachable, a refused statement QueryFailed."""
    try:
        yield
    except psycopg.Error as exc:
        if isinstance(exc, psycopg.OperationalError) and conn.broken:
            # the server went away mid-conversation: still "unreachable", never a crash
            raise TargetUnreachable(target, _first_line(exc)) from None
        # a statement timeout, a lock timeout, a permission: the caller's business, in our words
        raise QueryFailed(target, _first_line(exc), exc.sqlstate) from None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return redact(lines[0] if lines else type(exc).__name__)[:300]


def _dsn_parts(env: Environment, database: str, admin: bool = False) -> dict[str, Any]:
    """The conninfo of the engine (or admin) DSN as a dict; the password stays in it and must never be printed."""
    cfg = env.database(database)
    if admin:
        if cfg.admin_dsn is None:
            raise ConfigError(
                f"{env.source}: environments.{env.name}.databases.{database}.admin_dsn: not configured (restores "
                "need a role with CREATEDB that is a member of the database owner's role)")
        where = f"databases.{database}.admin_dsn"
        value = env.resolve_secret(cfg.admin_dsn, where)
    else:
        where = f"databases.{database}.dsn"
        value = env.resolve_secret(cfg.dsn, where)
    return parse_dsn(env, where, value)


# libpq's parse errors quote the text they stumbled on (a password's tail, or the whole URL): only these fixed
# descriptions leave this module, chosen by the message's unquoted start
_DSN_PROBLEMS = (
    ("invalid percent-encoded token", "a '%' in the URL is not followed by two hex digits (write it as %25)"),
    ('missing "=" after', "a word without '=': a value with a space must be in single quotes"),
    ("unterminated quoted string", "a quoted value is not closed"),
    ("invalid connection option", "an unknown keyword (or a value with a space that is not quoted)"),
    ("invalid URI query parameter", "an unknown URL query parameter"),
    ("end of string reached when looking for matching", "an IPv6 address in the URL is missing its ']'"),
)


def parse_dsn(env: Environment, where: str, value: str) -> dict[str, Any]:
    """A PostgreSQL DSN (URL or keyword form) as libpq reads it. One it cannot parse is a ConfigError naming the
    playbook, the environment and the key, with a fixed description of the mistake: never the value or a part of
    it (libpq's own message quotes it)."""
    return conninfo_parts(value, f"{env.source}: environments.{env.name}.{where}")


def conninfo_parts(value: str, where: str) -> dict[str, Any]:
    """``value`` parsed by libpq; one it cannot parse is a ConfigError saying ``where`` it came from and a fixed
    description of the mistake, never the value or a part of it (libpq's own message quotes it)."""
    try:
        return conninfo_to_dict(value)
    except psycopg.Error as exc:
        message = str(exc)
        problem = next((text for start, text in _DSN_PROBLEMS if message.startswith(start)),
                       "libpq cannot parse it")
        raise ConfigError(f"{where}: not a valid PostgreSQL connection string: {problem} "
                          "(the value is not shown)") from None


def check_secrets(env: Environment, everything: bool = False) -> None:
    """Resolve every secret the environment refers to (``iter_secret_refs``) and parse each DSN among them, so a
    missing secret or a DSN libpq cannot read is a ConfigError before anything runs (`runbook check --env`,
    `runbook run`)."""
    for where, ref in iter_secret_refs(env, everything=everything):
        value = env.resolve_secret(ref, where)
        if where.startswith("databases."):
            parse_dsn(env, where, value)


def database_name(env: Environment, database: str) -> str:
    """The server-side name of the playbook's database (the DSN's dbname)."""
    name = _dsn_parts(env, database).get("dbname")
    if not name:
        raise ConfigError(f"{env.source}: environments.{env.name}.databases.{database}.dsn: names no database")
    return str(name)


@contextmanager
def postgres_admin(env: Environment, database: str = "main", *, dbname: str | None = None,
                   statement_timeout_ms: int = 60_000) -> Iterator[psycopg.Connection[DictRow]]:
    """A session with the database's ``admin_dsn`` (restores), to its maintenance database or ``dbname``.

    Autocommit, with connect, statement and lock timeouts; errors mapped as for ``postgres``.
    """
    cfg = env.database(database)
    parts = _dsn_parts(env, database, admin=True)
    if dbname:
        parts["dbname"] = dbname
    target = f"database {env.name}/{database} (admin)"
    started = time.monotonic()
    try:
        conn = psycopg.connect(
            make_conninfo(**parts), autocommit=True, row_factory=dict_row,
            connect_timeout=max(1, math.ceil(cfg.connect_timeout_s)), application_name=APPLICATION_NAME,
            options=f"-c statement_timeout={int(statement_timeout_ms)} -c lock_timeout=10000",
        )
    except psycopg.OperationalError as exc:
        raise TargetUnreachable(target, f"{_first_line(exc)} after {time.monotonic() - started:.1f} s") from None
    try:
        with _mapped_errors(conn, target):
            yield conn
    finally:
        conn.close()


def try_statement(conn: psycopg.Connection[Any], query: sql.Composed) -> str | None:
    """Run one statement whose refusal is an expected answer (e.g. a CREATE EXTENSION only a superuser may run):
    None when it ran, else the server's reason. A broken connection still raises (mapped by the session)."""
    try:
        conn.execute(query)
    except psycopg.Error as exc:
        if conn.broken:
            raise
        return _first_line(exc)
    return None


def postgres_program(env: Environment, database: str, *, admin: bool = False,
                     dbname: str | None = None) -> tuple[str, dict[str, str]]:
    """(conninfo without the password, environment with PGPASSWORD) to run pg_dump/psql/pg_amcheck on a database.

    The password goes to the child's environment, never on its command line (where ``ps`` would show it).
    """
    parts = _dsn_parts(env, database, admin=admin)
    if dbname:
        parts["dbname"] = dbname
    password = parts.pop("password", None)
    child = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    child.update({"PGCONNECT_TIMEOUT": str(max(2, math.ceil(env.database(database).connect_timeout_s))),
                  "PGAPPNAME": APPLICATION_NAME})
    if password:
        child["PGPASSWORD"] = str(password)
    return make_conninfo(**parts), child


@contextmanager
def docker_client(env: Environment, *, max_pool_size: int = 10,
                  timeout_s: float | None = None) -> Iterator[docker.DockerClient]:
    """A Docker API client (Docker Engine or Podman's compatible service) with the playbook's timeout on every call
    (``timeout_s`` instead: e.g. an exec whose answer is its command's output, bounded by the command's own limit).

    The API version is negotiated once on connect (Podman 4.3 answers 1.41). Connection failures and calls that get
    no answer in time raise TargetUnreachable; API errors (404 for a container that went away, 409 ...) are left to
    the caller, which knows whether they matter.
    """
    cfg = env.docker
    if cfg is None:
        raise ConfigError(f"{env.source}: environments.{env.name}.docker: not configured")
    target = f"docker API of {env.name}"
    timeout = timeout_s or cfg.timeout_s
    started = time.monotonic()
    try:
        client = docker.DockerClient(base_url=cfg.base_url, version=docker_api_version(cfg.base_url, cfg.timeout_s),
                                     timeout=timeout, max_pool_size=max_pool_size)
    except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
        raise TargetUnreachable(target, _docker_reason(exc, timeout, started)) from None
    try:
        yield client
    except (TimeoutError, requests.ConnectionError, requests.Timeout) as exc:
        raise TargetUnreachable(target, _docker_reason(exc, timeout, started)) from None
    finally:
        client.close()


_API_VERSIONS: dict[str, str] = {}


def docker_api_version(base_url: str, timeout_s: float) -> str:
    """The engine's API version from the ``Api-Version`` header of ``/_ping``, cached per URL for the process.

    docker-py's version="auto" asks ``/version``, which Podman answers in ~0.5 s (it probes conmon, runc ...);
    ``/_ping`` carries the same header on Docker Engine and Podman and answers in milliseconds.
    """
    cached = _API_VERSIONS.get(base_url)
    if cached:
        return cached
    probe = docker.APIClient(base_url=base_url, version=docker.constants.MINIMUM_DOCKER_API_VERSION,
                             timeout=timeout_s)
    try:
        resp = probe.get(f"{probe.base_url}/_ping", timeout=timeout_s)  # requests.Session.get
        version = resp.headers.get("Api-Version") or ""
    finally:
        probe.close()
    if not re.fullmatch(r"1\.\d{1,3}", version):
        return "auto"  # an engine that does not say: let docker-py ask /version
    _API_VERSIONS[base_url] = version
    return version


def _docker_reason(exc: BaseException, timeout_s: float, started: float) -> str:
    """A short reason without the library's URL-laden text (which may carry a tcp:// address with credentials)."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__ or (cur.args[0] if cur.args and isinstance(cur.args[0],
                                                                                      BaseException) else None)
    text = " ".join(str(e) for e in chain).lower()
    elapsed = time.monotonic() - started
    if any(isinstance(e, requests.Timeout | socket.timeout | TimeoutError) for e in chain) or "timed out" in text:
        return f"no answer within {timeout_s:g} s"
    if any(isinstance(e, FileNotFoundError) for e in chain) or "no such file" in text:
        return "socket not found"
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "refused" in text:
        return f"connection refused after {elapsed:.1f} s"
    if "permission denied" in text:
        return "permission denied on the socket"
    return redact(type(exc).__name__)


@contextmanager
def ssh(env: Environment, host: str) -> Iterator[paramiko.SSHClient]:
    """A paramiko client to one of the playbook's ssh_hosts: key auth only, host key checked against known_hosts.

    RejectPolicy: a host key that is not in the configured known_hosts (or differs from it) is refused, never
    learned. Connect, banner, auth and channel waits all use the host's timeout_s; commands set their own.
    """
    try:
        cfg = env.ssh_hosts[host]
    except KeyError:
        known = ", ".join(sorted(env.ssh_hosts)) or "none"
        raise ConfigError(
            f"{env.source}: environments.{env.name}.ssh_hosts: no host {host!r} (known: {known})") from None
    target = f"host {host}"
    client = paramiko.SSHClient()
    try:
        client.get_host_keys().load(str(cfg.known_hosts))  # not load_host_keys(): that would write the file back
    except OSError as exc:
        raise ConfigError(f"{env.source}: environments.{env.name}.ssh_hosts.{host}.known_hosts: cannot read "
                          f"{cfg.known_hosts}: {exc.strerror}") from None
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    started = time.monotonic()
    try:
        client.connect(
            cfg.host, port=cfg.port, username=cfg.user, key_filename=str(cfg.key_file),
            look_for_keys=False, allow_agent=False, timeout=cfg.timeout_s, banner_timeout=cfg.timeout_s,
            auth_timeout=cfg.timeout_s, channel_timeout=cfg.timeout_s,
        )
    except (paramiko.SSHException, OSError) as exc:
        client.close()
        raise TargetUnreachable(target, _ssh_reason(exc, cfg.timeout_s, started)) from None
    try:
        yield client
    except (paramiko.SSHException, OSError) as exc:
        raise TargetUnreachable(target, _ssh_reason(exc, cfg.timeout_s, started)) from None
    finally:
        client.close()


# paramiko's transport thread logs a traceback at ERROR for every failed handshake (silent server, closed socket);
# ssh() reports each as TargetUnreachable with a one-line reason, which the flow turns into a finding.
logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)


def _ssh_reason(exc: BaseException, timeout_s: float, started: float) -> str:
    elapsed = time.monotonic() - started
    if isinstance(exc, paramiko.BadHostKeyException):
        return "host key differs from known_hosts (refused: possible man-in-the-middle)"
    if isinstance(exc, paramiko.AuthenticationException):
        return "key authentication failed"
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return f"connection refused after {elapsed:.1f} s"
    if isinstance(exc, socket.timeout | TimeoutError):
        return f"no answer within {timeout_s:g} s"
    text = str(exc)
    if "protocol banner" in text or "No existing session" in text:  # paramiko's words for a silent server
        return (f"no answer within {timeout_s:g} s" if elapsed >= timeout_s * 0.9
                else f"connection closed before the SSH handshake after {elapsed:.1f} s")
    if "not found in known_hosts" in text:
        return "host key not in known_hosts (refused)"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused after {elapsed:.1f} s"
    if "timeout" in text.lower() or "timed out" in text.lower():
        return f"no answer within {timeout_s:g} s"
    return _first_line(exc)


# ------------------------------------------------------------------ Prometheus (HTTP API through httpx)


@contextmanager
def prometheus(env: Environment, timeout_s: float = 5.0) -> Iterator[httpx.Client]:
    """An httpx client on the environment's Prometheus; connection failures and timeouts raise TargetUnreachable.

    ``trust_env=False``: the URL in the playbook is what is dialled, never a proxy picked up from the environment.
    """
    if not env.prometheus_url:
        raise ConfigError(f"{env.source}: environments.{env.name}.prometheus_url: not configured")
    target = f"prometheus {env.prometheus_url}"
    started = time.monotonic()
    with httpx.Client(base_url=env.prometheus_url, timeout=timeout_s, trust_env=False) as client:
        try:
            yield client
        except httpx.TransportError as exc:
            raise TargetUnreachable(target, _reason(exc, time.monotonic() - started)) from None


# ------------------------------------------------------------------ Elasticsearch (the official client, unmodified)


class PlainJsonNode(elastic_transport.Urllib3HttpNode):
    """Sends ``application/json`` instead of the client's ``application/vnd.elasticsearch+json; compatible-with=8``.

    Only for OpenSearch-compatible servers that answer 406 to Elasticsearch's media types; chosen explicitly by
    ``elasticsearch.media_type: plain-json`` in the playbook, never by default. Real Elasticsearch 8 gets the
    client exactly as shipped.
    """

    def perform_request(self, method: str, target: str, body: bytes | None = None,
                        headers: elastic_transport.HttpHeaders | None = None,
                        request_timeout: Any = elastic_transport.client_utils.DEFAULT,
                        ) -> NodeApiResponse:
        if headers is not None:
            headers = headers.copy()
            for name in ("accept", "content-type"):
                value = headers.get(name) or ""
                if "vnd.elasticsearch+x-ndjson" in value:  # bulk / msearch bodies
                    headers[name] = "application/x-ndjson"
                elif "vnd.elasticsearch+json" in value:
                    headers[name] = "application/json"
        return super().perform_request(method, target, body=body, headers=headers, request_timeout=request_timeout)


@contextmanager
def search(env: Environment) -> Iterator[elasticsearch.Elasticsearch]:
    """The official Elasticsearch 8 client on the environment's cluster: request timeout, no retries.

    Connection errors and timeouts raise TargetUnreachable; API errors (a bad query) propagate as the client's.
    """
    cfg = env.elasticsearch
    if cfg is None:
        raise ConfigError(f"{env.source}: environments.{env.name}.elasticsearch: not configured")
    kwargs: dict[str, Any] = {"request_timeout": cfg.timeout_s, "max_retries": 0, "retry_on_timeout": False}
    if cfg.api_key is not None:
        kwargs["api_key"] = env.resolve_secret(cfg.api_key, "elasticsearch.api_key")
    if cfg.media_type == "plain-json":
        kwargs["node_class"] = PlainJsonNode
    target = f"elasticsearch {cfg.url}"
    started = time.monotonic()
    client = elasticsearch.Elasticsearch(cfg.url, **kwargs)
    try:
        yield client
    except (elasticsearch.ConnectionError, elasticsearch.ConnectionTimeout) as exc:
        raise TargetUnreachable(target, _reason(exc, time.monotonic() - started)) from None
    finally:
        client.close()


# ------------------------------------------------------------------ Redis


@contextmanager
def redis_client(env: Environment) -> Iterator[redis.Redis]:
    """A redis-py client with connect and socket timeouts; unreachable or refused auth raises TargetUnreachable."""
    cfg = env.redis
    if cfg is None:
        raise ConfigError(f"{env.source}: environments.{env.name}.redis: not configured")
    password = env.resolve_secret(cfg.password, "redis.password") if cfg.password else None
    client = redis.Redis.from_url(cfg.url, password=password, socket_timeout=cfg.timeout_s,
                                  socket_connect_timeout=cfg.timeout_s, retry_on_timeout=False,
                                  client_name="runbook", decode_responses=True)
    target = f"redis {cfg.url}"
    started = time.monotonic()
    try:
        yield client
    except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError) as exc:
        raise TargetUnreachable(target, _reason(exc, time.monotonic() - started)) from None
    finally:
        client.close()


def _reason(exc: BaseException, elapsed: float) -> str:
    """A short, secret-free reason: 'connection refused' / 'timeout' named first, whatever the library's wording."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        chain.extend(e for e in getattr(cur, "errors", ()) if isinstance(e, BaseException))
        cur = cur.__cause__ or cur.__context__
    text = " ".join(str(e) for e in chain).lower()
    if "refused" in text:
        return f"connection refused after {elapsed:.1f} s"
    if isinstance(exc, httpx.TimeoutException | elasticsearch.ConnectionTimeout | redis.TimeoutError) \
            or "timed out" in text or "timeout" in text:
        return f"timeout: no answer after {elapsed:.1f} s"
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines and lines[0] else type(exc).__name__
    return f"{redact(first)[:300]} after {elapsed:.1f} s"
