"""Network checks: the runbook's "Network Issues" (connectivity between services, DNS on the host and in containers).

Every check yields one row ``{source, destination, kind, ok, latency_ms, result, error}``, so a finding can name
where it was tried from, what it tried to reach, what happened and why. All checks of a run go through one bounded
thread pool, so a matrix of sources x destinations takes about as long as its slowest check.

From the host: TCP connect with ``socket.create_connection`` (its own timeout; optionally from a given source
address), DNS with ``getaddrinfo`` bounded by a timeout. From inside containers: ``nc`` and ``nslookup`` of the
container's own image (busybox here), run through the Docker API with argument lists, each under ``timeout``.
Names under ``.invalid`` are answered "does not exist" without asking any resolver (RFC 6761 section 6.4).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from functools import partial

import docker.errors

from runbook.engine.clients import docker_client
from runbook.engine.config import Environment, NetworkConfig
from runbook.engine.errors import TargetUnreachable
from runbook.engine.steps import step
from tasks.containers import PROJECT_LABEL, SERVICE_LABEL
from tasks.http_checks import check_http
from tasks.probes import HOST, Check, CheckRow, is_reserved_invalid, resolve, row, run_checks


def tcp_connect(host: str, port: int, timeout_s: float, source: str = HOST,
                source_address: str | None = None) -> CheckRow:
    """TCP connect from this host (optionally bound to ``source_address``): connect latency or the reason it failed."""
    destination = f"{host}:{port}"
    dns = resolve(host, timeout_s, source)
    if not dns.ok:
        return row(source, destination, "tcp", False, dns.latency_ms, "unresolvable",
                   f"cannot resolve {host}: {dns.error}")
    address = dns.result.split(", ")[0]
    started = time.perf_counter()
    try:
        with socket.create_connection((address, port), timeout=timeout_s,
                                      source_address=(source_address, 0) if source_address else None):
            pass
    except TimeoutError:
        return row(source, destination, "tcp", False, timeout_s * 1000, "timeout", f"no answer within {timeout_s:g} s")
    except ConnectionRefusedError:
        return row(source, destination, "tcp", False, (time.perf_counter() - started) * 1000, "refused",
                   "connection refused")
    except OSError as exc:
        return row(source, destination, "tcp", False, (time.perf_counter() - started) * 1000, "error",
                   exc.strerror or type(exc).__name__)
    return row(source, destination, "tcp", True, (time.perf_counter() - started) * 1000, "connected")


# ------------------------------------------------------------------ inside containers


@dataclass(frozen=True)
class ContainerSource:
    id: str
    name: str
    service: str

    @property
    def label(self) -> str:
        return f"container {self.name} ({self.service})"


def list_container_sources(env: Environment, services: list[str] | None) -> list[ContainerSource]:
    """Running containers of the compose project, optionally only these services'."""

    assert env.docker is not None
    with docker_client(env) as client:
        found = client.containers.list(filters={"label": [f"{PROJECT_LABEL}={env.docker.compose_project}"],
                                                "status": "running"})
        out = []
        for c in found:
            service = (c.labels or {}).get(SERVICE_LABEL, "")
            if services is None or service in services:
                out.append(ContainerSource(c.id, c.name.lstrip("/"), service))
    return sorted(out, key=lambda s: (s.service, s.name))


# An exec costs ~0.5-1 s of the engine's time (Podman here); more than a few at once just queue inside the engine
# until the API timeout. The matrix keeps the rest of its checks concurrent and feeds execs through this gate.
_EXEC_GATE = threading.BoundedSemaphore(4)


def _exec(env: Environment, container_id: str, command: list[str]) -> tuple[int | None, str]:
    with _EXEC_GATE, docker_client(env) as client:
        exec_id = client.api.exec_create(container_id, command, stdout=True, stderr=True)["Id"]
        output = client.api.exec_start(exec_id, demux=False) or b""
        code = client.api.exec_inspect(exec_id).get("ExitCode")
    return code, output.decode("utf-8", errors="replace").strip()


def container_tcp_connect(env: Environment, src: ContainerSource, host: str, port: int,
                          timeout_s: float) -> CheckRow:
    """TCP connect from inside a container with its own ``nc`` (connect timeout ``-w``, killed by ``timeout``).

    The latency includes the exec round trip through the Docker API (tens of ms); it is reported as such.
    """
    destination = f"{host}:{port}"
    if is_reserved_invalid(host):
        return row(src.label, destination, "tcp", False, 0.0, "unresolvable",
                   f"cannot resolve {host}: name does not exist (reserved .invalid domain)")
    wait = max(1, round(timeout_s))
    command = ["timeout", "-s", "KILL", str(wait + 1), "nc", "-w", str(wait), host, str(port), "-e", "true"]
    started = time.perf_counter()
    code, output = _exec(env, src.id, command)
    elapsed = (time.perf_counter() - started) * 1000
    if code == 0:
        return row(src.label, destination, "tcp", True, elapsed, "connected (incl. exec)")
    lowered = output.lower()
    result = ("refused" if "refused" in lowered else "unresolvable" if "bad address" in lowered
              else "timeout" if code in (137, 143) or "timed out" in lowered else "error")
    return row(src.label, destination, "tcp", False, elapsed, result, output.splitlines()[-1][:200] if output
               else f"nc exited {code}")


