"""The shape every sandbox service shares: its system requirements, its record, start/health/stop."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from runbook.engine.polling import wait_until

from . import net, process
from .errors import MissingSystemPackage, SandboxError


@dataclass(frozen=True)
class Requirement:
    """Something on the machine a service needs (a binary or file) and the package that provides it."""

    path: str
    package: str
    install_command: str = ""
    kind: str = "Debian"
    executable: bool = True

    def check(self) -> None:
        """Raise MissingSystemPackage unless the binary/file is present."""
        if os.path.isabs(self.path):
            ok = os.access(self.path, os.X_OK) if self.executable else os.path.exists(self.path)
        else:
            ok = shutil.which(self.path) is not None
        if not ok:
            cmd = self.install_command or f"apt-get install -y {self.package}"
            raise MissingSystemPackage(os.path.basename(self.path), self.package, cmd, self.kind)


class ServiceRecord(BaseModel):
    """What state.json remembers about one started service (never passwords)."""

    name: str
    pid: int
    port: int
    started_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    log_file: str
    paths: dict[str, str] = Field(default_factory=dict)
    cmdline_markers: list[str] = Field(default_factory=list)
    proc_start: int | None = None
    running: bool = False
    # Credentials live in secrets.env only; kept in memory so the generated files can be written.
    secrets: dict[str, str] = Field(default_factory=dict, exclude=True, repr=False)


class Service:
    """Base for one sandbox service; subclasses implement start() and is_healthy().

    Later services (podman, sshd, prometheus, ...) follow the same shape: a module with one subclass.
    """

    name: ClassVar[str]
    requirements: ClassVar[tuple[Requirement, ...]] = ()
    stop_timeout_s: ClassVar[float] = 10.0
    # Other sandbox services this one uses when they are part of the sandbox: started first, passed to start().
    uses: ClassVar[tuple[str, ...]] = ()

    def check_requirements(self) -> None:
        """Raise MissingSystemPackage for the first absent requirement."""
        for req in self.requirements:
            req.check()

    def service_dir(self, state: Path) -> Path:
        """This service's own subdirectory of the state dir (data, logs, sockets)."""
        return state / self.name

    def start(self, state: Path, port: int, peers: dict[str, ServiceRecord] | None = None) -> ServiceRecord:
        """Start the service on 127.0.0.1:port and wait until healthy, or raise SandboxError.

        ``peers`` holds the running records of the services named in ``uses``.
        """
        raise NotImplementedError

    def is_healthy(self, record: ServiceRecord) -> bool:
        """Whether the service answers on its port right now."""
        raise NotImplementedError

    def owns_process(self, record: ServiceRecord) -> bool:
        """Whether record.pid is alive and still the process we started (PID-reuse safety)."""
        return process.pid_matches(record.pid, record.cmdline_markers, record.proc_start)

    def stop(self, record: ServiceRecord) -> None:
        """Stop the process by PID (SIGTERM, then SIGKILL) and check the port is closed."""
        if process.terminate(record.pid, record.cmdline_markers, record.proc_start, self.stop_timeout_s):
            self.wait_port_closed(record)

    def wait_port_closed(self, record: ServiceRecord, timeout: float = 5.0) -> None:
        """Raise SandboxError if the port still accepts connections after the process stopped."""
        if not wait_until(lambda: not net.port_accepts(record.port, 0.2), timeout):
            raise SandboxError(f"{self.name}: port {record.port} still accepts connections after stop")

    def clean(self, state: Path) -> None:
        """Remove this service's files (after it stopped, or leftovers of a dead one)."""
        shutil.rmtree(self.service_dir(state), ignore_errors=True)

    def reuse(self, record: ServiceRecord, env: dict[str, str]) -> None:
        """Called when a running service is kept; restore in-memory secrets from secrets.env."""

    def secrets_env(self, record: ServiceRecord) -> dict[str, str]:
        """KEY=VALUE lines this service contributes to secrets.env."""
        return {}

    def playbook_fragment(self, record: ServiceRecord) -> dict[str, Any]:
        """Keys this service contributes to the sandbox environment in sandbox.yaml."""
        return {}

    def fresh_dir(self, state: Path) -> Path:
        """Recreate this service's directory empty (0755 so the postgres user can traverse it)."""
        d = self.service_dir(state)
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        d.chmod(0o755)
        return d
