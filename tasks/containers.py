"""Container diagnostics through the Docker API, correct on Docker Engine and on Podman's compatible service.

The runbook's `docker stats --no-stream`, `top -p $(docker inspect ...)`, `docker-compose logs backend | grep ERROR`
and `docker-compose ps`, for the containers of the playbook's compose project (found by the labels docker-compose
sets). Every call goes through ``runbook.engine.clients.docker_client`` (its timeout, its error mapping).

CPU %: Podman's one-shot stats have an empty ``precpu_stats`` and a ``system_cpu_usage`` that advances with wall
time rather than with host CPU time, so the docker CLI formula is wrong there (a one-core burner reads ~200 % on two
cores). Both engines stamp each sample with ``read``: the container's CPU nanoseconds between two samples divided by
the nanoseconds between their ``read`` stamps is the same figure `docker stats` shows (100 % = one core), on both.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import docker.errors

from runbook.engine.clients import docker_client
from runbook.engine.config import Environment
from runbook.engine.progress import say
from runbook.engine.steps import step

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"
MAX_PARALLEL = 16
_ERROR_LINE = re.compile(r"\bERROR\b")


def project_filters(env: Environment, service: str | None = None) -> dict[str, list[str]]:
    """Label filters selecting the compose project's containers (optionally one service's)."""
    assert env.docker is not None
    labels = [f"{PROJECT_LABEL}={env.docker.compose_project}"]
    if service:
        labels.append(f"{SERVICE_LABEL}={service}")
    return {"label": labels}


def parse_time(value: str | None) -> datetime | None:
    """Docker/Podman timestamps (RFC 3339 with nanoseconds); None for the zero time of a never-started container."""
    if not value or value.startswith("0001-01-01"):
        return None
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$", value.strip())
    if not m:
        return None
    frac = (m.group(2) or ".0")[:7]
    tz = m.group(3) or "Z"
    return datetime.fromisoformat(m.group(1) + frac + ("+00:00" if tz == "Z" else tz)).astimezone(UTC)


@dataclass(frozen=True)
class ContainerInfo:
    """The fields a person scans from `docker inspect` (times in UTC, None when never set)."""

    id: str
    name: str
    service: str = ""
    number: str = ""
    state: str = "unknown"
    running: bool = False
    exit_code: int | None = None
    oom_killed: bool = False
    restart_count: int = 0
    image: str = ""
    image_id: str = ""
    created: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    health: str = ""


def summarize(attrs: dict[str, Any]) -> ContainerInfo:
    """The fields a person scans from `docker inspect`: state, restarts, image, times, compose labels."""
    state = attrs.get("State") or {}
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    return ContainerInfo(
        id=attrs["Id"],
        name=attrs.get("Name", "").lstrip("/"),  # Docker prefixes '/', Podman does not
        service=labels.get(SERVICE_LABEL, ""),
        number=labels.get(NUMBER_LABEL, ""),
        state=state.get("Status", "unknown"),
        running=bool(state.get("Running")),
        exit_code=state.get("ExitCode"),
        oom_killed=bool(state.get("OOMKilled")),
        restart_count=int(attrs.get("RestartCount") or 0),
        image=(attrs.get("Config") or {}).get("Image", ""),
        image_id=attrs.get("Image", ""),
        created=parse_time(attrs.get("Created")),
        started_at=parse_time(state.get("StartedAt")),
        finished_at=parse_time(state.get("FinishedAt")),
        health=((state.get("Health") or {}).get("Status")) or "",
    )


@step
def list_project_containers(env: Environment, service: str | None = None) -> list[ContainerInfo]:
    """Every container of the compose project (running or not), summarized, ordered by service and name."""
    with docker_client(env) as client:
        found = client.containers.list(all=True, filters=project_filters(env, service))
        return sorted((summarize(c.attrs) for c in found), key=lambda c: (c.service, c.name))


def _stats_once(client: Any, container_id: str) -> dict[str, Any] | None:
    try:
        stats: dict[str, Any] = client.api.stats(container_id, stream=False, one_shot=True)
        return stats
    except docker.errors.NotFound:
        return None  # removed between listing and sampling
    except docker.errors.APIError as exc:
        if exc.status_code in (409, 500):  # stopped meanwhile (Podman answers 500/409 for a container not running)
            return None
        raise


def memory_usage(stats: dict[str, Any]) -> tuple[int, int]:
    """Usage as `docker stats` shows it (page cache that can be dropped is not counted) and the limit."""
    mem = stats.get("memory_stats") or {}
    usage = int(mem.get("usage") or 0)
    details = mem.get("stats") or {}
    usage -= int(details.get("inactive_file", details.get("total_inactive_file", 0)) or 0)
    return max(usage, 0), int(mem.get("limit") or 0)


def cpu_percent(first: dict[str, Any], second: dict[str, Any], wall_s: float) -> float:
    """CPU % of one core between two samples: delta CPU ns over delta ``read`` ns (wall_s when stamps are missing)."""
    used = (int(second["cpu_stats"]["cpu_usage"]["total_usage"])
            - int(first["cpu_stats"]["cpu_usage"]["total_usage"]))
    t1, t2 = parse_time(first.get("read")), parse_time(second.get("read"))
    elapsed = (t2 - t1).total_seconds() if t1 and t2 and t2 > t1 else wall_s
    return max(0.0, used / (elapsed * 1e9) * 100.0) if elapsed > 0 else 0.0


def _sample_all(client: Any, ids: list[str], pool: ThreadPoolExecutor) -> dict[str, dict[str, Any] | None]:
    return dict(zip(ids, pool.map(lambda cid: _stats_once(client, cid), ids), strict=True))


@dataclass(frozen=True)
class ContainerStats:
    """One running container's `docker stats` row: CPU % of one core, memory as `docker stats` counts it."""

    id: str
    name: str
    service: str
    cpu_percent: float
    mem_usage: int
    mem_limit: int
    mem_percent: float


