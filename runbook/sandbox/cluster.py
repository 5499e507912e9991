"""The production shape of deploy/cluster/, started as processes on loopback: the multi-node test and benchmark.

deploy/cluster/compose.yaml describes it for real hosts: one PostgreSQL, one Redis, two Prefect API replicas
(`--no-services`) and one process of Prefect's background services sharing events, leases and Docket through Redis
(prefect-redis), nginx round-robin in front of the API replicas and in front of two intakes, and two executors.
Here each of those is a process of its own on 127.0.0.1: the sandbox's PostgreSQL (a database created for the
cluster, dropped by ``stop``), a Redis of its own, nginx from the system package. The Prefect settings and the nginx
configuration come from the same functions the deploy files are checked against (tests/unit/test_deploy_files.py),
so what the test starts is what the description says.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from runbook.engine import daemon
from runbook.engine.config import PROJECT_ROOT
from runbook.engine.prefect_env import (
    AUTH_ENV,
    SERVER_AUTH_ENV,
    TELEMETRY_OFF,
    api_url,
    auth_header,
    ensure_auth_string,
    prefect_executable,
)

from . import process
from .base import ServiceRecord
from .errors import SandboxError
from .postgres import admin_conninfo
from .redis import Redis

NGINX = "/usr/sbin/nginx"
START_TIMEOUT_S = 120.0

# Prefect's documented settings for several API replicas ("How to scale self-hosted Prefect"): without them each
# replica keeps events, leases and the background services' queue in memory, and a run's events reach only the
# replica that received them.
HA_SETTINGS = {
    "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",  # two replicas migrating at once race: migrate first, once
    "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
    "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
    "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
}


def prefect_ha_env(database_url: str, redis_host: str, redis_port: int) -> dict[str, str]:
    """Environment of every Prefect server process of the cluster (API replicas and background services)."""
    return {
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        **HA_SETTINGS,
        "PREFECT_REDIS_MESSAGING_HOST": redis_host,
        "PREFECT_REDIS_MESSAGING_PORT": str(redis_port),
        "PREFECT_REDIS_MESSAGING_DB": "0",
        "PREFECT_SERVER_DOCKET_URL": f"redis://{redis_host}:{redis_port}/1",
    }


def nginx_conf(api_port: int, api_backends: list[str], intake_port: int, intake_backends: list[str],
               listen_host: str = "127.0.0.1", run_dir: str = "/run/runbook-lb", user: str | None = None) -> str:
    """nginx round-robin in front of the Prefect API replicas and the intakes.

    A dead backend is skipped (``proxy_next_upstream error timeout``). The intake's POST may be retried on the
    other intake (``non_idempotent``): an alert stored twice is one occurrence. The API's is not: a run created
    twice would be two runs. The API upstream carries websockets (the executors' event stream).
    """
    def upstream(name: str, backends: list[str]) -> str:
        servers = "".join(f"        server {b} max_fails=1 fail_timeout=5s;\n" for b in backends)
        return f"    upstream {name} {{\n{servers}    }}\n"

    return (
        (f"user {user};\n" if user else "")
        + "worker_processes 1;\n"
        f"pid {run_dir}/nginx.pid;\n"
        f"error_log {run_dir}/error.log warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        "    access_log off;\n"
        f"    client_body_temp_path {run_dir}/body;\n"
        f"    proxy_temp_path {run_dir}/proxy;\n"
        "    map $http_upgrade $connection_upgrade { default upgrade; '' ''; }\n"
        + upstream("prefect_api", api_backends)
        + upstream("runbook_intake", intake_backends)
        + "    server {\n"
        f"        listen {listen_host}:{api_port};\n"
        "        client_max_body_size 16m;\n"
        "        location / {\n"
        "            proxy_pass http://prefect_api;\n"
        "            proxy_http_version 1.1;\n"
        "            proxy_set_header Upgrade $http_upgrade;\n"
        "            proxy_set_header Connection $connection_upgrade;\n"
        "            proxy_set_header Host $host;\n"
        "            proxy_connect_timeout 2s;\n"
        "            proxy_read_timeout 3600s;\n"
        "            proxy_next_upstream error timeout;\n"
        "        }\n"
        "    }\n"
        "    server {\n"
        f"        listen {listen_host}:{intake_port};\n"
        "        client_max_body_size 2m;\n"
        "        location / {\n"
        "            proxy_pass http://runbook_intake;\n"
        "            proxy_http_version 1.1;\n"
        "            proxy_set_header Connection '';\n"
        "            proxy_connect_timeout 2s;\n"
        "            proxy_read_timeout 30s;\n"
        "            proxy_next_upstream error timeout http_502 http_503 non_idempotent;\n"
        "        }\n"
        "    }\n"
        "}\n"
    )


@dataclass
class Member:
    """One process of the cluster, restartable with the same command and environment."""
    name: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = daemon.spawn(self.cmd, self.log, env=self.env)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal the member's whole process group (kill -9 by default, as a crashed host would) and reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig in (signal.SIGKILL, signal.SIGTERM):
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@dataclass
class Cluster:
    """A running cluster: its entry points (the two nginx ports) and its members by name."""
    root: Path
    api_url: str  # through nginx
    intake_url: str  # through nginx
    token: str
    auth: str  # the Prefect API's basic-auth string (the servers demand it, every client sends it)
    database: str
    pg: ServiceRecord
    members: dict[str, Member] = field(default_factory=dict)
    redis: ServiceRecord | None = None

    def member(self, name: str) -> Member:
        return self.members[name]

    def client_env(self) -> dict[str, str]:
        """What a CLI command needs to talk to this cluster's API (through nginx)."""
        return {**_base_env(), "PREFECT_API_URL": self.api_url, AUTH_ENV: self.auth}

    def api_headers(self) -> dict[str, str]:
        return auth_header(self.auth)

    def stop(self) -> None:
        """Stop every member (executors first, so none is left claiming), then drop the cluster's database."""
        order = [n for n in self.members if n.startswith("executor")] + [
            n for n in self.members if not n.startswith("executor")]
        for name in order:
            self.members[name].kill(signal.SIGTERM)
        if self.redis is not None:
            process.terminate(self.redis.pid, self.redis.cmdline_markers, self.redis.proc_start)
        _drop_database(self.pg, self.database)


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(TELEMETRY_OFF)
    return env


def _wait(what: str, member: Member, healthy: Callable[[], bool], timeout_s: float = START_TIMEOUT_S) -> None:
    assert member.proc is not None
    try:
        daemon.await_healthy(member.proc, healthy, timeout_s, what, interval_s=0.25)
    except daemon.DaemonFailed as exc:
        raise SandboxError(f"{exc}; its log: {member.log}") from None


def _answers(url: str) -> Callable[[], bool]:
    return lambda: daemon.http_ok(url)


def _logged(log: Path, text: str) -> Callable[[], bool]:
    return lambda: text in log.read_text(errors="replace")


def _create_database(pg: ServiceRecord) -> str:
    name = f"runbook_cluster_{secrets.token_hex(4)}"
    with psycopg.connect(admin_conninfo(pg, "postgres"), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # a name of our own making: [a-z0-9_] only
    return name


def _drop_database(pg: ServiceRecord, name: str) -> None:
    with psycopg.connect(admin_conninfo(pg, "postgres"), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def start_cluster(root: Path, pg: ServiceRecord, playbooks: list[Path], executors: int = 2, intakes: int = 2,
                  api_replicas: int = 2, executor_poll_s: float = 1.0) -> Cluster:
    """Start the deploy/cluster shape under ``root`` on free loopback ports; ``stop()`` undoes it all.

    ``playbooks``: what the intakes and executors read (RUNBOOK_PLAYBOOKS): the sandbox environment and the
    routes of the caller. The caller gets a cluster whose deployments are registered and whose executors serve.
    """
    if not Path(NGINX).is_file():
        raise SandboxError(f"{NGINX} is missing: `make test` installs it (deploy/system-deps.sh: nginx-light)")
    root.mkdir(parents=True, exist_ok=True)
    ports = daemon.free_ports(1 + api_replicas + intakes + 2)
    redis_port, api_ports = ports[0], ports[1:1 + api_replicas]
    intake_ports = ports[1 + api_replicas:1 + api_replicas + intakes]
    lb_api, lb_intake = ports[-2], ports[-1]
    database = _create_database(pg)
    cluster = Cluster(root=root, api_url=api_url(lb_api), intake_url=f"http://127.0.0.1:{lb_intake}",
                      token=secrets.token_urlsafe(24), auth=ensure_auth_string(root / "prefect-api-auth"),
                      database=database, pg=pg)
    try:
        cluster.redis = Redis().start(root, redis_port)
        db_url = f"postgresql+asyncpg://postgres@/{database}?host={pg.paths['socket_dir']}&port={pg.port}"
        prefect = [str(prefect_executable()), "server"]
        server_env = {**_base_env(), "PREFECT_HOME": str(root / "prefect-home"),
                      **prefect_ha_env(db_url, "127.0.0.1", redis_port), SERVER_AUTH_ENV: cluster.auth,
                      "PREFECT_UI_API_URL": cluster.api_url, "PREFECT_UI_URL": cluster.api_url.removesuffix("/api")}
        (root / "prefect-home").mkdir(exist_ok=True)
        migrate = subprocess.run([*prefect, "database", "upgrade", "-y"], env=server_env, capture_output=True,
                                 text=True, timeout=300)
        if migrate.returncode != 0:
            raise SandboxError(f"prefect server database upgrade failed: {migrate.stderr[-2000:]}")
        # one replica first: replicas starting together on a fresh database race on registering Prefect's
        # block types (a unique violation, and the loser exits)
        for i, port in enumerate(api_ports, 1):
            m = Member(f"api{i}", [*prefect, "start", "--host", "127.0.0.1", "--port", str(port), "--no-services",
                                   "--analytics-off"], server_env, root / f"api{i}.log")
            cluster.members[m.name] = m
            m.start()
            _wait(f"prefect API replica {i} on 127.0.0.1:{port}", m,
                  _answers(f"{api_url(port)}/health"))
        cluster.members["services"] = Member("services", [*prefect, "services", "start"], server_env,
                                             root / "services.log")
        cluster.members["services"].start()
        run_dir = root / "nginx"
        run_dir.mkdir(exist_ok=True)
        conf = run_dir / "nginx.conf"
        conf.write_text(nginx_conf(lb_api, [f"127.0.0.1:{p}" for p in api_ports], lb_intake,
                                   [f"127.0.0.1:{p}" for p in intake_ports], run_dir=str(run_dir),
                                   user="root" if os.geteuid() == 0 else None))
        lb = Member("nginx", [NGINX, "-c", str(conf), "-p", str(run_dir), "-g", "daemon off;"], _base_env(),
                    root / "nginx.log")
        cluster.members["nginx"] = lb
        lb.start()
        _wait("nginx", lb, lambda: daemon.http_ok(f"{cluster.api_url}/health"))
        env = {**cluster.client_env(), "RUNBOOK_PLAYBOOKS": os.pathsep.join(str(p) for p in playbooks),
               "RUNBOOK_INTAKE_TOKEN": cluster.token,
               # the intakes share one state (dedup, cooldown, breaker) in the cluster's database
               "RUNBOOK_INTAKE_STATE_DSN": admin_conninfo(pg, database)}
        runbook = [sys.executable, "-m", "runbook.app.cli"]
        deploy = subprocess.run([*runbook, "deploy"], env=env, capture_output=True, text=True, timeout=300,
                                cwd=PROJECT_ROOT)
        if deploy.returncode != 0:
            raise SandboxError(f"runbook deploy failed: {deploy.stdout[-1000:]}{deploy.stderr[-2000:]}")
        for i, port in enumerate(intake_ports, 1):
            m = Member(f"intake{i}", [*runbook, "intake", "--port", str(port), "--state", str(root / f"intake{i}")],
                       env, root / f"intake{i}.log")
            cluster.members[m.name] = m
            m.start()
        for i in range(1, executors + 1):
            m = Member(f"executor{i}", [*runbook, "worker", "--poll", str(executor_poll_s), "--grace", "5"], env,
                       root / f"executor{i}.log")
            cluster.members[m.name] = m
            m.start()
        for i, port in enumerate(intake_ports, 1):
            _wait(f"intake {i} on 127.0.0.1:{port}", cluster.members[f"intake{i}"],
                  _answers(f"http://127.0.0.1:{port}/healthz"))
        for i in range(1, executors + 1):
            m = cluster.members[f"executor{i}"]
            _wait(f"executor {i}", m, _logged(m.log, "serving work pool"))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def restart(member: Member) -> None:
    """Start a killed member again with the same command (what systemd's Restart=always does)."""
    member.kill()
    member.start()
