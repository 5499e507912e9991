"""Playbook configuration: one schema, one loader.

What the platform looks like (hosts, containers, databases, URLs, thresholds) is data in ``playbooks/*.yaml``.
Every file is validated by the pydantic models below; errors name the file, the path inside it and what was
expected. Secrets are never inline: a ``SecretRef`` names an environment variable (or an ``env_file`` entry, the
docker-compose habit the Pafar team already has) or a Prefect Secret block, and is resolved only when used.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import re2
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from runbook.engine.errors import ConfigError, MissingSecret
from runbook.engine.params import NAME_PATTERN
from runbook.engine.redact import redact, register_secret

PROJECT_ROOT = Path(__file__).resolve().parents[2]

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
"""Names of environments, services, databases, hosts: safe to log, to pass as arguments and to match alert labels."""

EnvVarName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]


class Strict(BaseModel):
    """Base for every config model: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(Strict):
    """A reference to a secret: exactly one of an environment variable or a Prefect Secret block."""

    env: EnvVarName | None = None
    prefect_secret: Name | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.prefect_secret is None):
            raise ValueError("give exactly one of 'env' (an environment variable) or 'prefect_secret' (a block name)")
        return self

    def describe(self) -> str:
        return f"environment variable {self.env}" if self.env else f"Prefect Secret block {self.prefect_secret!r}"


class DatabaseConfig(Strict):
    dsn: SecretRef
    admin_dsn: SecretRef | None = Field(
        None,
        description="restores only: a role with CREATEDB that is a member of the database owner's role (never a "
        "superuser), connected to a maintenance database such as 'postgres'; creates, renames and drops the "
        "scratch and restore databases",
    )
    key_tables: list[Name] = Field(default_factory=list, description="tables whose row counts matter")
    connect_timeout_s: float = Field(3.0, gt=0, le=60)
    statement_timeout_ms: int = Field(5000, gt=0, le=600_000)


class DockerConfig(Strict):
    base_url: str = Field(pattern=r"^(unix|tcp|ssh|npipe)://.+")
    compose_project: Name = "pafar"
    timeout_s: float = Field(10.0, gt=0, le=120)


class SSHHostConfig(Strict):
    host: str = Field(pattern=r"^[A-Za-z0-9.:-]{1,253}$")
    port: int = Field(22, ge=1, le=65535)
    user: str = Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    key_file: Path
    known_hosts: Path
    timeout_s: float = Field(5.0, gt=0, le=120)


class RedisConfig(Strict):
    url: str = Field(pattern=r"^rediss?://[^@\s]+$", description="no credentials in the URL: use password")
    password: SecretRef | None = None
    timeout_s: float = Field(3.0, gt=0, le=60)


class ElasticsearchConfig(Strict):
    url: str = Field(pattern=r"^https?://\S+$")
    index_pattern: str = Field("logstash-pafar-*", pattern=r"^[a-z0-9*._-]+$")
    api_key: SecretRef | None = None
    timeout_s: float = Field(5.0, gt=0, le=120)
    media_type: Literal["elasticsearch", "plain-json"] = Field(
        "elasticsearch", description="plain-json only for OpenSearch-compatible servers that reject ES media types"
    )


class HttpCheckConfig(Strict):
    url: str = Field(pattern=r"^https?://\S+$")
    expect_status: int = Field(200, ge=100, le=599)
    timeout_s: float = Field(5.0, gt=0, le=120)
    ca_file: Path | None = Field(None, description="PEM bundle to verify TLS with instead of the system CAs")
    slow_s: float | None = Field(None, gt=0, description="total time above this is a finding (default thresholds)")


HostName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")]
"""A DNS name or IPv4 literal, safe to pass as an argument (no spaces, options or shell characters)."""


class NetworkTarget(Strict):
    """One destination of the connectivity matrix: a TCP port, e.g. db:5432 (the runbook's `curl -f http://db:5432`)."""

    host: HostName
    port: int = Field(ge=1, le=65535)
    timeout_s: float = Field(3.0, gt=0, le=60)
    from_host: bool = Field(True, description="dial it from the runbook's host")
    from_services: list[Name] | None = Field(
        None, description="dial it from inside these services' containers (default: network.container_sources)")


