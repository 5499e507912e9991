"""Benchmark: a bad deployment rolled back by service-outage against the same steps by hand, in one run.

On the sandbox's real Podman Docker API and Prefect server, each round deploys a "v2" of the backend whose health
check fails (runbook.sandbox.incidents.BadDeploy) over its replica, then brings the backend back to health:
  by hand   what the runbook's "implement a fix or rollback" means with docker commands, through the SDK:
            `docker stop`, `docker rm`, `docker run` of the old image with the replica's configuration (the person
            already knows which image and configuration: no diagnosis), then poll /health until it answers
  engine    service-outage with dry_run=False in a warm process (an operator's `--apply`, or an alert route's
            `auto`): health, containers, deployments, logs, hosts, the last known good, the rollback plan, apply
            one replica at a time, verify; timed until /health answers
  alert     issue 13's path: a ServiceDown webhook to the intake (route under `approve`), the warm executor's
            service-outage waits with the rollback in its plan, approved (`runbook approve`'s REST call) as soon as
            it asks, then timed until /health answers: alert receipt -> healthy after approval
By hand and engine from the moment v2 is deployed, alert from the webhook's receipt, to /health answering 2xx.
Prints the medians of REPEATS rounds and the ratios. The approval itself (a person reading the plan) is not timed:
it is the same wait either way.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runbook import sandbox  # noqa: E402
from runbook.app.remote_run import api_client, resume  # noqa: E402
from tests.intake_harness import alert, routes_yaml, running_intake  # noqa: E402

# an alert route under `approve`, as issue 13's path: ServiceDown for the backend, a person approves the rollback
ROUTE = {"name": "rollback-bench", "match": {"alertname": "ServiceDownRollbackBench"},
         "procedure": "service-outage", "env": "sandbox",
         "labels": {"service": {"label": "job", "inventory": "services", "map": {"pafar-backend": "backend"}}},
         "params": {"notify": False}, "policy": {"mode": "approve", "cooldown_s": 0, "approval_timeout_s": 300}}

REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
HEALTH_TIMEOUT_S = 60.0


def wait_healthy(url: str) -> None:
    from tasks.container_remediations import answers_2xx

    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while not answers_2xx(url):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {HEALTH_TIMEOUT_S:g} s")
        time.sleep(0.05)


def main() -> None:
    print("starting sandbox (podman, postgres, prefect)...", flush=True)
    state = sandbox.up()
    os.environ.update(state.engine_env())
    from prefect.settings import temporary_settings

    from flows.service_outage import service_outage
    from runbook.engine.config import load_playbooks
    from runbook.engine.procedure import attended_run, flush_run_records
    from runbook.sandbox.incidents import BadDeploy, docker_client
    from tasks.container_remediations import service_health_url
    from tasks.last_known_good import create_kwargs, load_last_known_good

    env = load_playbooks().environment("sandbox")
    assert env.docker is not None
    url, health = env.docker.base_url, service_health_url(env, "backend")
    assert health is not None

    def by_hand() -> None:
        """docker stop / rm / run of the known-good image and configuration, then /health."""
        record = load_last_known_good("sandbox", "backend")  # the configuration a person would copy by hand
        assert record is not None
        spec = record.replicas[0]
        started = time.perf_counter()
        with docker_client(url) as client:
            old = client.containers.get(spec.name)
            old.stop(timeout=10)
            old.remove()
            client.containers.run(**create_kwargs(spec, record.image))
        wait_healthy(health)
        hand.append(time.perf_counter() - started)

    def engine() -> None:
        started = time.perf_counter()
        doc = service_outage(env="sandbox", dry_run=False, notify=False)
        wait_healthy(health)
        took = time.perf_counter() - started
        rollback = next(a for a in doc["actions"] if a["name"] == "rollback-service")
        assert rollback["changed"] and rollback["verified"], rollback
        runs.append(took)

    def through_alert(it: Any) -> None:
        """Alert -> the run waits for approval -> approved at once -> /health answers."""
        started = time.perf_counter()
        fp = os.urandom(8).hex()
        resp = it.post(alert("ServiceDownRollbackBench", {"job": "pafar-backend"}, fingerprint=fp)).json()
        assert resp["results"][0]["outcome"] == "run", resp
        [run] = it.wait_runs(ROUTE["name"], fp, 60)
        assert it.wait_state(run["id"], {"PAUSED"}, 180) == "PAUSED", "it did not wait for approval"
        with api_client(it.api_url, 10) as http:
            resume(http, run["id"], approve=True, approver="bench", reason="roll back v2")
        wait_healthy(health)
        alerts.append(time.perf_counter() - started)
        assert it.wait_state(run["id"], {"COMPLETED", "FAILED", "CRASHED"}, 180) == "COMPLETED"

    def round_of(fix: Callable[[], None]) -> None:
        bad = BadDeploy(url).start()
        try:
            fix()
        finally:
            bad.stop()
            wait_healthy(health)

    hand: list[float] = []
    runs: list[float] = []
    alerts: list[float] = []
    with temporary_settings(updates=state.prefect_env()), attended_run():
        doc = service_outage(env="sandbox", dry_run=True, notify=False, lkg_min_uptime_s=0)  # warm-up; records LKG
        assert any(n.startswith("last known good of backend recorded") for n in doc["notes"]), doc["notes"]
        for _ in range(REPEATS):
            round_of(by_hand)
            round_of(engine)
        flush_run_records()
    with tempfile.TemporaryDirectory(prefix="bench-rollback-") as work, \
            running_intake(state, Path(work), routes=routes_yaml(ROUTE)) as it:
        for _ in range(REPEATS):
            round_of(lambda: through_alert(it))
    h, e, a = statistics.median(hand), statistics.median(runs), statistics.median(alerts)
    print(f"\nbad deployment -> backend healthy again (median of {REPEATS}):")
    print(f"  by hand (docker stop/rm/run of the known image, /health)  {h:7.2f} s   1.00x")
    print(f"  service-outage --apply (diagnose, plan, roll back, verify) {e:7.2f} s   {e / h:.2f}x")
    print(f"  alert -> healthy, approved as soon as asked                {a:7.2f} s   {a / h:.2f}x")
    print(f"  samples: by hand {', '.join(f'{x:.2f}' for x in hand)}; engine {', '.join(f'{x:.2f}' for x in runs)}; "
          f"alert {', '.join(f'{x:.2f}' for x in alerts)}")


if __name__ == "__main__":
    main()
