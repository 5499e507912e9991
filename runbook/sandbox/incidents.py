"""Incident injectors for the sandbox: real sessions that make the real database slow, for tests and the demo.

Each injector holds its own connections (as the application role ``pafar_app``) in threads, and ``stop()`` closes
them all, so an incident never outlives the test or demo that made it.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
import psycopg

from runbook.engine.clients import docker_api_version
from tasks.last_known_good import create_kwargs, replica_spec

from .podman import IMAGE, NETWORK, PROJECT, compose_labels, project_filter

SLOW_QUERY = "SELECT * FROM bookings WHERE user_id = %s"
LONG_QUERY = "SELECT pg_sleep(600) /* runaway report */"
WAITER_UPDATE = "UPDATE payments SET status = %s WHERE id = %s"


def scalar(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> Any:
    """The first column of the first row a query returns (it must return one)."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise LookupError(f"no row from {query!r}")
    return row[0]


@dataclass
class DbIncident:
    """A root blocker idle in transaction, ``waiters`` sessions queued behind it, a runaway query, a slow filter."""

    app_dsn: str
    waiters: int = 2
    slow_runs: int = 5
    runaway: bool = True
    _conns: list[psycopg.Connection] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    waiter_results: list[str] = field(default_factory=list)
    blocker_pid: int = 0
    waiter_pids: list[int] = field(default_factory=list)
    runaway_pid: int = 0

    def _connect(self, name: str, autocommit: bool = True) -> psycopg.Connection:
        conn = psycopg.connect(self.app_dsn, autocommit=autocommit, connect_timeout=5, application_name=name)
        self._conns.append(conn)
        return conn

    def start(self) -> DbIncident:
        slow = self._connect("pafar-backend")
        for _ in range(self.slow_runs):
            user_id = scalar(slow, "SELECT id FROM users ORDER BY random() LIMIT 1")
            slow.execute(SLOW_QUERY, (user_id,)).fetchall()
        blocker = self._connect("pafar-backend", autocommit=False)
        blocker.execute("UPDATE payments SET status = status WHERE id = 1")  # now idle in transaction, row locked
        self.blocker_pid = blocker.info.backend_pid
        for i in range(self.waiters):
            conn = self._connect(f"pafar-celery-{i}")
            self.waiter_pids.append(conn.info.backend_pid)
            self._spawn(self._wait_on_lock, conn, f"settled-{i}")
        if self.runaway:
            conn = self._connect("pafar-reports")
            self.runaway_pid = conn.info.backend_pid
            self._spawn(self._run_quietly, conn, LONG_QUERY)
        self._wait_for_waiters()
        return self

    def _spawn(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def _wait_on_lock(self, conn: psycopg.Connection, status: str) -> None:
        try:
            conn.execute(WAITER_UPDATE, (status, 1))
            self.waiter_results.append("done")
        except psycopg.Error as exc:
            self.waiter_results.append(f"error: {type(exc).__name__}")

    @staticmethod
    def _run_quietly(conn: psycopg.Connection, sql: str) -> None:
        try:
            conn.execute(sql)
        except psycopg.Error:
            pass  # cancelled or terminated by the remediation under test: that is the point

    def _wait_for_waiters(self, timeout_s: float = 5.0) -> None:
        """Return once every waiter is really queued on the lock (and the runaway is running)."""
        admin = self._connect("pafar-probe")
        deadline = time.monotonic() + timeout_s
        want = set(self.waiter_pids)
        while time.monotonic() < deadline:
            rows = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid = ANY(%s)",
                (list(want),),
            ).fetchall()
            if {r[0] for r in rows} == want:
                return
            time.sleep(0.05)
        raise TimeoutError(f"waiters {sorted(want)} did not queue on the lock within {timeout_s} s")

    def stop(self) -> None:
        for conn in self._conns:
            try:
                conn.cancel_safe(timeout=2) if not conn.closed else None
            except (psycopg.Error, AttributeError):
                pass
            conn.close()
        for t in self._threads:
            t.join(timeout=5)
        self._conns.clear()
        self._threads.clear()


# ------------------------------------------------------------------ container incidents (issue 3: Podman's Docker API)

# Fixed commands of the injected containers (sandbox code, never input). The burner also logs ERROR lines, as a
# struggling backend does, so high-cpu can correlate the two.
BURNER_CMD = ["sh", "-c", 'while true; do echo "ERROR upstream timed out after 30s"; sleep 1; done & '
              "exec yes > /dev/null"]
# ~2 MiB/s in small steps (256 KiB every 1/8 s, so a few samples already lie on a line) into a tmpfs, which counts
# in the container's memory cgroup; a restart gives it a fresh, empty tmpfs.
GROWER_CMD = ["sh", "-c", 'trap "exit 0" TERM; i=0; while true; do '
              'dd if=/dev/zero of=/data/chunk$i bs=256k count=1 2>/dev/null; '
              'i=$((i+1)); [ $((i % 8)) -eq 0 ] && echo "INFO cached batch $i"; sleep 0.125; done']


@contextlib.contextmanager
def docker_client(url: str) -> Iterator[docker.DockerClient]:
    """A client of the sandbox's Podman API, closed when the block ends."""
    client = docker.DockerClient(base_url=url, version=docker_api_version(url, 30), timeout=30)
    try:
        yield client
    finally:
        client.close()