class NetworkConfig(Strict):
    """The runbook's "Network Issues": what the connectivity matrix and DNS checks look at."""

    targets: dict[Name, NetworkTarget] = Field(default_factory=dict, description="TCP destinations")
    container_sources: list[Name] | None = Field(
        None, description="compose services whose containers are also sources (default: every service in services)")
    source_addresses: list[Annotated[str, StringConstraints(pattern=r"^\d{1,3}(\.\d{1,3}){3}$")]] = Field(
        default_factory=list, description="host-side source addresses to connect from (multi-homed hosts)")
    dns_names: list[HostName] = Field(default_factory=list, description="names resolved on the host and in containers")
    dns_timeout_s: float = Field(3.0, gt=0, le=30)
    dns_in_containers: bool = Field(True, description="also resolve names inside each source container")
    container_dns_names: list[HostName] | None = Field(
        None, description="names resolved inside containers (default: dns_names), e.g. compose service names")
    max_parallel: int = Field(32, ge=1, le=256, description="checks in flight at once")


class LogFileConfig(Strict):
    """An application log file read over SSH when no Elasticsearch is configured (the runbook's System Logs)."""

    ssh_host: Name
    path: str = Field(pattern=r"^/[A-Za-z0-9._/-]{1,255}$", description="absolute path on that host")
    service: Name = Field("backend", description="the service whose lines it holds (when a line does not say)")
    max_lines: int = Field(5000, ge=1, le=200_000, description="read at most this many lines from the end")


class BackupConfig(Strict):
    directory: Path
    ssh_host: Name | None = None
    rpo_hours: float = Field(26.0, gt=0)
    log_file: Path | None = None
    verify_cron: str | None = Field(
        None, pattern=r"^\S+( \S+){4}$", description="cron (5 fields, UTC) of the daily backup-verification run"
    )
    min_size_ratio: float = Field(
        0.5, gt=0, le=1, description="a backup smaller than this fraction of the previous ones' median fails"
    )


class GrafanaConfig(Strict):
    """Where remediations are annotated (Grafana HTTP API, POST /api/annotations)."""

    url: str = Field(pattern=r"^https?://\S+$")
    token: SecretRef | None = None
    timeout_s: float = Field(5.0, gt=0, le=60)


Argv = Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=500, pattern=r"^[^\x00\n]+$")]],
                 Field(min_length=1, max_length=64)]
"""A command as an argument list (no shell ever sees it): 1-64 arguments, no NUL or newline in any."""


class ServiceConfig(Strict):
    min_replicas: int = Field(1, ge=0, le=100)
    max_replicas: int = Field(1, ge=1, le=100)
    writer: bool = Field(False, description="writes to the database: stopped before a restore")
    health_url: str | None = Field(None, pattern=r"^https?://\S+$")
    heap_profile_command: Argv | None = Field(
        None, description="memory-leak: argument list run in each leaking container (no shell); "
        "its output is attached to the report, e.g. [python, -m, memory_profiler, app/main.py]")
    pool_status_command: Argv | None = Field(
        None, description="db-slowness, service-outage: argument list run in each running container through the "
        "Docker exec API (no shell) that prints the application's connection-pool status: a JSON object "
        "(pool_size, checked_out, checked_in, overflow) or SQLAlchemy's pool.status() line, e.g. "
        "[python, -c, 'from app.core.database import engine; print(engine.pool.status())']")
    pool_status_timeout_s: float = Field(5.0, gt=0, le=60, description="how long pool_status_command may take")

    @model_validator(mode="after")
    def _bounds(self) -> ServiceConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class Thresholds(Strict):
    """The runbook's alert thresholds plus the limits remediations act on."""

    error_rate_per_s: float = Field(0.1, ge=0, description="HighErrorRate: 5xx per second")
    p95_latency_s: float = Field(2.0, gt=0, description="HighResponseTime")
    memory_percent: float = Field(85.0, gt=0, le=100, description="HighMemoryUsage")
    cpu_percent: float = Field(80.0, gt=0)
    disk_percent: float = Field(90.0, gt=0, le=100)
    db_connections: int = Field(80, gt=0, description="DatabaseConnectionHigh: pg_stat_database_numbackends")
    slow_response_ms: int = Field(5000, gt=0, description="the runbook's 'Performance Issues' log query")
    long_query_s: float = Field(300.0, gt=0, description="active queries older than this are cancelled")
    idle_in_transaction_s: float = Field(120.0, gt=0, description="idle-in-transaction blockers older are terminated")
    cache_hit_ratio: float = Field(0.8, ge=0, le=1)
    http_slow_s: float = Field(2.0, gt=0, description="an HTTP check slower than this in total is a finding")
    tcp_slow_ms: float = Field(500.0, gt=0, description="a TCP connect slower than this is a finding")
    cert_days_warning: int = Field(14, ge=0, description="TLS certificates expiring sooner are a finding")
    log_errors_per_hour: int = Field(10, ge=0, description="level:ERROR documents in the last hour above this")