@step
def sample_container_stats(env: Environment, containers: list[ContainerInfo],
                           interval_s: float = 1.0) -> list[ContainerStats]:
    """CPU % from two samples ``interval_s`` apart (all containers sampled concurrently), memory from the second.

    Returns one row per running container, highest CPU first. Containers that stopped meanwhile are left out.
    """
    running = [c for c in containers if c.running]
    if not running:
        return []
    ids = [c.id for c in running]
    with docker_client(env, max_pool_size=min(MAX_PARALLEL, len(ids))) as client, \
            ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(ids))) as pool:
        t1 = time.monotonic()
        first = _sample_all(client, ids, pool)
        time.sleep(interval_s)
        second = _sample_all(client, ids, pool)
        wall = time.monotonic() - t1
    rows = []
    for c in running:
        a, b = first[c.id], second[c.id]
        if not a or not b:
            continue
        usage, limit = memory_usage(b)
        rows.append(ContainerStats(
            id=c.id, name=c.name, service=c.service, cpu_percent=round(cpu_percent(a, b, wall), 1),
            mem_usage=usage, mem_limit=limit, mem_percent=round(usage / limit * 100, 1) if limit else 0.0,
        ))
    return sorted(rows, key=lambda r: -r.cpu_percent)


@dataclass
class MemorySeries:
    """One container's memory samples: seconds since the first sample, usage in bytes, and its limit."""

    t: list[float] = field(default_factory=list)
    usage: list[int] = field(default_factory=list)
    limit: int = 0


@step
def sample_memory_series(env: Environment, containers: list[ContainerInfo], samples: int = 5,
                         interval_s: float = 2.0) -> dict[str, MemorySeries]:
    """Memory usage of every running container, ``samples`` times ``interval_s`` apart, by container id."""
    running = [c for c in containers if c.running]
    series = {c.id: MemorySeries() for c in running}
    if not running:
        return series
    ids = [c.id for c in running]
    with docker_client(env, max_pool_size=min(MAX_PARALLEL, len(ids))) as client, \
            ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(ids))) as pool:
        start = time.monotonic()
        say("sampling memory of %d container(s): %d samples %.1f s apart (%.0f s)", len(ids), samples, interval_s,
            (samples - 1) * interval_s)
        for i in range(samples):
            if i:
                time.sleep(max(0.0, start + i * interval_s - time.monotonic()))
                say("memory sample %d of %d", i + 1, samples)
            now = time.monotonic() - start
            for cid, stats in _sample_all(client, ids, pool).items():
                if stats:
                    usage, limit = memory_usage(stats)
                    series[cid].t.append(round(now, 3))
                    series[cid].usage.append(usage)
                    series[cid].limit = limit
    return series


