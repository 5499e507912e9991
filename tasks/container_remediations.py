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

from datetime import UTC, datetime
from typing import Any

import docker.errors
import httpx

from runbook.engine.clients import docker_client
from runbook.engine.config import Environment
from runbook.engine.errors import BadInput, RemediationFailed, TargetUnreachable
from runbook.engine.findings import Change
from runbook.engine.remediation import Remediation, register, wait_until
from tasks.containers import NUMBER_LABEL, human_bytes, memory_usage, parse_time, project_filters, summarize

STOPPED_STATES = {"exited", "created", "stopped", "configured"}



def _service_config(env: Environment, service: str) -> Any:
    try:
        return env.services[service]
    except KeyError:
        known = ", ".join(sorted(env.services)) or "none"
        raise BadInput(f"service {service!r} is not in environments.{env.name}.services (known: {known})") from None


def _inspect(client: Any, ref: str) -> dict[str, Any] | None:
    try:
        return client.api.inspect_container(ref)
    except docker.errors.NotFound:
        return None


# ---------------------------------------------------------------------------------------------- scale


@register
class ScaleService(Remediation[dict[str, Any]]):
    """Create replicas of a compose service through the API until ``replicas`` run (never above max_replicas)."""

    name = "scale-service"

    def __init__(self, env: Environment, service: str, replicas: int, verify_timeout_s: float = 20.0) -> None:
        cfg = _service_config(env, service)
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

    def _read(self, client: Any) -> dict[str, Any]:
        found = client.containers.list(all=True, filters=project_filters(self.env, self.service))
        attrs = [c.attrs for c in found]
        running = [a for a in attrs if (a.get("State") or {}).get("Running")]
        pool = running or attrs
        template = max(pool, key=lambda a: a.get("Created") or "") if pool else None
        numbers = [int(n) for a in attrs if str(n := ((a.get("Config") or {}).get("Labels") or {})
                                                .get(NUMBER_LABEL, "")).isdigit()]
        return {"running": [summarize(a) for a in running], "all": [summarize(a) for a in attrs],
                "template": template, "next_number": max(numbers, default=len(attrs)) + 1}

    def check(self) -> dict[str, Any]:
        with docker_client(self.env) as client:
            return self._read(client)

    def plan(self, state: dict[str, Any]) -> list[Change]:
        have = len(state["running"])
        if have >= self.replicas:
            return []
        template = state["template"]
        if template is None:
            raise TargetUnreachable(f"service {self.service}", "no container of it exists to copy the configuration")
        project = self.env.docker.compose_project if self.env.docker else ""
        src = summarize(template)
        changes = []
        for i in range(self.replicas - have):
            number = state["next_number"] + i
            changes.append(Change(
                action="create", subject=f"container {project}-{self.service}-{number}",
                key=f"create:{project}-{self.service}-{number}:running=" + ",".join(sorted(
                    c["id"] for c in state["running"])),
                before={"service": self.service, "running_replicas": have, "copy_of": src["name"]},
                after={"image": src["image"], "number": number, "state": "running", "replicas": self.replicas},
            ))
        return changes

    def apply(self, plan: list[Change]) -> list[Change]:
        done: list[Change] = []
        with docker_client(self.env) as client:
            state = self._read(client)
            missing = self.replicas - len(state["running"])  # guard: count again, someone may have scaled meanwhile
            template = state["template"]
            if template is None:
                raise RemediationFailed(f"no container of {self.service} left to copy")
            for change in plan:
                if missing <= 0:
                    break
                name = change.subject.removeprefix("container ")
                if _inspect(client, name) is not None:
                    continue  # a container of that name already exists: never create a second one
                try:
                    client.containers.run(**_replica_spec(template, name, int(change.after["number"])))
                except docker.errors.APIError as exc:
                    raise RemediationFailed(f"creating {name}: {exc.explanation or exc}", done=done) from None
                done.append(change)
                missing -= 1
        return done

    def verify(self, applied: list[Change]) -> tuple[bool, str]:
        names = [c.subject.removeprefix("container ") for c in applied]
        last: dict[str, Any] = {}

        def converged() -> bool:
            with docker_client(self.env) as client:
                states = {n: ((_inspect(client, n) or {}).get("State") or {}) for n in names}
                last.update(self._read(client))
            return all(s.get("Running") for s in states.values()) and len(last["running"]) >= self.replicas

        ok = wait_until(converged, self.verify_timeout_s)
        running = len(last.get("running", []))
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