class IncidentWebhookConfig(Strict):
    """Where service-outage posts its summary (the runbook's "Post in incident channel"): Slack-compatible JSON."""

    url: SecretRef = Field(description="incoming-webhook URLs carry their token: a secret")
    timeout_s: float = Field(5.0, gt=0, le=60)


class StatusPageConfig(Strict):
    """Where incidents are published for customers (the runbook's "Update status page"): a status-page API.

    ``provider: statuspage`` speaks Atlassian Statuspage's REST API (``POST/PATCH /v1/pages/{page_id}/incidents``,
    ``Authorization: OAuth <key>``); other providers fit runbook.engine.statuspage's ``StatusPage`` protocol.
    Runs started by an alert open one incident per occurrence; the alert's resolve closes it.
    """

    provider: Literal["statuspage"] = "statuspage"
    url: str = Field("https://api.statuspage.io", pattern=r"^https?://[^\s?#]+$", description="the API's base URL")
    page_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    api_key: SecretRef = Field(description="the API key: a secret, sent only in the Authorization header")
    components: dict[Name, Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]] = Field(
        default_factory=dict, description="service -> the page's component id, marked down while the incident lasts")
    incident_name: Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")] = \
        Field("Service disruption", description="the public title; the service name is appended")
    procedures: list[Name] = Field(default_factory=lambda: ["service-outage"],
                                   description="procedures whose alert runs update the page (a route's status_page "
                                               "overrides)")
    timeout_s: float = Field(5.0, gt=0, le=60, description="per API request")


class Environment(Strict):
    description: str = ""
    env_file: Path | None = Field(None, description="KEY=VALUE file (relative to the playbook) consulted for secrets")
    docker: DockerConfig | None = None
    ssh_hosts: dict[Name, SSHHostConfig] = Field(default_factory=dict)
    databases: dict[Name, DatabaseConfig] = Field(default_factory=dict)
    prometheus_url: str | None = Field(None, pattern=r"^https?://\S+$")
    prometheus_timeout_s: float = Field(5.0, gt=0, le=120, description="per PromQL request")
    elasticsearch: ElasticsearchConfig | None = None
    redis: RedisConfig | None = None
    http_checks: dict[Name, HttpCheckConfig] = Field(default_factory=dict)
    network: NetworkConfig | None = None
    log_files: dict[Name, LogFileConfig] = Field(
        default_factory=dict, description="log files read over SSH when elasticsearch is not configured")
    backups: BackupConfig | None = None
    services: dict[Name, ServiceConfig] = Field(default_factory=dict)
    thresholds: Thresholds = Field(default_factory=Thresholds)
    grafana: GrafanaConfig | None = None
    incident_webhook: IncidentWebhookConfig | None = None
    status_page: StatusPageConfig | None = None
    approvals: dict[Name, Literal["required", "optional"]] = Field(
        default_factory=dict, description="procedure -> whether an operator's apply needs a person's approval "
                                          "(default: the procedure's own; data-corruption: required)")

    _name: str = PrivateAttr("")
    _source: Path = PrivateAttr(Path("."))

    @property
    def name(self) -> str:
        return self._name

    @property
    def source(self) -> Path:
        return self._source

    def check_env_file(self) -> None:
        """ConfigError when the environment names an ``env_file`` that cannot be read (a typo would otherwise
        surface only as a missing secret, or pass when the process environment happens to hold it)."""
        if self.env_file is None:
            return
        path = self._source.parent / self.env_file
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ConfigError(f"{self._source}: environments.{self._name}.env_file: {path} is not a readable file")

    @model_validator(mode="after")
    def _backup_host_exists(self) -> Environment:
        if self.backups and self.backups.ssh_host and self.backups.ssh_host not in self.ssh_hosts:
            raise ValueError(f"backups.ssh_host {self.backups.ssh_host!r} is not one of ssh_hosts")
        return self

    def database(self, name: str) -> DatabaseConfig:
        """The named database, or a ConfigError naming the ones that exist."""
        try:
            return self.databases[name]
        except KeyError:
            known = ", ".join(sorted(self.databases)) or "none"
            raise ConfigError(
                f"{self._source}: environments.{self._name}.databases: no database {name!r} (known: {known})"
            ) from None

    def resolve_secret(self, ref: SecretRef, where: str) -> str:
        """Return the secret's value; a MissingSecret names the playbook file, the path in it and the variable."""
        if ref.env:
            value = os.environ.get(ref.env)
            if value is None and self.env_file is not None:
                value = read_env_file(self._source.parent / self.env_file).get(ref.env)
            if not value:
                raise MissingSecret(
                    f"{self._source}: environments.{self._name}.{where}: environment variable {ref.env} is not set"
                )
        else:
            value = _load_prefect_secret(ref.prefect_secret or "", f"{self._source}: environments.{self._name}.{where}")
        register_secret(value)
        return value


