"""The services that write to the database (``writer: true`` in the playbook), stopped around a restore.

One small interface so the restore does not care how writers run: ``DockerWriters`` stops and starts their
containers (found by compose labels, through ``runbook.engine.clients.docker_client``) when ``docker:`` is configured.
Without it there is nothing the engine can stop, and ``writers_for`` returns None: the plan says so as a warning.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import docker
import docker.errors
from docker.models.containers import Container

from runbook.engine.clients import docker_client
from runbook.engine.config import Environment
from runbook.engine.errors import RemediationFailed
from tasks.containers import project_filters

NO_DOCKER = "no docker configured: writers not stopped"


class Writers(Protocol):
    services: list[str]

    def running(self) -> dict[str, list[str]]:
        """service -> ids of its running containers."""
        ...

    def stop(self) -> list[str]:
        """Stop every running writer container; return the ids stopped (what ``start`` must bring back)."""
        ...

    def start(self, ids: list[str]) -> list[str]:
        """Start these containers again; return the ids that are running afterwards."""
        ...


def writer_services(env: Environment) -> list[str]:
    return sorted(name for name, svc in env.services.items() if svc.writer)


class DockerWriters:
    """Writer containers of the compose project, through the Docker API (Docker Engine or Podman)."""

    def __init__(self, env: Environment, services: list[str], stop_timeout_s: int = 10) -> None:
        self.env, self.services, self.stop_timeout_s = env, services, stop_timeout_s

    def _containers(self, client: docker.DockerClient, service: str) -> list[Container]:
        found: list[Container] = client.containers.list(all=True, filters=project_filters(self.env, service))
        return found

    def running(self) -> dict[str, list[str]]:
        with docker_client(self.env) as client:
            return {s: [c.id for c in self._containers(client, s) if c.status == "running"] for s in self.services}

    def stop(self) -> list[str]:
        """Stop the running writer containers in parallel (each gets ``stop_timeout_s`` to exit cleanly)."""
        with docker_client(self.env) as client:
            running = [c for s in self.services for c in self._containers(client, s) if c.status == "running"]
            if not running:
                return []
            with ThreadPoolExecutor(max_workers=min(8, len(running))) as pool:
                results = list(pool.map(self._stop_one, running))
        failed = [r for r in results if r]
        if failed:  # all or nothing: start the ones that did stop, so the caller has nothing to undo
            self.start([c.id for c, r in zip(running, results, strict=True) if not r])
            raise RemediationFailed("; ".join(failed))
        return [c.id for c in running]

    def _stop_one(self, container: Container) -> str:
        try:
            container.stop(timeout=self.stop_timeout_s)
        except docker.errors.APIError as exc:
            return f"could not stop container {container.name}: {exc}"
        return ""

    def start(self, ids: list[str]) -> list[str]:
        started: list[str] = []
        with docker_client(self.env) as client:
            for cid in ids:
                try:
                    c = client.containers.get(cid)
                    if c.status != "running":
                        c.start()
                        c.reload()
                    if c.status == "running":
                        started.append(cid)
                except docker.errors.APIError:
                    continue  # reported by the caller: asked for vs running
        return started


def writers_for(env: Environment, stop_timeout_s: int = 10) -> Writers | None:
    """The writers' controller for this environment, or None when nothing can stop them (no ``docker:``)."""
    services = writer_services(env)
    if env.docker is None or not services:
        return None
    return DockerWriters(env, services, stop_timeout_s)