@register
class RestartLeakers(Remediation[list[dict[str, Any]]]):
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

    def check(self) -> list[dict[str, Any]]:
        out = []
        with docker_client(self.env) as client:
            for ref in self.containers:
                attrs = _inspect(client, ref)
                if attrs is None:
                    continue
                row = summarize(attrs)
                if row["running"]:
                    try:
                        row["mem_usage"] = memory_usage(client.api.stats(row["id"], stream=False, one_shot=True))[0]
                    except docker.errors.APIError:
                        row["mem_usage"] = 0
                out.append(row)
        return out

    def plan(self, state: list[dict[str, Any]]) -> list[Change]:
        return [
            Change(action="restart", subject=f"container {c['name']}", key=f"restart:{c['id']}:{c['started_at']}",
                   before={"id": c["id"], "service": c["service"], "started_at": c["started_at"].isoformat(),
                           "mem_usage": c.get("mem_usage", 0), "memory": human_bytes(c.get("mem_usage", 0))},
                   after={"state": "running", "started_after": self.since.isoformat()})
            for c in state
            if c["running"] and c["started_at"] is not None and c["started_at"] <= self.since
        ]

    def apply(self, plan: list[Change]) -> list[Change]:
        done: list[Change] = []
        with docker_client(self.env) as client:
            for change in plan:
                cid = change.before["id"]
                attrs = _inspect(client, cid)
                if attrs is None:
                    continue
                now = summarize(attrs)
                planned_start = parse_time(change.before["started_at"])
                if not now["running"] or now["started_at"] != planned_start or now["started_at"] > self.since:
                    continue  # guard: restarted (or stopped) by someone else since the plan
                try:
                    client.api.restart(cid, timeout=self.stop_timeout_s)
                except docker.errors.APIError as exc:
                    raise RemediationFailed(f"restarting {now['name']}: {exc.explanation or exc}", done=done) from None

                def back(cid: str = cid, before: datetime | None = planned_start) -> bool:
                    s = summarize(_inspect(client, cid) or {"Id": cid})
                    return bool(s["running"] and s["started_at"] and before and s["started_at"] > before)

                done.append(change)
                if not wait_until(back, self.wait_timeout_s):
                    # rolling: never take down the next replica while this one is not back
                    raise RemediationFailed(f"{now['name']} not running again within {self.wait_timeout_s:g} s; "
                                            f"stopped the rolling restart after {len(done)} container(s)", done=done)
        return done

    def verify(self, applied: list[Change]) -> tuple[bool, str]:
        notes, ok = [], True
        with docker_client(self.env) as client:
            for change in applied:
                attrs = _inspect(client, change.before["id"])
                row = summarize(attrs) if attrs else None
                if row is None or not row["running"] or not row["started_at"] or row["started_at"] <= self.since:
                    ok = False
                    notes.append(f"{change.subject}: not running since the restart")
                    continue
                usage = memory_usage(client.api.stats(row["id"], stream=False, one_shot=True))[0]
                before = int(change.before.get("mem_usage") or 0)
                dropped = usage < before
                ok &= dropped
                notes.append(f"{row['name']}: {human_bytes(before)} -> {human_bytes(usage)}"
                             + ("" if dropped else " (did NOT drop)"))
        return ok, "; ".join(notes)


# ---------------------------------------------------------------------------------------------- start stopped


@register
class StartServiceContainers(Remediation[list[dict[str, Any]]]):
    """Start a service's stopped containers; verify they run and the service's health_url answers."""

    name = "start-service-containers"

    def __init__(self, env: Environment, service: str, verify_timeout_s: float = 20.0) -> None:
        self.cfg = _service_config(env, service)
        self.env, self.service, self.verify_timeout_s = env, service, verify_timeout_s

    @property
    def target(self) -> str:
        return f"{self.env.name}/{self.service}"

    def check(self) -> list[dict[str, Any]]:
        with docker_client(self.env) as client:
            found = client.containers.list(all=True, filters=project_filters(self.env, self.service))
            return [summarize(c.attrs) for c in found]

    def plan(self, state: list[dict[str, Any]]) -> list[Change]:
        return [
            Change(action="start", subject=f"container {c['name']}",
                   key=f"start:{c['id']}:{c['state']}:{c['finished_at']}",
                   before={"id": c["id"], "state": c["state"], "exit_code": c["exit_code"],
                           "finished_at": c["finished_at"].isoformat() if c["finished_at"] else None},
                   after={"state": "running"})
            for c in sorted(state, key=lambda c: c["name"])
            if not c["running"] and c["state"] in STOPPED_STATES
        ]

    def apply(self, plan: list[Change]) -> list[Change]:
        done: list[Change] = []
        with docker_client(self.env) as client:
            for change in plan:
                attrs = _inspect(client, change.before["id"])
                if attrs is None:
                    continue
                now = summarize(attrs)
                if now["running"] or now["state"] not in STOPPED_STATES:
                    continue  # guard: started (or removed) since the plan
                try:
                    client.api.start(now["id"])
                except docker.errors.APIError as exc:
                    raise RemediationFailed(f"starting {now['name']}: {exc.explanation or exc}", done=done) from None
                done.append(change)
        return done

    def verify(self, applied: list[Change]) -> tuple[bool, str]:
        ids = [c.before["id"] for c in applied]

        def running() -> bool:
            with docker_client(self.env) as client:
                return all(summarize(_inspect(client, i) or {"Id": i})["running"] for i in ids)

        if not wait_until(running, self.verify_timeout_s):
            names = ", ".join(c.subject for c in applied)
            return False, f"not all of {names} running after {self.verify_timeout_s:g} s"
        detail = f"{len(applied)} container(s) of {self.service} running"
        check = self.env.http_checks.get(f"{self.service}-health")
        url = self.cfg.health_url or (check.url if check else None)
        if url:
            if not wait_until(lambda: _healthy(url), self.verify_timeout_s, 0.3):
                return False, f"{detail}, but {url} does not answer 2xx after {self.verify_timeout_s:g} s"
            detail += f"; {url} answers"
        return True, detail


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0, trust_env=False).is_success
    except httpx.HTTPError:
        return False
