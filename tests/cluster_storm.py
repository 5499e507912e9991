"""An alert storm against the deploy/cluster shape while one intake, one executor and one API replica are killed:
shared by tests/e2e/test_cluster.py (which asserts) and bench/bench_cluster.py (which prints figures)."""

from __future__ import annotations

import copy
import secrets
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from runbook.app.reconcile import CLAIM_PREFIX, OCCURRENCE_TAG
from runbook.engine.config import PROJECT_ROOT
from runbook.sandbox import SandboxState
from runbook.sandbox.cluster import Cluster, restart, start_cluster
from tests import intake_harness as harness

ROUTE = "cluster-storm"  # db-slowness, a dry run: about a second a run
SLOW_ROUTE = "cluster-slow"  # memory-leak sampling for 10 s: runs an executor still holds when it dies
ROUTES = harness.routes_yaml(
    harness.db_route(ROUTE, {"alertname": "ClusterStorm"}, mode="dry_run"),
    {"name": SLOW_ROUTE, "match": {"alertname": "ClusterSlow"}, "procedure": "memory-leak", "env": "sandbox",
     "params": {"samples": 10, "interval_s": 1.0}, "policy": {"mode": "dry_run", "cooldown_s": 0}},
)
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@contextmanager
def running_cluster(state: SandboxState, work: Path) -> Iterator[Cluster]:
    routes = work / "routes"
    routes.mkdir(parents=True, exist_ok=True)
    (routes / "routes.yaml").write_text(ROUTES)
    # the platform and the sandbox environment, not the production routes: only the storm's route may match
    cluster = start_cluster(work / "cluster", state.services["postgres"],
                            [PROJECT_ROOT / "playbooks" / "pafar.yaml", state.playbook_dir, routes])
    try:
        yield cluster
    finally:
        cluster.stop()


@dataclass
class StormResult:
    occurrences: int
    alerts_sent: int
    acks_s: list[float] = field(default_factory=list)
    failed_posts: int = 0  # attempts answered with an error or not at all (then retried, as Alertmanager does)
    runs_per_occurrence: Counter[str] = field(default_factory=Counter)
    states: Counter[str] = field(default_factory=Counter)
    stranded: list[str] = field(default_factory=list)
    killed_executor_runs: int = 0
    executor_death_to_finished_s: float | None = None
    unrelated_runs: int = 0


def _webhooks(fingerprints: list[str], starts_at: str, per_webhook: int, alertname: str) -> list[dict[str, Any]]:
    doc = harness.alert(alertname, {"db": "main"}, starts_at=starts_at)
    template = doc["alerts"][0]
    hooks = []
    for i in range(0, len(fingerprints), per_webhook):
        hook = copy.deepcopy(doc)
        hook["alerts"] = [{**template, "fingerprint": fp} for fp in fingerprints[i:i + per_webhook]]
        hooks.append(hook)
    return hooks


def _post_until_acked(http: httpx.Client, cluster: Cluster, hook: dict[str, Any], result: StormResult,
                      deadline_s: float = 60) -> None:
    """Post like Alertmanager: an error or no answer is retried (with a short backoff) until acknowledged."""
    deadline = time.monotonic() + deadline_s
    while True:
        t = time.perf_counter()
        try:
            resp = http.post(f"{cluster.intake_url}/alerts", json=hook,
                             headers={"Authorization": f"Bearer {cluster.token}"})
            if resp.status_code == 200:
                result.acks_s.append(time.perf_counter() - t)
                return
        except httpx.HTTPError:
            pass
        result.failed_posts += 1
        if time.monotonic() > deadline:
            raise AssertionError(f"no intake acknowledged a webhook within {deadline_s} s")
        time.sleep(0.2)