LabelName = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]
"""An alert label's name: any UTF-8 text, as Prometheus 3 and Alertmanager 0.28+ allow (``service.name``)."""
Inventory = Literal["services", "databases", "ssh_hosts", "http_checks"]


class LabelParam(Strict):
    """Where a procedure parameter comes from in an alert: a label whose value must name something that exists."""

    label: LabelName
    inventory: Inventory | None = Field(None, description="the value must be a key of this playbook section")
    map: dict[str, Name] = Field(default_factory=dict, description="label value -> inventory name (job -> service)")
    required: bool = True


class Breaker(Strict):
    """At most ``max_remediations`` applying runs per route within ``window_s``; beyond that, dry run only."""

    max_remediations: int = Field(3, ge=1, le=1000)
    window_s: float = Field(3600.0, gt=0)


class Policy(Strict):
    mode: Literal["diagnose", "dry_run", "auto", "approve"] = Field(
        "dry_run", description="diagnose: no remediation; dry_run: plans only; auto: apply; approve: pause for a person"
    )
    cooldown_s: float = Field(900.0, ge=0, description="no new run for the same procedure and target within this")
    breaker: Breaker = Field(default_factory=Breaker)
    approval_timeout_s: float = Field(1800.0, gt=0, description="an approval not given in time counts as rejected")


class Notifier(Strict):
    kind: Literal["slack", "webhook"]
    url: SecretRef = Field(description="incoming-webhook URLs carry their token: a secret")
    timeout_s: float = Field(5.0, gt=0, le=60)


