"""Real local services (PostgreSQL, Redis, Prefect server) for tests, the demo and benchmarks.

`up()` starts them on free loopback ports under a state dir and writes a playbook environment
(playbooks/sandbox.yaml + secrets.env) pointing at them; `down()` stops them by PID and removes it all.
Each service is one module with the same shape (start/is_healthy/stop + its system requirements), so
more services slot in by adding a module and registering it in lifecycle.SERVICES.
"""

from __future__ import annotations

from .base import Requirement, Service, ServiceRecord
from .errors import MissingSystemPackage, SandboxError
from .lifecycle import ALL_SERVICES, SERVICES, down, project_root, state_dir, status, up
from .state import SandboxState

__all__ = [
    "ALL_SERVICES",
    "SERVICES",
    "MissingSystemPackage",
    "Requirement",
    "SandboxError",
    "SandboxState",
    "Service",
    "ServiceRecord",
    "down",
    "project_root",
    "state_dir",
    "status",
    "up",
]
