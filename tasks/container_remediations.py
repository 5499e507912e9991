"""Container remediations: scale a service, restart leaking containers one at a time, start stopped containers.

All three follow the check/plan/apply/verify contract (runbook.engine.remediation) and talk to the Docker API only
(there is no `docker compose` on a Podman host, and the engine must not shell out). Each planned change names one
container; ``apply`` re-reads it and acts only if it still is as planned, so a repeat (or a state that moved on)
changes nothing:

- scale-service: "scale to N unless N or more run"; N is bounded by the playbook's ``max_replicas``. New replicas copy
  an existing container's image, command, environment, labels (container-number renumbered), network and limits.
  Published host ports are not copied: a fixed host port can be bound once, and compose's own ``--scale`` fails on it.
- restart-leakers: "restart unless it already restarted after the alert began" (``since``), one container at a time,
  waiting for each to run again before the next, so a service never loses more than one replica at once.
- start-service-containers: start the service's stopped (exited/created) containers; verify they run and, when the
  playbook gives the service a health_url, that it answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import docker.errors
import httpx
from pydantic import BaseModel

from runbook.engine.clients import docker_client
from runbook.engine.config import Environment, ServiceConfig
from runbook.engine.errors import BadInput, RemediationFailed, TargetUnreachable
from runbook.engine.findings import Change
from runbook.engine.polling import wait_until
from runbook.engine.remediation import Remediation, register
from tasks.containers import NUMBER_LABEL, ContainerInfo, human_bytes, memory_usage, project_filters, summarize

STOPPED_STATES = {"exited", "created", "stopped", "configured"}


class ContainerTarget(BaseModel, frozen=True):
    """An existing container a change acts on, with what its guard and verify compare against: the start time
    planned against (restart) and the memory measured at plan time (verify: did it drop)."""

    id: str
    name: str
    started_at: datetime | None = None
    mem_usage: int = 0


class NewReplica(BaseModel, frozen=True):
    """A replica a scale creates: its container name and compose container-number."""

    name: str
    number: int


def service_config(env: Environment, service: str) -> ServiceConfig:
    """The playbook's entry for ``service``; BadInput naming the known ones when there is none."""
    try:
        return env.services[service]
    except KeyError:
        known = ", ".join(sorted(env.services)) or "none"
        raise BadInput(f"service {service!r} is not in environments.{env.name}.services (known: {known})") from None


def inspect_container(client: Any, ref: str) -> dict[str, Any] | None:
    """`docker inspect` of a container, None when it does not exist (any more)."""
    try:
        attrs: dict[str, Any] = client.api.inspect_container(ref)
        return attrs
    except docker.errors.NotFound:
        return None


# ---------------------------------------------------------------------------------------------- scale


@dataclass(frozen=True)
class Replicas:
    """A service's containers as scale-service reads them: the running ones, all, the configuration to copy (the
    newest running container's inspect document) and the next free container-number."""

    running: list[ContainerInfo]
    all: list[ContainerInfo]
    template: dict[str, Any] | None
    next_number: int


