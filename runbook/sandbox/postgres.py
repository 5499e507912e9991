"""PostgreSQL 15 for the sandbox: a private cluster in the state dir, seeded with a Pafar-like database."""

from __future__ import annotations

import hashlib
import os
import pwd
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import psycopg
from psycopg.conninfo import make_conninfo

from runbook.engine.daemon import start_ticks
from runbook.engine.polling import wait_until

from . import net, pafar_seed, process
from .base import Requirement, Service, ServiceRecord
from .errors import MissingSystemPackage, SandboxError
from .yaml_style import Flow, FlowList

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_STAT_STATEMENTS = "/usr/share/postgresql/15/extension/pg_stat_statements.control"
OS_USER = "postgres"
SUPERUSER = "postgres"
START_TIMEOUT_S = 30
ENV_DB_DSN = "RUNBOOK_SANDBOX_DB_DSN"
ENV_APP_DSN = "RUNBOOK_SANDBOX_APP_DSN"
MAX_SOCKET_PATH = 107  # sun_path limit for the .s.PGSQL.<port> socket

SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "shared_preload_libraries": "'pg_stat_statements'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "track_activity_query_size": "4096",
    # serial plans: the unindexed bookings.user_id scan stays visibly slow (~50 ms) and timings stay stable
    # on small machines instead of depending on free cores
    "max_parallel_workers_per_gather": "0",
}


def _tcp_dsn(role: str, password: str, port: int) -> str:
    return f"postgresql://{role}:{quote(password, safe='')}@{net.LOOPBACK}:{port}/{pafar_seed.DATABASE}"


def admin_conninfo(record: ServiceRecord, dbname: str = pafar_seed.DATABASE) -> str:
    """Superuser conninfo over the unix socket in the state dir (trust auth, so no password)."""
    return make_conninfo(host=record.paths["socket_dir"], port=record.port, user=SUPERUSER, dbname=dbname)