def _runs(http: httpx.Client, route: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    while True:
        page = http.post("/flow_runs/filter", json={"flow_runs": {"tags": {"all_": [f"route:{route}"]}},
                                                  "limit": 200, "offset": len(runs)}).json()
        runs += page
        if len(page) < 200:
            return runs


def _claims(http: httpx.Client, run_id: str) -> list[str]:
    history = http.get("/flow_run_states/", params={"flow_run_id": run_id}).json()
    return [s.get("message") or "" for s in history if s["type"] == "PENDING"]


def run_storm(cluster: Cluster, occurrences: int = 30, rounds: int = 8, per_webhook: int = 10,
              kill_after_round: int = 2, restart_intake_after_round: int = 5,
              settle_timeout_s: float = 300, slow: bool = False) -> StormResult:
    """``rounds`` resends of ``occurrences`` alerts (Alertmanager resends a firing group every group_interval),
    from two senders; after round ``kill_after_round`` one intake, one executor and one API replica get kill -9;
    the intake comes back after ``restart_intake_after_round`` (systemd's Restart=always); the executor and the
    API replica stay dead. Then wait until every occurrence's run is final (or ``settle_timeout_s``). With ``slow``
    the alerts route to a 10 s memory-leak dry run, so the killed executor still holds runs when it dies."""
    fingerprints = [secrets.token_hex(8) for _ in range(occurrences)]
    starts_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    route = SLOW_ROUTE if slow else ROUTE
    hooks = _webhooks(fingerprints, starts_at, per_webhook, "ClusterSlow" if slow else "ClusterStorm")
    result = StormResult(occurrences=occurrences, alerts_sent=occurrences * rounds)
    victim = cluster.member("executor1")
    assert victim.proc is not None
    victim_name = f"runbook-{socket.gethostname()}-{victim.proc.pid}"
    killed_at = time.time()
    with httpx.Client(timeout=10, trust_env=False) as http:
        for rnd in range(1, rounds + 1):
            senders = [threading.Thread(target=lambda h=h: _post_until_acked(http, cluster, h, result))
                       for h in hooks]
            for s in senders:
                s.start()
            for s in senders:
                s.join()
            if rnd == kill_after_round:
                _until_holding(cluster, route, victim_name)  # kill it while it runs something
                killed_at = time.time()
                for name in ("executor1", "intake1", "api1"):
                    cluster.member(name).kill(signal.SIGKILL)
            if rnd == restart_intake_after_round:
                restart(cluster.member("intake1"))
            time.sleep(0.5)
    with httpx.Client(base_url=cluster.api_url, timeout=15, trust_env=False, headers=cluster.api_headers()) as api:
        deadline = time.monotonic() + settle_timeout_s
        victim_runs: set[str] = set()
        while True:
            runs = _runs(api, route)
            mine = [r for r in runs if any(t.startswith(OCCURRENCE_TAG) for t in r["tags"])]
            done = len({_occurrence(r) for r in mine}) >= occurrences and all(
                r["state"]["type"] in FINAL for r in mine)
            if not victim_runs:
                victim_runs = {r["id"] for r in mine
                               if any(m == f"{CLAIM_PREFIX}{victim_name}" for m in _claims(api, r["id"]))}
            if done or time.monotonic() > deadline:
                break
            time.sleep(1)
    result.runs_per_occurrence = Counter(_occurrence(r) for r in mine)
    result.states = Counter(r["state"]["type"] for r in mine)
    result.stranded = [r["id"] for r in mine if r["state"]["type"] not in FINAL]
    result.unrelated_runs = len(runs) - len(mine)
    result.killed_executor_runs = len(victim_runs)
    ends = [r["end_time"] for r in mine if r["id"] in victim_runs]
    if victim_runs and all(ends):  # when the last run the dead executor held was finished by the other one
        result.executor_death_to_finished_s = max(
            datetime.fromisoformat(e.replace("Z", "+00:00")).timestamp() for e in ends) - killed_at
    return result


def _until_holding(cluster: Cluster, route: str, executor: str, timeout_s: float = 60) -> None:
    """Wait until ``executor`` has claimed a run of ``route`` that is not finished (or ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=cluster.api_url, timeout=15, trust_env=False, headers=cluster.api_headers()) as api:
        while time.monotonic() < deadline:
            live = [r for r in _runs(api, route) if r["state"]["type"] in ("PENDING", "RUNNING")]
            if any(f"{CLAIM_PREFIX}{executor}" in _claims(api, r["id"]) for r in live):
                return
            time.sleep(0.2)


def _occurrence(run: dict[str, Any]) -> str:
    return next(t for t in run["tags"] if t.startswith(OCCURRENCE_TAG))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]