@register
class ScaleService(Remediation[Replicas]):
    """Create replicas of a compose service through the API until ``replicas`` run (never above max_replicas)."""

    name = "scale-service"

    def __init__(self, env: Environment, service: str, replicas: int, verify_timeout_s: float = 20.0) -> None:
        cfg = service_config(env, service)
        if replicas < 1 or replicas > cfg.max_replicas:
            raise BadInput(f"replicas={replicas}: must be between 1 and services.{service}.max_replicas "
                           f"({cfg.max_replicas})")
        if env.docker is None:
            raise BadInput(f"environment {env.name!r} has no docker section: nothing to scale")
        self.env, self.service, self.replicas = env, service, replicas
        self.max_replicas = cfg.max_replicas
        self.verify_timeout_s = verify_timeout_s

    @property
    def target(self) -> str:
        return f"{self.env.name}/{self.service} (to {self.replicas} replicas, max {self.max_replicas})"

    def _read(self, client: Any) -> Replicas:
        found = client.containers.list(all=True, filters=project_filters(self.env, self.service))
        attrs = [c.attrs for c in found]
        running = [a for a in attrs if (a.get("State") or {}).get("Running")]
        pool = running or attrs
        template = max(pool, key=lambda a: a.get("Created") or "") if pool else None
        numbers = [int(n) for a in attrs if str(n := ((a.get("Config") or {}).get("Labels") or {})
                                                .get(NUMBER_LABEL, "")).isdigit()]
        return Replicas(running=[summarize(a) for a in running], all=[summarize(a) for a in attrs],
                        template=template, next_number=max(numbers, default=len(attrs)) + 1)

    def check(self) -> Replicas:
        with docker_client(self.env) as client:
            return self._read(client)

    def plan(self, state: Replicas) -> list[Change]:
        have = len(state.running)
        if have >= self.replicas:
            return []
        template = state.template
        if template is None:
            raise TargetUnreachable(f"service {self.service}", "no container of it exists to copy the configuration")
        project = self.env.docker.compose_project if self.env.docker else ""
        src = summarize(template)
        changes = []
        for i in range(self.replicas - have):
            number = state.next_number + i
            name = f"{project}-{self.service}-{number}"
            changes.append(Change(
                action="create", subject=f"container {name}",
                key=f"create:{name}:running=" + ",".join(sorted(c.id for c in state.running)),
                before={"service": self.service, "running_replicas": have, "copy_of": src.name},
                after={"image": src.image, "number": number, "state": "running", "replicas": self.replicas},
                target=Change.target_of(NewReplica(name=name, number=number)),
            ))
        return changes

    def apply(self, plan: list[Change]) -> list[Change]:
        done: list[Change] = []
        with docker_client(self.env) as client:
            state = self._read(client)
            missing = self.replicas - len(state.running)  # guard: count again, someone may have scaled meanwhile
            template = state.template
            if template is None:
                raise RemediationFailed(f"no container of {self.service} left to copy")
            for change in plan:
                if missing <= 0:
                    break
                new = change.target_as(NewReplica)
                if inspect_container(client, new.name) is not None:
                    continue  # a container of that name already exists: never create a second one
                try:
                    client.containers.run(**_replica_spec(template, new.name, new.number))
                except docker.errors.APIError as exc:
                    raise RemediationFailed(f"creating {new.name}: {exc.explanation or exc}", done=done) from None
                done.append(change)
                missing -= 1
        return done

    def verify(self, applied: list[Change]) -> tuple[bool, str]:
        names = [c.target_as(NewReplica).name for c in applied]
        last: list[Replicas] = []

        def converged() -> bool:
            with docker_client(self.env) as client:
                states = {n: ((inspect_container(client, n) or {}).get("State") or {}) for n in names}
                last[:] = [self._read(client)]
            return all(s.get("Running") for s in states.values()) and len(last[0].running) >= self.replicas

        ok = wait_until(converged, self.verify_timeout_s)
        running = len(last[0].running) if last else 0
        return ok, (f"{running} replica(s) of {self.service} running; created {', '.join(names)}" if ok else
                    f"after {self.verify_timeout_s:g} s only {running} of {self.replicas} running ({', '.join(names)})")


def _replica_spec(template: dict[str, Any], name: str, number: int) -> dict[str, Any]:
    """docker-py run() arguments reproducing the template container's configuration under a new name and number."""
    cfg, host = template.get("Config") or {}, template.get("HostConfig") or {}
    labels = {**(cfg.get("Labels") or {}), NUMBER_LABEL: str(number)}
    networks = list((template.get("NetworkSettings") or {}).get("Networks") or {})
    mode = host.get("NetworkMode") or ""
    network = networks[0] if networks else (mode if mode and mode not in {"default", "bridge"} else None)
    env = [e for e in cfg.get("Env") or [] if not e.startswith("HOSTNAME=")]
    spec: dict[str, Any] = {
        "image": cfg.get("Image") or template.get("Image"), "command": cfg.get("Cmd") or None, "name": name,
        "labels": labels, "environment": env, "detach": True,
        "working_dir": cfg.get("WorkingDir") or None, "user": cfg.get("User") or None,
    }
    if cfg.get("Entrypoint"):
        spec["entrypoint"] = cfg["Entrypoint"]
    if network and not mode.startswith("container:"):
        spec["network"] = network
    for key, arg in (("Memory", "mem_limit"), ("NanoCpus", "nano_cpus"), ("CpuShares", "cpu_shares"),
                     ("ShmSize", "shm_size")):
        if host.get(key):
            spec[arg] = host[key]
    if host.get("Tmpfs"):
        spec["tmpfs"] = dict(host["Tmpfs"])
    if host.get("Binds"):
        spec["volumes"] = list(host["Binds"])
    policy = host.get("RestartPolicy") or {}
    if policy.get("Name") and policy["Name"] != "no":
        spec["restart_policy"] = {"Name": policy["Name"], "MaximumRetryCount": policy.get("MaximumRetryCount", 0)}
    return spec