@dataclass
class ContainerIncident:
    """Base of the container injectors: talks to the sandbox's Podman API; ``stop()`` undoes what ``start()`` did."""

    docker_url: str
    service: str = "backend"
    number: int = 2
    container_id: str = ""
    name: str = ""

    def client(self) -> contextlib.AbstractContextManager[docker.DockerClient]:
        return docker_client(self.docker_url)

    def _run(self, command: list[str], **extra: object) -> ContainerIncident:
        with self.client() as client:
            self.name = f"{PROJECT}-{self.service}-{self.number}"
            container = client.containers.run(
                IMAGE, command, name=self.name, detach=True, labels=compose_labels(self.service, self.number),
                network=NETWORK, environment={"PAFAR_SERVICE": self.service}, **extra)
            self.container_id = container.id
        return self

    def stop(self) -> None:
        if not self.container_id:
            return
        with self.client() as client, contextlib.suppress(docker.errors.NotFound):
            client.api.remove_container(self.container_id, force=True)
        self.container_id = ""


@dataclass
class CpuBurner(ContainerIncident):
    """A backend replica spinning one core (`yes > /dev/null`) and logging an ERROR line every second."""

    def start(self) -> CpuBurner:
        self._run(BURNER_CMD, mem_limit="256m")
        return self


@dataclass
class MemoryGrower(ContainerIncident):
    """A celery-worker replica whose memory grows steadily (~2 MiB/s into a tmpfs), up to ``tmpfs_mb``."""

    service: str = "celery-worker"
    tmpfs_mb: int = 200
    mem_limit_mb: int = 512

    def start(self) -> MemoryGrower:
        self._run(GROWER_CMD, mem_limit=f"{self.mem_limit_mb}m", tmpfs={"/data": f"size={self.tmpfs_mb}m"})
        return self


@dataclass
class StoppedService(ContainerIncident):
    """Stops an existing service container (pafar-<service>-1); ``stop()`` starts it again if it is still down."""

    number: int = 1

    def start(self) -> StoppedService:
        with self.client() as client:
            self.name = f"{PROJECT}-{self.service}-{self.number}"
            container = client.containers.get(self.name)
            container.stop(timeout=3)  # the sandbox's containers trap SIGTERM and exit within ~1 s
            self.container_id = container.id
        return self

    def stop(self) -> None:
        if not self.container_id:
            return
        with self.client() as client:
            container = client.containers.get(self.container_id)
            if container.status != "running":
                container.start()
        self.container_id = ""


def remove_containers_except(docker_url: str, keep_ids: set[str]) -> list[str]:
    """Remove every compose-project container not in ``keep_ids`` (replicas a test scaled up); their names."""
    removed = []
    with docker_client(docker_url) as client:
        for c in client.containers.list(all=True, filters=project_filter()):
            if c.id not in keep_ids:
                c.remove(force=True)
                removed.append(c.name)
    return removed


# A "v2" of the backend whose health check fails: its web server runs, but /health is gone and it logs an ERROR
# line a second (a release that cannot reach its migrations). Built locally from the sandbox's image (no registry).
BAD_IMAGE = "localhost/pafar-backend:v2"
BAD_CMD = ["sh", "-c", 'trap "exit 0" TERM; mkdir -p /www && httpd -p 8000 -h /www && '
           'while true; do echo "ERROR v2: migrations not applied, refusing requests"; sleep 1; done']


def build_bad_image(client: docker.DockerClient, base: str = IMAGE) -> str:
    """Commit ``base`` with v2's command as BAD_IMAGE (a local build through the Docker API); its image id."""
    tmp = client.containers.create(base, ["true"])
    try:
        image = tmp.commit(repository=BAD_IMAGE.rsplit(":", 1)[0], tag=BAD_IMAGE.rsplit(":", 1)[1],
                           changes=[f"CMD {json.dumps(BAD_CMD)}"])
    finally:
        tmp.remove(force=True)
    return str(image.id)


def replace_container(client: docker.DockerClient, name: str, image: str, command: list[str] | None) -> str:
    """Recreate container ``name`` with its own configuration from ``image`` (``command`` None: the image's CMD),
    as a deployment does; the new container's id."""
    old = client.api.inspect_container(name)
    spec = replica_spec(old).model_copy(update={"command": command})
    client.api.remove_container(old["Id"], force=True)
    new = client.containers.create(**create_kwargs(spec, image))
    new.start()
    return str(new.id)


@dataclass
class BadDeploy(ContainerIncident):
    """Deploys BAD_IMAGE as pafar-<service>-1 with the same configuration; ``stop()`` puts the original image and
    command back (whatever a rollback did meanwhile) and removes v2's image."""

    number: int = 1
    original_image_id: str = ""
    original_command: list[str] = field(default_factory=list)
    bad_image_id: str = ""

    def start(self) -> BadDeploy:
        self.name = f"{PROJECT}-{self.service}-{self.number}"
        with self.client() as client:
            attrs = client.api.inspect_container(self.name)
            self.original_image_id = attrs["Image"]
            self.original_command = list(attrs["Config"]["Cmd"] or [])
            self.bad_image_id = build_bad_image(client)
            self.container_id = replace_container(client, self.name, self.bad_image_id, None)
        return self

    def stop(self) -> None:
        if not self.original_image_id:
            return
        with self.client() as client:
            with contextlib.suppress(docker.errors.NotFound):
                client.api.remove_container(f"{self.name}-before-rollback", force=True)
            attrs = client.api.inspect_container(self.name)
            if attrs["Image"] != self.original_image_id or attrs["Config"]["Cmd"] != self.original_command:
                ref = IMAGE if client.images.get(IMAGE).id == self.original_image_id else self.original_image_id
                replace_container(client, self.name, ref, self.original_command)
            elif not attrs["State"]["Running"]:
                client.api.start(self.name)
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(self.bad_image_id, force=True)
        self.container_id = self.original_image_id = ""