def fit_growth(t: Sequence[float], usage: Sequence[float]) -> dict[str, float]:
    """Least-squares growth rate (bytes/s) and how well a line explains the samples (r², 0..1)."""
    if len(t) < 3 or len(set(t)) < 2:
        return {"rate_bps": 0.0, "r2": 0.0}
    slope, _intercept = statistics.linear_regression(t, usage)
    if len(set(usage)) < 2:
        return {"rate_bps": 0.0, "r2": 0.0}
    r = statistics.correlation(t, usage)
    return {"rate_bps": slope, "r2": r * r}


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float]) -> str:
    """A small trend chart for a table cell."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if hi == lo:
        return SPARK[0] * len(values)
    return "".join(SPARK[int((v - lo) / (hi - lo) * (len(SPARK) - 1))] for v in values)


@step
def get_container_processes(env: Environment, container_id: str) -> list[dict[str, str]]:
    """`docker top`: the container's processes as dicts keyed by the engine's column titles."""
    with docker_client(env) as client:
        try:
            top = client.api.top(container_id)
        except (docker.errors.NotFound, docker.errors.APIError):
            return []
    titles = [t.strip() for t in top.get("Titles") or []]
    if len(titles) == 1 and " " in titles[0]:  # Podman on busybox: the header is one unsplit string too
        titles = titles[0].split()
    rows = []
    for proc in top.get("Processes") or []:
        if len(proc) == 1 and len(titles) > 1:  # Podman on busybox: one unsplit string per row
            proc = proc[0].split(None, len(titles) - 1)
        rows.append(dict(zip(titles, (str(p) for p in proc), strict=False)))
    return rows


@dataclass(frozen=True)
class ContainerLogs:
    """How many log lines were read, how many were ERROR lines, and the last few of those."""

    lines: int = 0
    error_count: int = 0
    errors: list[str] = field(default_factory=list)


@step
def get_container_logs(env: Environment, container_id: str, tail: int = 200,
                       since_minutes: float | None = 60) -> ContainerLogs:
    """The last ``tail`` log lines (within ``since_minutes``), with the ERROR lines counted and the last few kept."""
    since = datetime.now(UTC) - timedelta(minutes=since_minutes) if since_minutes else None
    with docker_client(env) as client:
        try:
            raw = client.api.logs(container_id, stdout=True, stderr=True, tail=tail, timestamps=False,
                                  since=since)
        except docker.errors.NotFound:
            return ContainerLogs()
    lines = raw.decode("utf-8", errors="replace").splitlines()
    errors = [ln for ln in lines if _ERROR_LINE.search(ln)]
    return ContainerLogs(lines=len(lines), error_count=len(errors), errors=[e[:300] for e in errors[-5:]])


@dataclass(frozen=True)
class RecentChange:
    """A recent deployment: a container created or an image built (``what``), and when."""

    what: str
    name: str
    service: str
    image: str
    when: datetime


@step
def get_recent_changes(env: Environment, containers: list[ContainerInfo], hours: float = 24) -> list[RecentChange]:
    """Recent deployments: containers created, and images built, within the last ``hours``."""
    cutoff = datetime.now(UTC) - timedelta(hours=hours)
    out: list[RecentChange] = []
    image_created: dict[str, datetime | None] = {}
    with docker_client(env) as client:
        for image_id in {c.image_id for c in containers if c.image_id}:
            try:
                image_created[image_id] = parse_time(client.api.inspect_image(image_id).get("Created"))
            except docker.errors.NotFound:
                image_created[image_id] = None
    for c in containers:
        built = image_created.get(c.image_id)
        if c.created and c.created >= cutoff:
            out.append(RecentChange("container created", c.name, c.service, c.image, c.created))
        if built and built >= cutoff:
            out.append(RecentChange("image built", c.name, c.service, c.image, built))
    return sorted(out, key=lambda r: r.when, reverse=True)


@dataclass(frozen=True)
class ExecResult:
    exit_code: int | None
    output: str


@step
def run_in_container(env: Environment, container_id: str, command: list[str],
                     max_bytes: int = 20_000) -> ExecResult:
    """Run a command from the playbook (an argument list, no shell) in a container: exit code and output tail."""
    with docker_client(env) as client:
        exec_id = client.api.exec_create(container_id, command, stdout=True, stderr=True)["Id"]
        output = client.api.exec_start(exec_id, demux=False) or b""
        exit_code = client.api.exec_inspect(exec_id).get("ExitCode")
    return ExecResult(exit_code, output.decode("utf-8", errors="replace")[-max_bytes:])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
