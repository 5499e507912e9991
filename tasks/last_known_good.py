"""Last known good: what a service's replicas ran (image and container configuration) when a procedure saw it
healthy, so that rollback-service can put exactly that back after a bad deployment.

Where it is kept: a Prefect **Secret block** per environment and service (``runbook-lkg-<env>-<service>-<hash>``),
in the Prefect server's database, so it survives restarts of the engine and of the server, and every executor on
every host reads the same record. Not a Prefect Variable: a Variable's value is capped at 5,000 characters (a few
replicas with their environment exceed that) and is shown in plain text in the UI, while a container's environment
holds the application's secrets (database passwords, API keys). A Secret block has no such cap, is stored encrypted
by the server and obfuscated in the UI. Not a file of the engine's own: that would be one host's memory, and a
second executor (or a rebuilt host) would roll back to nothing. The record's environment values never reach a
report, a plan or a log: plans show the image and the container names only.

Recorded only from a state seen healthy (every replica running, none restarting or reported unhealthy by the
engine, all on one image, up for a while, and the service's health endpoint answering 2xx); an unhealthy state is
never recorded, so a rollback can never go "back" to a broken deployment.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import docker.errors
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import BlockDocumentUpdate
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, Field

from runbook.engine.clients import docker_client
from runbook.engine.config import Environment
from runbook.engine.errors import TargetUnreachable
from runbook.engine.steps import step
from tasks.containers import NUMBER_LABEL, ContainerInfo, project_filters

BLOCK_PREFIX = "runbook-lkg"
SECRET = "secret"  # the Secret block type's slug
# variables the engine sets per container (recreating them is the engine's job, not ours)
_ENGINE_SET_ENV = ("HOSTNAME=",)


class ReplicaSpec(BaseModel, frozen=True):
    """What recreating one replica needs, read from `docker inspect`: image, command, environment, labels, ports,
    mounts, network, healthcheck, restart policy and limits."""

    name: str
    number: str = ""
    image: str = Field(description="the reference it was created from, e.g. registry/app:1.4")
    image_id: str
    command: list[str] | None = None
    entrypoint: list[str] | None = None
    env: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    ports: dict[str, list[dict[str, str]]] = Field(default_factory=dict, description="HostConfig.PortBindings")
    binds: list[str] = Field(default_factory=list)
    mounts: list[dict[str, Any]] = Field(default_factory=list, description="named volumes (HostConfig.Mounts)")
    tmpfs: dict[str, str] = Field(default_factory=dict)
    network: str | None = None
    healthcheck: dict[str, Any] | None = None
    restart_policy: dict[str, Any] | None = None
    working_dir: str | None = None
    user: str | None = None
    limits: dict[str, int] = Field(default_factory=dict, description="mem_limit, nano_cpus, cpu_shares, shm_size")


class LastKnownGood(BaseModel, frozen=True):
    """A service's replicas as last seen healthy, and when."""

    env: str
    service: str
    image: str
    image_id: str
    recorded_at: datetime
    replicas: list[ReplicaSpec]

    def spec_for(self, number: str) -> ReplicaSpec:
        """The recorded replica with this compose number, else the first (a replica added since by a scale)."""
        return next((r for r in self.replicas if r.number == number), self.replicas[0])


def replica_spec(attrs: dict[str, Any]) -> ReplicaSpec:
    """A container's inspect document as the configuration that recreates it."""
    cfg, host = attrs.get("Config") or {}, attrs.get("HostConfig") or {}
    networks = list((attrs.get("NetworkSettings") or {}).get("Networks") or {})
    mode = host.get("NetworkMode") or ""
    network = networks[0] if networks else (mode if mode and mode not in {"default", "bridge"} else None)
    limits = {arg: int(host[key]) for key, arg in (("Memory", "mem_limit"), ("NanoCpus", "nano_cpus"),
                                                   ("CpuShares", "cpu_shares"), ("ShmSize", "shm_size"))
              if host.get(key)}
    policy = host.get("RestartPolicy") or {}
    labels = cfg.get("Labels") or {}
    return ReplicaSpec(
        name=(attrs.get("Name") or "").lstrip("/"), number=labels.get(NUMBER_LABEL, ""),
        image=cfg.get("Image") or attrs.get("Image", ""), image_id=attrs.get("Image", ""),
        command=cfg.get("Cmd") or None, entrypoint=cfg.get("Entrypoint") or None,
        env=[e for e in cfg.get("Env") or [] if not e.startswith(_ENGINE_SET_ENV)], labels=dict(labels),
        ports={k: [dict(b) for b in v or []] for k, v in (host.get("PortBindings") or {}).items()},
        binds=list(host.get("Binds") or []), mounts=[dict(m) for m in host.get("Mounts") or []],
        tmpfs=dict(host.get("Tmpfs") or {}), network=network if not mode.startswith("container:") else None,
        healthcheck=cfg.get("Healthcheck") or None,
        restart_policy=({"Name": policy["Name"], "MaximumRetryCount": policy.get("MaximumRetryCount", 0)}
                        if policy.get("Name") and policy["Name"] != "no" else None),
        working_dir=cfg.get("WorkingDir") or None, user=cfg.get("User") or None, limits=limits,
    )