def container_resolve(env: Environment, src: ContainerSource, name: str, timeout_s: float) -> CheckRow:
    """Resolve a name inside a container with its own ``nslookup`` (`docker-compose exec backend nslookup db`)."""
    if is_reserved_invalid(name):
        return row(src.label, name, "dns", False, 0.0, "NXDOMAIN", "name does not exist (reserved .invalid domain)")
    command = ["timeout", "-s", "KILL", str(max(1, round(timeout_s))), "nslookup", name]
    started = time.perf_counter()
    code, output = _exec(env, src.id, command)
    elapsed = (time.perf_counter() - started) * 1000
    if code == 0:
        addresses = [ln.split()[-1] for ln in output.splitlines()[2:] if ln.lower().startswith("address")]
        return row(src.label, name, "dns", True, elapsed, ", ".join(addresses) or "resolved")
    return row(src.label, name, "dns", False, elapsed, "timeout" if code in (137, 143) else "NXDOMAIN",
               output.splitlines()[-1][:200] if output else f"nslookup exited {code}")


# ------------------------------------------------------------------ the matrix


@dataclass
class Plan:
    """The checks of one run, as callables, and what could not be planned (skipped sources) with the reason."""

    checks: list[Check]
    notes: list[str]


def plan_checks(env: Environment, cfg: NetworkConfig, http: bool = True) -> Plan:
    """Every (source, destination) check the config asks for: host sources x (TCP targets + the playbook's HTTP
    checks when ``http``), DNS on the host, and containers x their targets and DNS."""

    checks: list[Check] = []
    notes: list[str] = []
    host_sources: list[tuple[str, str | None]] = [(f"{HOST} ({addr})", addr) for addr in cfg.source_addresses]
    host_sources = host_sources or [(HOST, None)]
    for label, addr in host_sources if http else []:
        for name, hc in env.http_checks.items():
            checks.append((label, f"{name} {hc.url}", "http", partial(check_http, name, hc, label, addr)))
    for name, t in cfg.targets.items():
        if not t.from_host:
            continue
        for label, addr in host_sources:
            checks.append((label, f"{name} {t.host}:{t.port}", "tcp",
                           partial(tcp_connect, t.host, t.port, t.timeout_s, label, addr)))
    for dns_name in cfg.dns_names:
        checks.append((HOST, dns_name, "dns", partial(resolve, dns_name, cfg.dns_timeout_s)))

    wanted = {s for t in cfg.targets.values() for s in (t.from_services or [])}
    default_sources = cfg.container_sources if cfg.container_sources is not None else list(env.services)
    if env.docker is None:
        if default_sources or wanted:
            notes.append("in-container checks skipped: no docker endpoint is configured for this environment")
        return Plan(checks, notes)
    try:
        containers = list_container_sources(env, sorted(set(default_sources) | wanted))
    except TargetUnreachable as exc:
        notes.append(f"in-container checks skipped: {exc}")
        checks.append((HOST, "docker API", "docker",
                       partial(row, HOST, "docker API", "docker", False, None, "unreachable", exc.reason)))
        return Plan(checks, notes)
    except docker.errors.DockerException as exc:  # the engine answered with an error
        notes.append(f"in-container checks skipped: the docker API refused to list containers: {exc}"[:300])
        return Plan(checks, notes)
    if not containers:
        notes.append("in-container checks skipped: no running containers of the configured services")
    for src in containers:
        for name, t in cfg.targets.items():
            services = t.from_services if t.from_services is not None else default_sources
            if src.service not in services:
                continue
            checks.append((src.label, f"{name} {t.host}:{t.port}", "tcp",
                           partial(container_tcp_connect, env, src, t.host, t.port, t.timeout_s)))
        if cfg.dns_in_containers and src.service in default_sources:
            for dns_name in cfg.container_dns_names if cfg.container_dns_names is not None else cfg.dns_names:
                checks.append((src.label, dns_name, "dns",
                               partial(container_resolve, env, src, dns_name, cfg.dns_timeout_s)))
    return Plan(checks, notes)


@dataclass(frozen=True)
class Connectivity:
    """Every row of the matrix, and what could not be checked (skipped sources) with the reason."""

    rows: list[CheckRow]
    notes: list[str]


@step
def check_connectivity(env: Environment, cfg: NetworkConfig, http: bool = True) -> Connectivity:
    """The whole matrix (TCP and HTTP from the host, TCP from containers, DNS), concurrently."""
    plan = plan_checks(env, cfg, http)
    return Connectivity(run_checks(plan.checks, cfg.max_parallel), plan.notes)