class Route(Strict):
    """Which alert runs which procedure, on which target, under which policy (ansible-rulebook's rule shape)."""

    name: Name
    match: dict[LabelName, str] = Field(description="labels that must be equal; must include alertname")
    match_re: dict[LabelName, str] = Field(default_factory=dict, description="labels that must fully match a regex")
    procedure: Name
    env: Name | None = Field(None, description="environment the procedure runs against (the default when env_label "
                                               "is set and the alert lacks it)")
    env_label: LabelName | None = Field(None, description="alert label naming the environment (validated against "
                                                          "the playbooks), e.g. Prometheus' external label")
    params: dict[Name, Any] = Field(default_factory=dict, description="fixed procedure parameters")
    labels: dict[Name, LabelParam] = Field(default_factory=dict, description="procedure parameter <- alert label")
    policy: Policy = Field(default_factory=Policy)
    notify: list[Notifier] = Field(default_factory=list)
    status_page: bool | None = Field(None, description="update the environment's status page from this route's "
                                                       "runs (default: its procedure in status_page.procedures)")

    @field_validator("match")
    @classmethod
    def _needs_alertname(cls, v: dict[str, str]) -> dict[str, str]:
        if "alertname" not in v:
            raise ValueError("must include 'alertname'")
        return v

    @model_validator(mode="after")
    def _names_an_environment(self) -> Route:
        if self.env is None and self.env_label is None:
            raise ValueError("needs env (an environment) or env_label (the alert label naming one), or both")
        return self

    @model_validator(mode="after")
    def _re2_patterns(self) -> Route:
        for label, pattern in self.match_re.items():
            try:
                label_regex(pattern)
            except re2.error as exc:
                msg = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
                raise ValueError(f"route {self.name!r}: match_re.{label}: {pattern!r} is not an RE2 regular "
                                 f"expression (Alertmanager's syntax: no backreferences or lookaround): {msg}"
                                 ) from None
        return self

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Alertmanager's matching: equality for ``match``, an anchored RE2 full match for ``match_re``, and a
        missing label counts as the empty string. RE2 runs in linear time: no label value can stall matching."""
        return (all(labels.get(k, "") == v for k, v in self.match.items())
                and all(label_regex(p).search(labels.get(k, "")) is not None for k, p in self.match_re.items()))


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is a ConfigError, not a line on stderr


@lru_cache(maxsize=1024)
def label_regex(pattern: str) -> Any:
    """A route's ``match_re`` pattern compiled as Alertmanager compiles it: RE2, anchored as ``^(?:pattern)$``.

    RE2 (linear time, no backreferences) rather than Python's backtracking ``re``: ``([a-z0-9]+-?)+`` against a
    40-character label must not take the intake's CPU for minutes. Raises ``re2.error`` for a pattern RE2 refuses.
    """
    return re2.compile(f"^(?:{pattern})$", _RE2_OPTIONS)


class PlaybookFile(Strict):
    """One file in playbooks/: environments (the platform) and routes (alerts -> procedures)."""

    environments: dict[Name, Environment] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)


class Playbooks(BaseModel):
    """Everything loaded from the playbook directories, environments by name, routes in file order (frozen: one
    loaded copy is shared by every run of a process)."""

    model_config = ConfigDict(frozen=True)

    environments: dict[str, Environment]
    files: list[Path]
    routes: list[Route] = Field(default_factory=list)

    def environment(self, name: str) -> Environment:
        try:
            return self.environments[name]
        except KeyError:
            known = ", ".join(sorted(self.environments)) or "none"
            hint = (' (start it with `runbook sandbox up`, then `eval "$(runbook sandbox env)"`)'
                    if name == "sandbox" else "")
            raise ConfigError(f"unknown environment {name!r}{hint}; known: {known}") from None


def default_playbook_dirs() -> list[Path]:
    """$RUNBOOK_PLAYBOOKS (os.pathsep-separated files or directories), else the project's playbooks/.

    Never the sandbox's generated playbook: a production process must not read a sandbox environment left in the
    checkout. Tests, the demo and `eval "$(runbook sandbox env)"` point RUNBOOK_PLAYBOOKS at it explicitly.
    """
    configured = os.environ.get("RUNBOOK_PLAYBOOKS")
    if configured:
        return [Path(p) for p in configured.split(os.pathsep) if p]
    return [PROJECT_ROOT / "playbooks"]


def load_playbooks(dirs: Sequence[Path] | None = None) -> Playbooks:
    """Load and validate every ``*.yaml`` under the given directories; all errors are collected, then raised.

    The last result is reused while no file changed (same paths, inodes, sizes, modification times): a warm
    executor loads the playbooks once, not per run (parsing and validating them is most of a run's start-up),
    and still sees an edit at the next run. A failed load is never kept.
    """
    global _LAST_LOAD
    dirs = list(dirs) if dirs is not None else default_playbook_dirs()
    files: list[Path] = []
    for d in dirs:
        if d.is_file():
            files.append(d)
        elif d.is_dir():
            files.extend(sorted([*d.glob("*.yaml"), *d.glob("*.yml")]))
    key = _files_key(files)
    with _LAST_LOAD_LOCK:
        if key is not None and _LAST_LOAD is not None and _LAST_LOAD[0] == key:
            return _LAST_LOAD[1]
    loaded = _load_files(files)
    if key is not None:
        with _LAST_LOAD_LOCK:
            _LAST_LOAD = (key, loaded)
    return loaded


_LAST_LOAD: tuple[tuple[tuple[str, int, int, int], ...], Playbooks] | None = None
_LAST_LOAD_LOCK = threading.Lock()


def _files_key(files: list[Path]) -> tuple[tuple[str, int, int, int], ...] | None:
    try:
        stats = [(str(p), p.stat()) for p in files]
    except OSError:
        return None  # unreadable: load (and report) it, never reuse
    return tuple((name, st.st_ino, st.st_size, st.st_mtime_ns) for name, st in stats)


def _load_files(files: list[Path]) -> Playbooks:
    errors: list[str] = []
    envs: dict[str, Environment] = {}
    routes: list[tuple[Path, int, Route]] = []
    for path in files:
        parsed = _load_file(path, errors)
        if parsed is None:
            continue
        routes.extend((path, i, r) for i, r in enumerate(parsed.routes))
        for name, env in parsed.environments.items():
            if name in envs:
                errors.append(f"{path}: environments.{name}: already defined in {envs[name].source}")
                continue
            env._name, env._source = name, path
            envs[name] = env
    seen: dict[str, Path] = {}
    for path, i, route in routes:
        if route.name in seen:
            errors.append(f"{path}: routes.{i}.name: route {route.name!r} already defined in {seen[route.name]}")
        seen.setdefault(route.name, path)  # route.env is checked when used: this machine may not load it
    if errors:
        raise ConfigError("\n".join(errors))
    return Playbooks(environments=envs, files=files, routes=[r for _, _, r in routes])


def playbook_json_schema() -> dict[str, Any]:
    """The JSON schema of a playbook file, for editors (yaml-language-server) and reviewers."""
    return PlaybookFile.model_json_schema()


MAX_PLAYBOOK_BYTES = 1024 * 1024
"""A playbook file above this is refused (the project's are a few KB; every run loads every file)."""
MAX_YAML_DEPTH = 64
"""Nesting levels, counted as aliases expand (the schema needs about 7)."""
MAX_YAML_NODES = 100_000
"""Scalars, lists and maps in one file, counted as aliases expand: an alias counts everything it refers to."""


class _Refused(yaml.MarkedYAMLError):
    """A playbook the bounded loader will not build (too deep, or aliases that expand too far)."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with aliases and nesting bounded while the document is composed.

    Aliases are allowed, not refused: anchors and merge keys (``<<: *defaults``) are how people share thresholds
    between environments. What makes them dangerous is expansion (nine lines of a "billion laughs" stand for 10^9
    nodes that validation, ``runbook check`` and the intake's JSON would all walk), so every node is counted as
    if each alias were a copy of what it refers to, depth included, and composition stops as soon as a bound is
    passed: before anything is built or validated. An alias to a node that contains it (a cycle) is refused.
    Composing node by node also keeps 10,000-deep input from reaching Python's recursion limit.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0  # of the node being composed
        self._deepest = 0  # deepest level reached so far, aliases expanded
        self._nodes = 0  # nodes so far, aliases expanded
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, height) once it is complete

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        mark: Any = event.start_mark  # a yaml.error.Mark (the stubs also allow the C parser's)
        if isinstance(event, yaml.AliasEvent):
            anchor = event.anchor
            target = self.anchors.get(anchor)
            if target is not None:  # an undefined alias: the composer's own error says so
                size = self._sizes.get(id(target))
                if size is None:
                    raise _Refused(None, None, f"alias *{anchor} refers to a node that contains it", mark)
                self._grow(size[0], self._depth + size[1], mark)
            return super().compose_node(parent, index)
        self._depth += 1
        outer_deepest, self._deepest = self._deepest, self._depth
        first = self._nodes
        self._grow(1, self._depth, mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._sizes[id(node)] = (self._nodes - first, self._deepest - self._depth)
        self._deepest = max(outer_deepest, self._deepest)
        return node

    def _grow(self, nodes: int, depth: int, mark: Any) -> None:
        self._nodes += nodes
        self._deepest = max(self._deepest, depth)
        if depth > MAX_YAML_DEPTH:
            raise _Refused(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels (aliases expanded)", mark)
        if self._nodes > MAX_YAML_NODES:
            raise _Refused(None, None, f"more than {MAX_YAML_NODES} nodes with aliases expanded (an alias counts "
                                       "everything it refers to)", mark)


def _read_yaml(path: Path) -> Any:
    """The file's YAML through the bounded loader; a file over MAX_PLAYBOOK_BYTES (or not a regular file, such as
    a FIFO that would block) is refused before it is read. ConfigError names the file and the limit."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path}: not a regular file")
    too_big = f"{path}: larger than the limit of {MAX_PLAYBOOK_BYTES} bytes for a playbook file"
    if info.st_size > MAX_PLAYBOOK_BYTES:
        raise ConfigError(f"{too_big} ({info.st_size} bytes)")
    with path.open("rb") as fh:
        data = fh.read(MAX_PLAYBOOK_BYTES + 1)  # it may have grown since stat()
    if len(data) > MAX_PLAYBOOK_BYTES:
        raise ConfigError(too_big)
    loader = _BoundedLoader(data.decode("utf-8"))
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _load_file(path: Path, errors: list[str]) -> PlaybookFile | None:
    try:
        raw = _read_yaml(path)
    except ConfigError as exc:
        errors.append(str(exc))
        return None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = "refused" if isinstance(exc, _Refused) else "not valid YAML"
        errors.append(f"{path}: {where}{what}: {getattr(exc, 'problem', None) or exc}")
        return None
    except (OSError, UnicodeDecodeError) as exc:
        errors.append(f"{path}: cannot read: {exc}")
        return None
    if raw is None:
        return PlaybookFile()
    try:
        return PlaybookFile.model_validate(raw)
    except ValidationError as exc:
        errors.extend(f"{path}: {_format_error(e)}" for e in exc.errors(include_url=False))
        return None