def create_kwargs(spec: ReplicaSpec, image: str) -> dict[str, Any]:
    """docker-py ``containers.create`` arguments recreating ``spec`` (same name, labels, ports ...) from ``image``."""
    kwargs: dict[str, Any] = {
        "image": image, "command": spec.command, "name": spec.name, "labels": dict(spec.labels),
        "environment": list(spec.env), "detach": True, "working_dir": spec.working_dir, "user": spec.user,
        **spec.limits,
    }
    if spec.entrypoint:
        kwargs["entrypoint"] = spec.entrypoint
    if spec.network:
        kwargs["network"] = spec.network
    if spec.ports:  # PortBindings as docker-py's ports= takes them: {"8000/tcp": [("127.0.0.1", 39135)]}
        kwargs["ports"] = {port: [(b.get("HostIp") or "", int(b["HostPort"])) if b.get("HostPort") else None
                                  for b in binds] or None for port, binds in spec.ports.items()}
    if spec.binds:
        kwargs["volumes"] = list(spec.binds)
    if spec.mounts:
        kwargs["mounts"] = [docker.types.Mount(target=m.get("Target", ""), source=m.get("Source") or None,
                                               type=(m.get("Type") or "volume").lower(),
                                               read_only=bool(m.get("ReadOnly"))) for m in spec.mounts]
    if spec.tmpfs:
        kwargs["tmpfs"] = dict(spec.tmpfs)
    if spec.healthcheck:
        kwargs["healthcheck"] = dict(spec.healthcheck)
    if spec.restart_policy:
        kwargs["restart_policy"] = dict(spec.restart_policy)
    return kwargs


# ------------------------------------------------------------------ the store


def block_name(env: str, service: str) -> str:
    """Secret block names take lowercase letters, digits and dashes; a hash keeps ``a_b``/``a-b`` apart."""
    digest = hashlib.sha256(f"{env}\0{service}".encode()).hexdigest()[:10]
    return f"{BLOCK_PREFIX}-{env}-{service}".replace("_", "-")[:80] + f"-{digest}"


def load_last_known_good(env: str, service: str) -> LastKnownGood | None:
    """The record for ``env``/``service``, or None when none was ever recorded."""
    with get_client(sync_client=True) as client:
        try:
            doc = client.read_block_document_by_name(block_name(env, service), SECRET, include_secrets=True)
        except ObjectNotFound:
            return None
    return LastKnownGood.model_validate(doc.data["value"])


def save_last_known_good(record: LastKnownGood) -> None:
    """Write the record: an update of the block document when it exists (two API calls; ``Block.save`` would
    register the block type and schema again each time, ~1.5 s here), else a new Secret block."""
    value: Any = record.model_dump(mode="json")  # Secret keeps any JSON; its annotation names str and secrets
    name = block_name(record.env, record.service)
    with get_client(sync_client=True) as client:
        try:
            doc = client.read_block_document_by_name(name, SECRET, include_secrets=False)
        except ObjectNotFound:
            doc = None
        if doc is not None:
            client.update_block_document(doc.id, BlockDocumentUpdate(data={"value": value},
                                                                     merge_existing_data=False))
            return
    Secret(value=value).save(name, overwrite=True)


def forget_last_known_good(env: str, service: str) -> bool:
    """Delete the record (an operator's decision, and tests); False when there was none."""
    with get_client(sync_client=True) as client:
        try:
            doc = client.read_block_document_by_name(block_name(env, service), SECRET, include_secrets=False)
        except ObjectNotFound:
            return False
        client.delete_block_document(doc.id)
    return True


# ------------------------------------------------------------------ recording


def healthy_reason(mine: list[ContainerInfo], health_ok: bool | None, min_uptime_s: float,
                   now: datetime | None = None) -> str:
    """'' when ``mine`` (one service's replicas) is a state to record as known good, else why not."""
    now = now or datetime.now(UTC)
    if not mine:
        return "no replica exists"
    if health_ok is False:
        return "its health endpoint fails"
    bad = [c.name for c in mine if not c.running or c.state == "restarting" or c.health == "unhealthy"]
    if bad:
        return f"not running or unhealthy: {', '.join(bad)}"
    if len({c.image_id for c in mine}) != 1:
        return "its replicas run different images (a rollout in progress?)"
    young = [c.name for c in mine if c.started_at is None or now - c.started_at < timedelta(seconds=min_uptime_s)]
    if young:
        return f"up for less than {min_uptime_s:g} s: {', '.join(young)}"
    return ""


@step
def record_last_known_good(env: Environment, service: str, seen: list[ContainerInfo], health_ok: bool | None,
                           min_uptime_s: float = 30.0) -> tuple[LastKnownGood | None, str]:
    """Record ``service``'s replicas as last known good if ``seen`` (the flow's reading) was healthy and the
    containers are still exactly those (same ids, same images): (the record or None, what happened)."""
    reason = healthy_reason(seen, health_ok, min_uptime_s)
    if reason:
        return None, f"last known good of {service} not recorded: {reason}"
    with docker_client(env) as client:
        try:
            found = [c.attrs for c in client.containers.list(all=True, filters=project_filters(env, service))]
        except docker.errors.APIError as exc:
            raise TargetUnreachable(f"docker API of {env.name}", str(exc.explanation or exc)) from None
    now = {(a["Id"], a.get("Image")) for a in found if (a.get("State") or {}).get("Running")}
    if now != {(c.id, c.image_id) for c in seen}:
        return None, f"last known good of {service} not recorded: its containers changed while it was checked"
    replicas = sorted((replica_spec(a) for a in found), key=lambda r: (r.number, r.name))
    first = replicas[0]
    record = LastKnownGood(env=env.name, service=service, image=first.image, image_id=first.image_id,
                           recorded_at=datetime.now(UTC), replicas=replicas)
    save_last_known_good(record)
    return record, (f"last known good of {service} recorded: {record.image} ({short_id(record.image_id)}), "
                    f"{len(replicas)} replica(s)")


@step
def image_exists(env: Environment, image_id: str) -> bool:
    """Is the image still on the Docker host (a prune may have removed the last known good one)?"""
    with docker_client(env) as client:
        try:
            client.api.inspect_image(image_id)
        except docker.errors.NotFound:
            return False
    return True


def short_id(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:12]
