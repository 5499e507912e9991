"""A running intake for tests and benchmarks: deployments on the sandbox Prefect server, a warm executor and the
intake app served by uvicorn on a free loopback port, with routes written for the sandbox environment."""

from __future__ import annotations

import copy
import json
import os
import resource
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import yaml
from psycopg import sql
from psycopg.conninfo import make_conninfo

from runbook.app.executor import Executor
from runbook.app.intake.app import IntakeSettings, create_app
from runbook.app.intake.limits import Limits
from runbook.app.intake.server import IntakeServer, server_config
from runbook.engine.config import PROJECT_ROOT
from runbook.sandbox import SandboxState
from runbook.sandbox.net import free_ports
from tests.prefect_runs import api_headers

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "alertmanager"  # copied from shared/fixtures

ROUTES = """
routes:
  - name: db-auto
    match: {alertname: DatabaseConnectionHigh}
    procedure: db-slowness
    env: sandbox
    params: {long_query_s: 1, idle_in_transaction_s: 1}
    labels:
      database: {label: db, inventory: databases}
    policy: {mode: auto, cooldown_s: 0, breaker: {max_remediations: 2, window_s: 3600}}
  - name: db-cooldown
    match: {alertname: DbCooldownTest}
    procedure: db-slowness
    env: sandbox
    labels:
      database: {label: db, inventory: databases}
    policy: {mode: diagnose, cooldown_s: 600}
  - name: db-approve-timeout
    match: {alertname: DbApproveTimeoutTest}
    procedure: db-slowness
    env: sandbox
    params: {long_query_s: 1, idle_in_transaction_s: 1}
    policy: {mode: approve, cooldown_s: 0, approval_timeout_s: 3}
  - name: db-approve
    match: {alertname: DbApproveTest}
    procedure: db-slowness
    env: sandbox
    params: {long_query_s: 1, idle_in_transaction_s: 1}
    labels:
      database: {label: db, inventory: databases}
    policy: {mode: approve, cooldown_s: 0, approval_timeout_s: 120}
"""


def db_route(name: str, match: dict[str, str], mode: str = "diagnose", **extra: Any) -> dict[str, Any]:
    """A route to db-slowness on the sandbox, its database named by the alert's ``db`` label, no cooldown."""
    return {"name": name, "match": match, "procedure": "db-slowness", "env": "sandbox",
            "params": {"long_query_s": 1, "idle_in_transaction_s": 1},
            "labels": {"database": {"label": "db", "inventory": "databases"}},
            "policy": {"mode": mode, "cooldown_s": 0}, **extra}


def routes_yaml(*routes: dict[str, Any]) -> str:
    return yaml.safe_dump({"routes": list(routes)}, sort_keys=False)