def _format_error(err: ErrorDetails) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    got = err.get("input")
    shown = "" if isinstance(got, dict | list) else f" (got {redact(str(got))[:60]!r})"
    return f"{loc}: {err['msg']}{shown}"


_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a docker-compose style env file (``export``, quotes, comments); {} when it cannot be read.

    The one parser: the engine reads playbooks' env_file with it and the sandbox its own secrets.env. Hand-written:
    ten lines, and python-dotenv is not in our stack."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return values
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _ENV_LINE.match(line)
        if m:
            key, value = m.groups()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[key] = value
    return values


def _load_prefect_secret(block: str, where: str) -> str:
    from prefect.blocks.system import Secret  # lazy: only secret_block settings need Prefect's block machinery

    try:
        # prefect's async_dispatch types the call as "block or coroutine"; outside an event loop it is the block
        value = Secret.load(block, validate=False).get()  # type: ignore[union-attr]
    except ValueError as exc:  # Prefect raises ValueError for a missing block
        raise MissingSecret(f"{where}: Prefect Secret block {block!r} cannot be loaded: {exc}") from None
    return str(value)


def iter_secret_refs(env: Environment, everything: bool = False) -> Iterable[tuple[str, SecretRef]]:
    """Every secret an environment refers to, with its path. A run checks these before it starts; ``everything``
    (`runbook check --env`) adds the ones only some procedures use (``admin_dsn``: restores and backups)."""
    for name, db in env.databases.items():
        yield f"databases.{name}.dsn", db.dsn
        if everything and db.admin_dsn is not None:
            yield f"databases.{name}.admin_dsn", db.admin_dsn
    if env.redis and env.redis.password:
        yield "redis.password", env.redis.password
    if env.elasticsearch and env.elasticsearch.api_key:
        yield "elasticsearch.api_key", env.elasticsearch.api_key
    if env.grafana and env.grafana.token:
        yield "grafana.token", env.grafana.token
    if env.incident_webhook:
        yield "incident_webhook.url", env.incident_webhook.url
    if everything and env.status_page:  # a missing key is a warning in the run's report, never a refused run
        yield "status_page.api_key", env.status_page.api_key