class Postgres(Service):
    name = "postgres"
    requirements = (
        Requirement(str(PG_BIN / "initdb"), "postgresql-15"),
        Requirement(str(PG_BIN / "pg_ctl"), "postgresql-15"),
        Requirement(str(PG_BIN / "pg_isready"), "postgresql-15"),
        Requirement(PG_STAT_STATEMENTS, "postgresql-contrib", executable=False),
    )

    def check_requirements(self) -> None:
        super().check_requirements()
        if os.geteuid() == 0:
            Requirement("runuser", "util-linux").check()
            try:
                pwd.getpwnam(OS_USER)
            except KeyError:
                raise MissingSystemPackage(
                    f"OS user '{OS_USER}'", "postgresql-15", "apt-get install -y postgresql-15"
                ) from None

    def start(self, state: Path, port: int, peers: dict[str, ServiceRecord] | None = None) -> ServiceRecord:
        base = self.fresh_dir(state)
        cluster = self._cluster_dir(base)
        data, sock, log = cluster / "data", cluster / "run", cluster / "postgres.log"
        if len(f"{sock}/.s.PGSQL.{port}") > MAX_SOCKET_PATH:
            raise SandboxError(f"state dir path too long for a unix socket: {sock}")
        sock.mkdir(mode=0o755)
        data.mkdir(mode=0o700)
        _chown_tree(cluster)
        user = OS_USER if os.geteuid() == 0 else None
        process.run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            timeout=60,
            what="initdb",
            as_user=user,
        )
        settings = {**SETTINGS, "port": str(port), "unix_socket_directories": _conf_str(str(sock))}
        with open(data / "postgresql.conf", "a") as conf:
            conf.write("\n# runbook sandbox\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        process.run(
            [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", str(START_TIMEOUT_S), "start"],
            timeout=START_TIMEOUT_S + 10,
            what=f"pg_ctl start on port {port}",
            log_file=log,
            as_user=user,
        )
        pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
        record = ServiceRecord(
            name=self.name,
            pid=pid,
            port=port,
            log_file=str(log),
            paths={"base": str(base), "cluster_dir": str(cluster), "data_dir": str(data), "socket_dir": str(sock)},
            cmdline_markers=["postgres", f"-D {data}"],
            proc_start=start_ticks(pid),
        )
        try:
            record.secrets = {"app_password": _password(), "engine_password": _password()}
            with psycopg.connect(admin_conninfo(record, "postgres"), autocommit=True, connect_timeout=5) as conn:
                pafar_seed.create_roles(conn, record.secrets["app_password"], record.secrets["engine_password"])
            with psycopg.connect(admin_conninfo(record), autocommit=True, connect_timeout=5) as conn:
                pafar_seed.seed(conn)
        except Exception as exc:
            self.stop(record)
            raise process.failure(f"seeding postgres on port {port} failed: {exc}", log) from exc
        if not self.is_healthy(record):
            self.stop(record)
            raise process.failure(f"postgres on port {port} not ready after start", log)
        record.running = True
        return record

    def _cluster_dir(self, base: Path) -> Path:
        """Where the cluster lives: the service dir, unless the postgres OS user cannot reach it.

        As root, initdb and the server run as `postgres`, which cannot traverse a 0700 home (a clone in /root, a
        pytest temp root). Then the cluster goes to a directory of its own under the system temp dir, named for
        the state dir (so `down` and the next `up` find it) and readable by `postgres` only.
        """
        if _blocking_dir(base) is None:
            return base
        cluster = _outside_cluster_dir(base)
        shutil.rmtree(cluster, ignore_errors=True)
        cluster.mkdir(mode=0o700)
        _chown_tree(cluster)
        _check_traversable(cluster)
        return cluster

    def clean(self, state: Path) -> None:
        super().clean(state)
        shutil.rmtree(_outside_cluster_dir(self.service_dir(state)), ignore_errors=True)

    def is_healthy(self, record: ServiceRecord) -> bool:
        try:
            process.run(
                [str(PG_BIN / "pg_isready"), "-q", "-h", net.LOOPBACK, "-p", str(record.port), "-t", "2"],
                timeout=5,
                what="pg_isready",
            )
        except SandboxError:
            return False
        return True

    def stop(self, record: ServiceRecord) -> None:
        """`pg_ctl stop -m fast` as the postgres user; falls back to signalling the postmaster PID."""
        if not self.owns_process(record):
            return
        try:
            process.run(
                [
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    record.paths["data_dir"],
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(int(self.stop_timeout_s)),
                    "stop",
                ],
                timeout=self.stop_timeout_s + 5,
                what="pg_ctl stop",
                as_user=OS_USER if os.geteuid() == 0 else None,
            )
        except SandboxError:
            pass
        if not wait_until(lambda: process.is_gone(record.pid), 2.0):
            process.terminate(record.pid, record.cmdline_markers, record.proc_start, self.stop_timeout_s)
        self.wait_port_closed(record)

    def reuse(self, record: ServiceRecord, env: dict[str, str]) -> None:
        """Read the role passwords back from secrets.env; if they are lost, set new ones."""
        app = _password_from(env.get(ENV_APP_DSN), pafar_seed.APP_ROLE, record.port)
        engine = _password_from(env.get(ENV_DB_DSN), pafar_seed.ENGINE_ROLE, record.port)
        if app is None or engine is None:
            app, engine = _password(), _password()
            with psycopg.connect(admin_conninfo(record), autocommit=True, connect_timeout=5) as conn:
                pafar_seed.set_passwords(conn, app, engine)
        record.secrets = {"app_password": app, "engine_password": engine}

    def secrets_env(self, record: ServiceRecord) -> dict[str, str]:
        return {
            ENV_DB_DSN: _tcp_dsn(pafar_seed.ENGINE_ROLE, record.secrets["engine_password"], record.port),
            ENV_APP_DSN: _tcp_dsn(pafar_seed.APP_ROLE, record.secrets["app_password"], record.port),
        }

    def playbook_fragment(self, record: ServiceRecord) -> dict[str, Any]:
        return {
            "databases": {
                "main": {
                    "dsn": Flow(env=ENV_DB_DSN),
                    "key_tables": FlowList(["users", "bookings", "payments"]),
                    "connect_timeout_s": 3,
                    "statement_timeout_ms": 5000,
                }
            }
        }


def _password() -> str:
    return secrets.token_urlsafe(18)


def _password_from(dsn: str | None, role: str, port: int) -> str | None:
    """The password in a DSN we generated, if it is for this role and port."""
    if not dsn:
        return None
    parts = urlsplit(dsn)
    if parts.username != role or parts.port != port or not parts.password:
        return None
    return unquote(parts.password)


def _conf_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _outside_cluster_dir(base: Path) -> Path:
    digest = hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"runbook-sandbox-pg-{digest}"


def _check_traversable(path: Path) -> None:
    """Fail clearly when the postgres OS user cannot reach ``path``."""
    blocking = _blocking_dir(path)
    if blocking is not None:
        st = blocking.stat()
        raise SandboxError(
            f"the {OS_USER} OS user cannot traverse {blocking} (mode {stat.S_IMODE(st.st_mode):o}), so it cannot "
            f"reach {path}: `chmod o+x {blocking}` or choose another state dir (RUNBOOK_SANDBOX_DIR)"
        )


def _blocking_dir(path: Path) -> Path | None:
    """The first directory on the way to ``path`` that the postgres OS user cannot traverse (root only)."""
    if os.geteuid() != 0:
        return None
    pw = pwd.getpwnam(OS_USER)
    gids = set(os.getgrouplist(OS_USER, pw.pw_gid))
    for p in [path, *path.parents]:
        st = p.stat()
        if st.st_uid == pw.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in gids:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return p
    return None


def _chown_tree(path: Path) -> None:
    """Give the postgres OS user the cluster's directory (initdb and the server run as that user)."""
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(OS_USER)
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)


SERVICE = Postgres()