@dataclass
class Intake:
    url: str
    token: str
    api_url: str
    executor: Executor
    state_dir: Path
    app: Any
    http: httpx.Client

    def post(self, payload: Any, token: str | None = None, **kw: Any) -> httpx.Response:
        token = self.token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}  # "": no header at all
        if not isinstance(payload, dict | list):  # bytes, str or an iterator of chunks: sent as they are
            return self.http.post(f"{self.url}/alerts", content=payload, headers=headers, **kw)
        return self.http.post(f"{self.url}/alerts", json=payload, headers=headers, **kw)

    def runs(self, tag: str) -> list[dict[str, Any]]:
        body = {"flow_runs": {"tags": {"all_": [tag]}}}
        return httpx.post(f"{self.api_url}/flow_runs/filter", headers=api_headers(), json=body, timeout=10).json()

    def runs_for(self, route: str, fingerprint: str) -> list[dict[str, Any]]:
        """The runs of one alert (by fingerprint) on one route, through the intake's own record of occurrences."""
        keys = [o.key for o in self.app.state.store.find(fingerprint, route)]
        return [r for k in keys for r in self.runs(f"occurrence:{k}")]

    def wait_runs(self, route: str, fingerprint: str, timeout_s: float = 30) -> list[dict[str, Any]]:
        """The dispatcher creates runs just after the acknowledgement: wait for them."""
        deadline = time.monotonic() + timeout_s
        while not (runs := self.runs_for(route, fingerprint)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return runs

    def metric(self, line_start: str) -> float:
        """The value of the first /metrics sample whose line starts with ``line_start`` (0 when absent)."""
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def wait_state(self, run_id: str, states: set[str], timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = httpx.get(f"{self.api_url}/flow_runs/{run_id}", headers=api_headers(),
                              timeout=10).json()["state"]["type"]
            if state in states:
                return state
            time.sleep(0.2)
        raise AssertionError(f"run {run_id} still {state} after {timeout_s} s (wanted {states})")


def alert(alertname: str, labels: dict[str, str] | None = None, fingerprint: str | None = None,
          status: str = "firing", starts_at: str | None = None) -> dict[str, Any]:
    """A webhook built from the real captured payload, with our labels."""
    doc = json.loads((FIXTURES / f"servicedown-{status}.json").read_text())
    a = copy.deepcopy(doc["alerts"][0])
    a["labels"] = {"alertname": alertname, **(labels or {})}
    a["fingerprint"] = fingerprint or secrets.token_hex(8)
    a["status"] = status
    # a fresh startsAt by default: the sandbox's Prefect server outlives a test session, and the same occurrence
    # (route, fingerprint, startsAt) would get the earlier session's run back through its idempotency key
    a["startsAt"] = starts_at or datetime.now(UTC).isoformat().replace("+00:00", "Z")
    doc["alerts"] = [a]
    doc["status"] = status
    return doc


@contextmanager
def running_intake(state: SandboxState, work_dir: Path, routes: str = ROUTES, executor: bool = True,
                   api_url: str | None = None, playbook_dirs: list[Path] | None = None,
                   limits: Limits | None = None, state_dsn: str | None = None,
                   api_auth: str | None = None, executor_events: bool = True,
                   executor_poll_s: float = 1.0) -> Iterator[Intake]:
    """The intake app on a free loopback port; its state in ``state_dsn``'s PostgreSQL when given, else SQLite.
    ``executor_events=False`` (and a long ``executor_poll_s``): the executor runs only what the intake hands it."""
    from runbook.app.serve import register_deployments

    api = api_url or state.prefect_api_url
    assert api
    register_deployments(state.prefect_api_url)
    routes_dir = work_dir / "routes"
    routes_dir.mkdir(parents=True, exist_ok=True)
    (routes_dir / "routes.yaml").write_text(routes)
    from prefect.settings import temporary_settings

    ex = Executor(poll_s=executor_poll_s, events=executor_events)
    if executor:
        with temporary_settings(updates=state.prefect_env()):
            ex.start()  # its threads keep this settings context
    token = secrets.token_urlsafe(24)
    app = create_app(IntakeSettings(
        token=token, prefect_api_url=api, prefect_api_auth=api_auth, state_dir=work_dir / "intake", state_dsn=state_dsn,
        # the platform (pafar.yaml) but not the production routes: only this test's routes may match
        playbook_dirs=[*(playbook_dirs or [PROJECT_ROOT / "playbooks" / "pafar.yaml", state.playbook_dir]),
                       routes_dir],
        on_created=ex.submit if executor else None, limits=limits or Limits(),
    ))
    port = free_ports(1)[0]
    # the server `runbook intake` runs: bounded connections, the same protocol and limits
    server = IntakeServer(server_config(app, "127.0.0.1", port, limits or Limits(),
                                          on_close=app.state.metrics.connection_closed))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    http = httpx.Client(timeout=30, trust_env=False)
    try:
        yield Intake(f"http://127.0.0.1:{port}", token, api, ex, work_dir, app, http)
    finally:
        http.close()
        server.should_exit = True
        thread.join(10)
        if executor:
            ex.stop(grace_s=0)


@contextmanager
def alerts_through(state: SandboxState, it: Intake, rules: dict[str, Any], work_dir: Path,
                   scrape_jobs: list[dict[str, Any]] | None = None) -> Iterator[None]:
    """The sandbox's Alertmanager posting to the intake (with its token, resending every 2 s) and its Prometheus
    evaluating ``rules`` (plus ``scrape_jobs``) instead of the shipped ones; both configs restored afterwards."""
    prom, am = state.services["prometheus"], state.services["alertmanager"]
    am_path, prom_path = Path(am.paths["config"]), Path(prom.paths["config"])
    original_am, original_prom = am_path.read_text(), prom_path.read_text()
    am_cfg = yaml.safe_load(original_am)
    for r in am_cfg["receivers"]:
        r["webhook_configs"] = [{"url": f"{it.url}/alerts", "send_resolved": True, "max_alerts": 0,
                                 "http_config": {"authorization": {"type": "Bearer", "credentials": it.token}}}]
    am_cfg["route"]["repeat_interval"] = "2s"  # resend the firing alert often: each must be a duplicate
    am_path.write_text(yaml.safe_dump(am_cfg))
    rules_file = work_dir / "fast-rules.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    prom_cfg = yaml.safe_load(original_prom)
    prom_cfg["rule_files"] = [str(rules_file)]
    prom_cfg["scrape_configs"] = [*prom_cfg.get("scrape_configs", []), *(scrape_jobs or [])]
    prom_path.write_text(yaml.safe_dump(prom_cfg))
    for port in (am.port, prom.port):
        httpx.post(f"http://127.0.0.1:{port}/-/reload", timeout=10).raise_for_status()
    try:
        yield
    finally:
        am_path.write_text(original_am)
        prom_path.write_text(original_prom)
        for port in (am.port, prom.port):
            httpx.post(f"http://127.0.0.1:{port}/-/reload", timeout=10)


@contextmanager
def state_database(state: SandboxState) -> Iterator[str]:
    """A dedicated database and login role on the sandbox's PostgreSQL for an intake's shared state; the DSN (TCP
    on 127.0.0.1, with a password) is yielded, and both are dropped afterwards."""
    name = f"intake_state_{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(18)
    rec = state.services["postgres"]
    admin = make_conninfo(host=rec.paths["socket_dir"], port=rec.port, user="postgres", dbname="postgres")
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(name)))
    try:
        yield f"postgresql://{name}:{password}@127.0.0.1:{rec.port}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


