"""up / status / down of the sandbox: which services run in a state dir, started concurrently, stopped by PID."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

from runbook.engine.config import read_env_file
from runbook.engine.daemon import free_ports
from runbook.engine.prefect_env import AUTH_FILE

from . import generated, net
from .alertmanager import SERVICE as ALERTMANAGER
from .backend import SERVICE as BACKEND
from .backups import SERVICE as BACKUPS
from .base import Service, ServiceRecord
from .comms import SERVICE as COMMS
from .errors import SandboxError
from .node_exporter import SERVICE as NODE_EXPORTER
from .opensearch import SERVICE as OPENSEARCH
from .podman import SERVICE as PODMAN
from .postgres import SERVICE as POSTGRES
from .prefect_server import SERVICE as PREFECT
from .prometheus import SERVICE as PROMETHEUS
from .redis import SERVICE as REDIS
from .sshd import SERVICE as SSHD
from .state import STATE_FILE, SandboxState, load, save

# Order matters: it is the order of ALL_SERVICES, of blocks in sandbox.yaml and of state.json.
SERVICES: dict[str, Service] = {svc.name: svc for svc in (
    POSTGRES, REDIS, PREFECT,
    BACKEND, NODE_EXPORTER, ALERTMANAGER, PROMETHEUS, OPENSEARCH,  # issue 4: metrics and logs
    PODMAN, SSHD,  # issue 3: containers (Podman's Docker API) and hosts (sshd)
    BACKUPS,  # issue 5: backup directory, restore role (after postgres and sshd)
    COMMS,  # issue 13: status-page and incident-channel stand-ins
)}
ALL_SERVICES: tuple[str, ...] = tuple(SERVICES)
LOCK_FILE = ".lock"
LOCK_TIMEOUT_S = 180.0


def project_root() -> Path:
    """The checkout holding runbook/ (the default sandbox lives in its .sandbox/)."""
    return Path(__file__).resolve().parents[2]


def state_dir() -> Path:
    """$RUNBOOK_SANDBOX_DIR, else <project root>/.sandbox, read at call time so tests can redirect it.

    Services run as other OS users (PostgreSQL as `postgres`; sshd reads the key file and serves SFTP as its own
    user), so they must be able to traverse the state dir. A checkout in a directory others cannot enter (root's
    0700 home: `git clone ... ~/runbook`) gets its sandbox under the system temp dir instead, named for the checkout
    (so every clone has its own and finds it again).
    """
    explicit = os.environ.get("RUNBOOK_SANDBOX_DIR")
    if explicit:
        return Path(explicit)
    root = project_root()
    if _others_can_enter(root):
        return root / ".sandbox"
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"runbook-sandbox-{digest}"


def _others_can_enter(path: Path) -> bool:
    """Every directory from / to ``path`` is searchable by other users (o+x)."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