# ---------------------------------------------------------------------------------------------- restart leakers


@dataclass(frozen=True)
class Leaker:
    """A leaking container as restart-leakers reads it: its summary and memory now (0 when not running)."""

    info: ContainerInfo
    mem_usage: int = 0


@register
class RestartLeakers(Remediation[list[Leaker]]):
    """Restart the named leaking containers one at a time, each only if it has not (re)started since ``since``."""

    name = "restart-leakers"

    def __init__(self, env: Environment, containers: list[str], since: datetime,
                 wait_timeout_s: float = 30.0, stop_timeout_s: int = 10) -> None:
        self.env, self.containers = env, list(containers)
        self.since = since if since.tzinfo else since.replace(tzinfo=UTC)
        self.wait_timeout_s, self.stop_timeout_s = wait_timeout_s, stop_timeout_s

    @property
    def target(self) -> str:
        return f"{self.env.name}: {len(self.containers)} leaking container(s), alert since {self.since:%H:%M:%S}Z"

    def check(self) -> list[Leaker]:
        out = []
        with docker_client(self.env) as client:
            for ref in self.containers:
                attrs = inspect_container(client, ref)
                if attrs is None:
                    continue
                row = summarize(attrs)
                usage = 0
                if row.running:
                    try:
                        usage = memory_usage(client.api.stats(row.id, stream=False, one_shot=True))[0]
                    except docker.errors.APIError:
                        usage = 0
                out.append(Leaker(row, usage))
        return out

    def plan(self, state: list[Leaker]) -> list[Change]:
        return [
            Change(action="restart", subject=f"container {c.name}", key=f"restart:{c.id}:{c.started_at}",
                   before={"id": c.id, "service": c.service, "started_at": c.started_at.isoformat(),
                           "mem_usage": leaker.mem_usage, "memory": human_bytes(leaker.mem_usage)},
                   after={"state": "running", "started_after": self.since.isoformat()},
                   target=Change.target_of(ContainerTarget(id=c.id, name=c.name, started_at=c.started_at,
                                                           mem_usage=leaker.mem_usage)))
            for leaker in state
            if (c := leaker.info).running and c.started_at is not None and c.started_at <= self.since
        ]

    def apply(self, plan: list[Change]) -> list[Change]:
        done: list[Change] = []
        with docker_client(self.env) as client:
            for change in plan:
                planned = change.target_as(ContainerTarget)
                attrs = inspect_container(client, planned.id)
                if attrs is None:
                    continue
                now = summarize(attrs)
                if (not now.running or now.started_at is None or now.started_at != planned.started_at
                        or now.started_at > self.since):
                    continue  # guard: restarted (or stopped) by someone else since the plan
                try:
                    client.api.restart(planned.id, timeout=self.stop_timeout_s)
                except docker.errors.APIError as exc:
                    raise RemediationFailed(f"restarting {now.name}: {exc.explanation or exc}", done=done) from None

                def back(cid: str = planned.id, before: datetime | None = planned.started_at) -> bool:
                    s = summarize(inspect_container(client, cid) or {"Id": cid})
                    return bool(s.running and s.started_at and before and s.started_at > before)

                done.append(change)
                if not wait_until(back, self.wait_timeout_s):
                    # rolling: never take down the next replica while this one is not back
                    raise RemediationFailed(f"{now.name} not running again within {self.wait_timeout_s:g} s; "
                                            f"stopped the rolling restart after {len(done)} container(s)", done=done)
        return done

    def verify(self, applied: list[Change]) -> tuple[bool, str]:
        notes, ok = [], True
        with docker_client(self.env) as client:
            for change in applied:
                planned = change.target_as(ContainerTarget)
                attrs = inspect_container(client, planned.id)
                row = summarize(attrs) if attrs else None
                if row is None or not row.running or not row.started_at or row.started_at <= self.since:
                    ok = False
                    notes.append(f"{change.subject}: not running since the restart")
                    continue
                usage = memory_usage(client.api.stats(row.id, stream=False, one_shot=True))[0]
                before = planned.mem_usage
                dropped = usage < before
                ok &= dropped
                notes.append(f"{row.name}: {human_bytes(before)} -> {human_bytes(usage)}"
                             + ("" if dropped else " (did NOT drop)"))
        return ok, "; ".join(notes)


