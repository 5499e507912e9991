"""SandboxState: what runs in a state dir, persisted as state.json (no passwords; those are in secrets.env)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pydantic import BaseModel, Field

from runbook.engine.config import PROJECT_ROOT, read_env_file
from runbook.engine.prefect_env import AUTH_ENV, AUTH_FILE, api_url, client_env, read_auth_string

from .base import ServiceRecord
from .postgres import admin_conninfo
from .redis import redis_url

STATE_FILE = "state.json"
PLAYBOOK_DIR = "playbooks"
PLAYBOOK_FILE = "sandbox.yaml"
SECRETS_FILE = "secrets.env"
STATE_VERSION = 1


class SandboxState(BaseModel):
    """The sandbox in one state dir: per-service records plus where the generated files are."""

    state_dir: Path
    services: dict[str, ServiceRecord] = Field(default_factory=dict)

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def playbook_dir(self) -> Path:
        """Directory holding the generated playbook and its secrets.env (point the engine here)."""
        return self.state_dir / PLAYBOOK_DIR

    @property
    def playbook_path(self) -> Path:
        return self.playbook_dir / PLAYBOOK_FILE

    @property
    def secrets_env_path(self) -> Path:
        return self.playbook_dir / SECRETS_FILE

    def running(self) -> list[str]:
        """Names of the services currently marked running."""
        return [name for name, rec in self.services.items() if rec.running]

    @property
    def dsn_admin(self) -> str | None:
        """Superuser conninfo over the unix socket (trust auth, no password); None without postgres."""
        rec = self.services.get("postgres")
        if rec is None:
            return None
        return admin_conninfo(rec)

    @property
    def prefect_api_url(self) -> str | None:
        """http://127.0.0.1:PORT/api of the sandbox Prefect server; None without it."""
        rec = self.services.get("prefect")
        if rec is None:
            return None
        return api_url(rec.port)

    @property
    def prefect_api_auth(self) -> str | None:
        """The auth string the sandbox's Prefect server demands (kept in .sandbox/prefect-api-auth, mode 0600)."""
        if "prefect" not in self.services:
            return None
        return read_auth_string(self.state_dir / AUTH_FILE)

    def prefect_env(self) -> dict[str, str]:
        """PREFECT_API_URL and PREFECT_API_AUTH_STRING of the sandbox's server (empty without it): a client
        process's environment, or Prefect ``temporary_settings`` updates."""
        api = self.prefect_api_url
        return client_env(api, self.prefect_api_auth) if api else {}

    @property
    def redis_url(self) -> str | None:
        """redis://127.0.0.1:PORT/0 of the sandbox Redis; None without it."""
        rec = self.services.get("redis")
        if rec is None:
            return None
        return redis_url(rec.port)

    def engine_env(self) -> dict[str, str]:
        """What points the engine at this sandbox's playbook (beside the project's): RUNBOOK_PLAYBOOKS, and the
        auth string its Prefect server demands (PREFECT_API_AUTH_STRING; which server a run goes to,
        PREFECT_API_URL, stays each caller's choice: see ``prefect_env``).

        The engine never looks for the sandbox by itself (a production process must not pick up a sandbox
        environment left in a checkout); tests, the demo, benchmarks and `runbook sandbox env` set it.
        """
        auth = self.prefect_api_auth
        return {"RUNBOOK_PLAYBOOKS": os.pathsep.join([str(PROJECT_ROOT / "playbooks"), str(self.playbook_dir)]),
                **({AUTH_ENV: auth} if auth else {})}

    def env_vars(self) -> dict[str, str]:
        """The KEY=VALUE pairs of secrets.env (empty when it does not exist)."""
        return read_env_file(self.secrets_env_path)


def load(state_dir: Path) -> SandboxState:
    """Read state.json (an absent file means nothing was started). Records load with running=False."""
    state = SandboxState(state_dir=state_dir)
    try:
        raw = json.loads(state.state_file.read_text())
    except FileNotFoundError:
        return state
    for name, rec in raw.get("services", {}).items():
        state.services[name] = ServiceRecord.model_validate({**rec, "name": name, "running": False})
    return state


def save(state: SandboxState) -> None:
    """Write state.json atomically."""
    payload = {
        "version": STATE_VERSION,
        "services": {
            name: rec.model_dump(mode="json", exclude={"running", "secrets"}) for name, rec in state.services.items()
        },
    }
    write_atomic(state.state_file, json.dumps(payload, indent=2) + "\n", 0o644)


def write_atomic(path: Path, text: str, mode: int) -> None:
    """Write via a temp file in the same dir + rename, created with `mode` from the start (0600 for secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