PARTIAL_HEADER = b"POST /alerts HTTP/1.1\r\nHost: intake\r\nContent-Type: appl"  # and then nothing more


def stall_connections(port: int, n: int, payload: bytes = PARTIAL_HEADER) -> list[socket.socket]:
    """``n`` connections that send ``payload`` (by default half a request header) and then stop."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(payload)
        socks.append(s)
    return socks


def closed_by_server(socks: list[socket.socket], timeout_s: float) -> int:
    """How many of these connections the server closed (EOF, after an optional 408, or a reset) within
    ``timeout_s``; every socket is closed on this side afterwards."""
    closed = 0
    deadline = time.monotonic() + timeout_s
    for s in socks:
        try:
            while True:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                if not s.recv(4096):
                    closed += 1
                    break
        except ConnectionResetError:
            closed += 1
        except TimeoutError:
            pass
        finally:
            s.close()
    return closed


@dataclass
class IntakeProcess:
    url: str
    port: int
    token: str
    log: Path  # its stdout and stderr
    store: Path  # its SQLite store

    def post(self, payload: Any, **kw: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/alerts", json=payload, headers={"Authorization": f"Bearer {self.token}"},
                          **kw)


@contextmanager
def intake_subprocess(state: SandboxState, work_dir: Path, routes: str, nofile: int | None = None,
                      state_dsn: str | None = None) -> Iterator[IntakeProcess]:
    """`runbook intake` in its own process against the sandbox's Prefect server, optionally under an open-file
    limit it cannot raise (``nofile`` soft and hard, as systemd's LimitNOFILE sets both)."""
    from runbook.app.serve import register_deployments

    register_deployments(state.prefect_api_url)
    routes_dir = work_dir / "routes"
    routes_dir.mkdir(parents=True, exist_ok=True)
    (routes_dir / "routes.yaml").write_text(routes)
    port, token = free_ports(1)[0], secrets.token_urlsafe(24)
    playbooks = [PROJECT_ROOT / "playbooks" / "pafar.yaml", state.playbook_dir, routes_dir]
    env = {**os.environ, "PREFECT_API_URL": state.prefect_api_url, "RUNBOOK_INTAKE_TOKEN": token,
           "RUNBOOK_PLAYBOOKS": os.pathsep.join(map(str, playbooks))}
    if state_dsn:
        env["RUNBOOK_INTAKE_STATE_DSN"] = state_dsn

    def limit_files() -> None:
        if nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    it = IntakeProcess(f"http://127.0.0.1:{port}", port, token, work_dir / "intake.log",
                       work_dir / "state" / "intake.sqlite")
    with open(it.log, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "runbook.app.cli", "intake", "--port", str(port),
                                 "--state", str(work_dir / "state")], env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=limit_files)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{it.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"runbook intake exited: {it.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.3)
        yield it
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
