"""rollback-service: recreate a service's replicas from its last known good image after a bad deployment.

Planned only when all of these hold, each re-read at plan time (so a second apply, or a state that moved on, plans
nothing): a last known good is recorded for the service (tasks.last_known_good); the service is down, crash-looping
or unhealthy (a replica not running, restarting or reported unhealthy, or the health endpoint failing); and a
replica runs another image than the last known good one, created (or its image built) within ``deploy_hours``.
The target is always exactly the recorded image, by id: never an older one, and never whatever its tag points to
now (a retagged ``:latest`` is not the image that was seen healthy).

Apply, one replica at a time: stop it, rename it aside, create the replica again under its own name from the last
known good image with the recorded configuration (command, environment, labels, ports, mounts, network,
healthcheck, restart policy, limits), start it, and wait until it runs and the service's health endpoint answers;
the replaced container is then removed. A replica that does not come back stops the rollback there (the next
replica is left as it is) and the error says so. If creating the new container fails, the old one is put back as
it was. Verify: every rolled-back replica runs the last known good image and the health endpoint answers 2xx.

Podman: a container's HEALTHCHECK only runs where systemd timers drive it (not on these machines), so an engine
health status of "starting" is not waited for; "unhealthy" counts as not healthy on both engines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import docker.errors
from pydantic import BaseModel

from runbook.engine.clients import docker_client
from runbook.engine.config import Environment
from runbook.engine.errors import RemediationFailed, TargetUnreachable
from runbook.engine.findings import Change
from runbook.engine.polling import wait_until
from runbook.engine.remediation import Remediation, register
from tasks.container_remediations import answers_2xx, inspect_container, service_config, service_health_url
from tasks.containers import NUMBER_LABEL, ContainerInfo, parse_time, project_filters, summarize
from tasks.last_known_good import LastKnownGood, create_kwargs, load_last_known_good, short_id

ASIDE_SUFFIX = "-before-rollback"


class RollbackTarget(BaseModel, frozen=True):
    """One replica to recreate: the container as planned (id, image) and the image it goes back to."""

    id: str
    name: str
    number: str
    from_image: str
    from_image_id: str
    to_image: str
    to_image_id: str


@dataclass(frozen=True)
class RollbackState:
    """What rollback-service reads: the record, the service's replicas, when their images were built, whether the
    record's image is still on the host (and under which reference), and the health endpoint's answer."""

    lkg: LastKnownGood | None
    replicas: list[ContainerInfo] = field(default_factory=list)
    built: dict[str, datetime | None] = field(default_factory=dict)
    lkg_image_present: bool = False
    create_ref: str = ""
    health_url: str | None = None
    health_ok: bool | None = None


def unhealthy_replicas(replicas: list[ContainerInfo]) -> list[ContainerInfo]:
    """Down, crash-looping (restarting) or reported unhealthy by the engine."""
    return [c for c in replicas if not c.running or c.state == "restarting" or c.health == "unhealthy"]


def recently_deployed(c: ContainerInfo, built: datetime | None, hours: float, now: datetime) -> bool:
    cutoff = now - timedelta(hours=hours)
    return bool((c.created and c.created >= cutoff) or (built and built >= cutoff))


@register
class RollbackService(Remediation[RollbackState]):
    """Recreate a service's replicas that run a recently deployed image from the last known good, one at a time."""

    name = "rollback-service"

    def __init__(self, env: Environment, service: str, deploy_hours: float = 24, wait_timeout_s: float = 30.0,
                 stop_timeout_s: int = 10) -> None:
        service_config(env, service)  # BadInput for a service the playbook does not know
        self.env, self.service, self.deploy_hours = env, service, deploy_hours
        self.wait_timeout_s, self.stop_timeout_s = wait_timeout_s, stop_timeout_s

    @property
    def target(self) -> str:
        return f"{self.env.name}/{self.service}"

    def check(self) -> RollbackState:
        lkg = load_last_known_good(self.env.name, self.service)
        url = service_health_url(self.env, self.service)
        with docker_client(self.env) as client:
            found = client.containers.list(all=True, filters=project_filters(self.env, self.service))
            replicas = sorted((summarize(c.attrs) for c in found), key=lambda c: c.name)
            built = {i: _image_created(client, i) for i in {c.image_id for c in replicas if c.image_id}}
            present, ref = (_resolve(client, lkg) if lkg else (False, ""))
        return RollbackState(lkg, replicas, built, present, ref, url, answers_2xx(url) if url else None)

    def plan(self, state: RollbackState) -> list[Change]:
        lkg = state.lkg
        if lkg is None:
            return []  # the flow says so as a finding: nothing to roll back to
        unhealthy = state.health_ok is False or bool(unhealthy_replicas(state.replicas))
        now = datetime.now(UTC)
        todo = [c for c in state.replicas if c.image_id != lkg.image_id
                and recently_deployed(c, state.built.get(c.image_id), self.deploy_hours, now)]
        if not unhealthy or not todo:
            return []
        if not state.lkg_image_present:
            raise TargetUnreachable(f"image {lkg.image} ({short_id(lkg.image_id)})",
                                    "the last known good image is no longer on the host: nothing to roll back to")
        changes = []
        for c in todo:
            target = RollbackTarget(id=c.id, name=c.name, number=c.number, from_image=c.image,
                                    from_image_id=c.image_id, to_image=state.create_ref, to_image_id=lkg.image_id)
            changes.append(Change(
                action="roll back",
                subject=(f"container {c.name} from {c.image} ({short_id(c.image_id)}) "
                         f"to {lkg.image} ({short_id(lkg.image_id)})"),
                key=f"rollback:{c.id}:{c.image_id}->{lkg.image_id}",
                before={"container": c.name, "image": c.image, "image_id": short_id(c.image_id), "state": c.state,
                        "created": c.created.isoformat() if c.created else None,
                        "health": "fails" if state.health_ok is False else (c.health or "-")},
                after={"image": lkg.image, "image_id": short_id(lkg.image_id), "state": "running, healthy",
                       "last_known_good_at": lkg.recorded_at.isoformat()},
                target=Change.target_of(target),
            ))
        return changes

    def apply(self, plan: list[Change]) -> list[Change]:
        done: list[Change] = []
        lkg = load_last_known_good(self.env.name, self.service)
        with docker_client(self.env) as client:
            for change in plan:
                t = change.target_as(RollbackTarget)
                attrs = inspect_container(client, t.id)
                if attrs is None or attrs.get("Image") != t.from_image_id:
                    continue  # guard: removed or replaced since the plan
                if lkg is None or lkg.image_id != t.to_image_id:
                    continue  # guard: the last known good moved on since the plan; that plan is stale
                try:
                    self._recreate(client, attrs, t, lkg)
                except docker.errors.APIError as exc:
                    raise RemediationFailed(f"rolling back {t.name}: {exc.explanation or exc}", done=done) from None
                done.append(change)

                def back(name: str = t.name, image_id: str = t.to_image_id) -> bool:
                    return self._back(client, name, image_id)

                if not wait_until(back, self.wait_timeout_s, 0.3):
                    raise RemediationFailed(
                        f"{t.name} did not come back healthy on {t.to_image} within {self.wait_timeout_s:g} s; "
                        f"stopped the rollback after {len(done)} of {len(plan)} replica(s)", done=done)
                _remove(client, f"{t.name}{ASIDE_SUFFIX}")
        return done

    def _recreate(self, client: Any, attrs: dict[str, Any], t: RollbackTarget, lkg: LastKnownGood) -> None:
        """Stop and rename the old replica aside, create and start its replacement; put the old one back on failure."""
        recorded = next((r for r in lkg.replicas if r.number == t.number), None)
        spec = (recorded or lkg.replicas[0]).model_copy(update={
            "name": t.name, "labels": {**(recorded or lkg.replicas[0]).labels, NUMBER_LABEL: t.number},
            # a host port is bound once: a replica that was not recorded gets none (as scale-service does)
            "ports": recorded.ports if recorded else {}})
        was_running = bool((attrs.get("State") or {}).get("Running"))
        aside = f"{t.name}{ASIDE_SUFFIX}"
        _remove(client, aside)  # a leftover of an interrupted rollback
        client.api.stop(t.id, timeout=self.stop_timeout_s)
        client.api.rename(t.id, aside)
        try:
            new = client.containers.create(**create_kwargs(spec, t.to_image))
            new.start()
        except docker.errors.APIError:
            _remove(client, t.name)
            client.api.rename(t.id, t.name)
            if was_running:
                client.api.start(t.id)
            raise

    def _back(self, client: Any, name: str, image_id: str) -> bool:
        attrs = inspect_container(client, name)
        if attrs is None or attrs.get("Image") != image_id:
            return False
        row = summarize(attrs)
        if not row.running or row.health == "unhealthy":
            return False
        url = service_health_url(self.env, self.service)
        return answers_2xx(url) if url else True

    def verify(self, applied: list[Change]) -> tuple[bool, str]:
        targets = [c.target_as(RollbackTarget) for c in applied]
        notes: list[str] = []

        def healthy() -> bool:
            notes.clear()
            good = True
            with docker_client(self.env) as client:
                for t in targets:
                    row = summarize(inspect_container(client, t.name) or {"Id": t.name})
                    ok = row.running and row.image_id == t.to_image_id and row.health != "unhealthy"
                    good &= ok
                    notes.append(f"{t.name} {'runs' if ok else 'does NOT run'} {t.to_image} "
                                 f"({short_id(t.to_image_id)})")
            url = service_health_url(self.env, self.service)
            if url:
                up = answers_2xx(url)
                good &= up
                notes.append(f"{url} {'answers' if up else 'does NOT answer'} 2xx")
            return good

        ok = wait_until(healthy, self.wait_timeout_s, 0.3)
        return ok, "; ".join(notes)


def _image_created(client: Any, image_id: str) -> datetime | None:
    try:
        return parse_time(client.api.inspect_image(image_id).get("Created"))
    except docker.errors.NotFound:
        return None


def _resolve(client: Any, lkg: LastKnownGood) -> tuple[bool, str]:
    """Is the recorded image still here, and which reference creates it: its tag while the tag still names that
    image (readable in `docker ps`), else its id."""
    try:
        client.api.inspect_image(lkg.image_id)
    except docker.errors.NotFound:
        return False, ""
    try:
        tagged = client.api.inspect_image(lkg.image).get("Id")
    except docker.errors.NotFound:
        tagged = None
    return True, lkg.image if tagged == lkg.image_id else lkg.image_id


def _remove(client: Any, name: str) -> None:
    try:
        client.api.remove_container(name, force=True)
    except docker.errors.NotFound:
        pass