def up(only: Sequence[str] | None = None, state_dir: Path | None = None) -> SandboxState:
    """Start the requested services (all by default), reusing any that already run healthy.

    Idempotent: a second call returns the same PIDs and ports. Services that run but were not requested
    are kept. Writes state.json and the generated playbook + secrets.env. Raises ValueError for an unknown
    name, MissingSystemPackage before starting anything if a binary is absent, SandboxError if a service
    fails: then the services this call started are stopped again (a half-started sandbox must not leave processes
    and container mounts behind); services that were already running are left as they were.
    """
    names = _validate(only)
    root = _resolve(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # the postgres OS user must traverse it
    with _locked(root):
        state = load(root)
        env = read_env_file(state.secrets_env_path)
        kept: dict[str, ServiceRecord] = {}
        for name, rec in state.services.items():
            svc = SERVICES.get(name)
            if svc is None:
                continue
            if svc.owns_process(rec) and svc.is_healthy(rec):
                svc.reuse(rec, env)
                rec.running = True
                kept[name] = rec
            else:
                svc.stop(rec)  # a leftover that no longer answers (stop only signals it if still ours)
                svc.clean(root)
        to_start = [n for n in names if n not in kept]
        for name in [n for n in kept if set(SERVICES[n].uses) & set(to_start)]:
            # it used a peer that is being started afresh (e.g. Prefect on a PostgreSQL that died): restart it
            SERVICES[name].stop(kept.pop(name))
            SERVICES[name].clean(root)
            to_start.append(name)
        to_start = [n for n in ALL_SERVICES if n in to_start]
        for name in to_start:
            SERVICES[name].check_requirements()
        started: dict[str, ServiceRecord] = {}
        errors: dict[str, BaseException] = {}
        try:
            _start_all(root, to_start, started, errors, kept)
        finally:
            state.services = {n: kept[n] if n in kept else started[n] for n in SERVICES if n in kept or n in started}
            save(state)
            generated.write(state, SERVICES)
        if errors:
            details = "\n\n".join(f"{name}: {exc}" for name, exc in errors.items())
            undone = _stop_started(root, state, started)
            note = f"\n(stopped again what this call had started: {', '.join(undone)})" if undone else ""
            raise SandboxError(f"sandbox services failed to start: {', '.join(errors)}\n{details}{note}")
        return state


def _stop_started(root: Path, state: SandboxState, started: dict[str, ServiceRecord]) -> list[str]:
    """Stop (by PID, in reverse start order) the services one failed `up` started; forget them in state.json."""
    undone = []
    for name in reversed([n for n in ALL_SERVICES if n in started]):
        with contextlib.suppress(SandboxError, OSError):
            _stop_one(name, started[name], root)
            undone.append(name)
        state.services.pop(name, None)
    save(state)
    generated.write(state, SERVICES)
    return undone


def status(state_dir: Path | None = None) -> SandboxState:
    """The recorded services, each marked running only if its PID is still ours and its port answers."""
    state = load(_resolve(state_dir))
    for name, rec in state.services.items():
        svc = SERVICES.get(name)
        rec.running = svc is not None and svc.owns_process(rec) and svc.is_healthy(rec)
    return state


def down(state_dir: Path | None = None) -> list[str]:
    """Stop every process the sandbox started (by PID) and remove everything it created.

    Returns the names of the services that were running and got stopped. If one cannot be stopped, its
    record stays in state.json (so a retry can find it) and SandboxError is raised.
    """
    root = _resolve(state_dir)
    if not root.exists():
        return []
    with _locked(root):
        state = load(root)
        stopped: list[str] = []
        failed: dict[str, ServiceRecord] = {}
        errors: list[str] = []
        with ThreadPoolExecutor(max_workers=max(1, len(state.services))) as pool:
            futures = {name: pool.submit(_stop_one, name, rec, root) for name, rec in state.services.items()}
        for name, fut in futures.items():
            try:
                if fut.result():
                    stopped.append(name)
            except Exception as exc:
                failed[name] = state.services[name]
                errors.append(f"{name}: {exc}")
        if errors:
            state.services = failed
            save(state)
            raise SandboxError("could not stop: " + "\n".join(errors))
        for svc in SERVICES.values():
            svc.clean(root)
        shutil.rmtree(state.playbook_dir, ignore_errors=True)
        (root / STATE_FILE).unlink(missing_ok=True)
        (root / AUTH_FILE).unlink(missing_ok=True)  # the Prefect server's auth string lives as long as the sandbox
        (root / LOCK_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        root.rmdir()  # only if empty: never remove files we did not create
    return [n for n in ALL_SERVICES if n in stopped]


def _stop_one(name: str, rec: ServiceRecord, root: Path) -> bool:
    svc = SERVICES.get(name)
    if svc is None:
        return False
    was_running = svc.owns_process(rec)
    if was_running:
        svc.stop(rec)
        if net.port_accepts(rec.port, 0.5):
            raise SandboxError(f"port {rec.port} still accepts connections")
    svc.clean(root)
    return was_running


def _start_all(
    root: Path, names: list[str], started: dict[str, ServiceRecord], errors: dict[str, BaseException],
    kept: dict[str, ServiceRecord] | None = None,
) -> None:
    """Start services in threads so `up` takes about as long as the slowest one.

    A service that ``uses`` another one being started waits for it (a second wave) and receives its record.
    """
    if not names:
        return
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    first = [n for n in names if not set(SERVICES[n].uses) & set(names)]
    waves = [first, [n for n in names if n not in first]]
    pool = ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="sandbox")
    futures: dict[str, Future[ServiceRecord]] = {}
    try:
        for wave in waves:
            peers = {**(kept or {}), **started}
            current: dict[str, Future[ServiceRecord]] = {}
            for name in wave:
                svc = SERVICES[name]
                if any(u in errors for u in svc.uses):
                    errors[name] = SandboxError(f"not started: {', '.join(u for u in svc.uses if u in errors)} failed")
                    continue
                mine = {u: peers[u] for u in svc.uses if u in peers}
                current[name] = (pool.submit(svc.start, root, ports[name], mine) if svc.uses
                                 else pool.submit(svc.start, root, ports[name]))
            futures.update(current)
            wait(current.values())
            _collect(current, started, errors)
    finally:
        # even on Ctrl-C: let the starts finish and record them, so `down` can stop what did start
        pool.shutdown(wait=True)
        _collect(futures, started, errors)


def _collect(futures: dict[str, Future[ServiceRecord]], started: dict[str, ServiceRecord],
             errors: dict[str, BaseException]) -> None:
    for name, fut in futures.items():
        if not fut.done() or name in started or name in errors:
            continue
        exc = fut.exception()
        if exc is None:
            started[name] = fut.result()
        else:
            errors[name] = exc


def _validate(only: Sequence[str] | None) -> list[str]:
    if only is None:
        return list(ALL_SERVICES)
    if isinstance(only, str):
        only = [only]
    unknown = [n for n in only if n not in SERVICES]
    if unknown:
        raise ValueError(f"unknown sandbox service(s): {', '.join(unknown)}; valid: {', '.join(ALL_SERVICES)}")
    return [n for n in ALL_SERVICES if n in only]


def _resolve(path: Path | None) -> Path:
    return Path(path).resolve() if path is not None else state_dir().resolve()


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialize up/down on one state dir (two `up` calls must not start two clusters)."""
    with open(root / LOCK_FILE, "a") as fh:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SandboxError(f"another sandbox up/down holds {root / LOCK_FILE}") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