# ---------------------------------------------------------------------------------------------- start stopped


@register
class StartServiceContainers(Remediation[list[ContainerInfo]]):
    """Start a service's stopped containers; verify they run and the service's health_url answers."""

    name = "start-service-containers"

    def __init__(self, env: Environment, service: str, verify_timeout_s: float = 20.0,
                 leave: frozenset[str] = frozenset()) -> None:
        self.cfg = service_config(env, service)
        self.env, self.service, self.verify_timeout_s = env, service, verify_timeout_s
        self.leave = leave  # container ids another remediation replaces (rollback-service): never started here

    @property
    def target(self) -> str:
        return f"{self.env.name}/{self.service}"

    def check(self) -> list[ContainerInfo]:
        with docker_client(self.env) as client:
            found = client.containers.list(all=True, filters=project_filters(self.env, self.service))
            return [summarize(c.attrs) for c in found]

    def plan(self, state: list[ContainerInfo]) -> list[Change]:
        return [
            Change(action="start", subject=f"container {c.name}",
                   key=f"start:{c.id}:{c.state}:{c.finished_at}",
                   before={"id": c.id, "state": c.state, "exit_code": c.exit_code,
                           "finished_at": c.finished_at.isoformat() if c.finished_at else None},
                   after={"state": "running"},
                   target=Change.target_of(ContainerTarget(id=c.id, name=c.name)))
            for c in sorted(state, key=lambda c: c.name)
            if not c.running and c.state in STOPPED_STATES and c.id not in self.leave
        ]

    def apply(self, plan: list[Change]) -> list[Change]:
        done: list[Change] = []
        with docker_client(self.env) as client:
            for change in plan:
                attrs = inspect_container(client, change.target_as(ContainerTarget).id)
                if attrs is None:
                    continue
                now = summarize(attrs)
                if now.running or now.state not in STOPPED_STATES:
                    continue  # guard: started (or removed) since the plan
                try:
                    client.api.start(now.id)
                except docker.errors.APIError as exc:
                    raise RemediationFailed(f"starting {now.name}: {exc.explanation or exc}", done=done) from None
                done.append(change)
        return done

    def verify(self, applied: list[Change]) -> tuple[bool, str]:
        ids = [c.target_as(ContainerTarget).id for c in applied]

        def running() -> bool:
            with docker_client(self.env) as client:
                return all(summarize(inspect_container(client, i) or {"Id": i}).running for i in ids)

        if not wait_until(running, self.verify_timeout_s):
            names = ", ".join(c.subject for c in applied)
            return False, f"not all of {names} running after {self.verify_timeout_s:g} s"
        detail = f"{len(applied)} container(s) of {self.service} running"
        url = service_health_url(self.env, self.service)
        if url:
            if not wait_until(lambda: answers_2xx(url), self.verify_timeout_s, 0.3):
                return False, f"{detail}, but {url} does not answer 2xx after {self.verify_timeout_s:g} s"
            detail += f"; {url} answers"
        return True, detail


def service_health_url(env: Environment, service: str) -> str | None:
    """Where a service says it is healthy: ``services.<service>.health_url``, else ``http_checks.<service>-health``."""
    check = env.http_checks.get(f"{service}-health")
    return service_config(env, service).health_url or (check.url if check else None)


def answers_2xx(url: str) -> bool:
    """One GET with its own 2 s timeout: does the health endpoint answer 2xx?"""
    try:
        return httpx.get(url, timeout=2.0, trust_env=False).is_success
    except httpx.HTTPError:
        return False
