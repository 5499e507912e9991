"""`runbook serve` and its pieces: a Prefect server, the deployments, the warm executor and the alert intake.

Embedded (the default): one command starts (or reuses) a local Prefect server on SQLite
(runbook.engine.prefect_env.local_prefect_server), registers the
deployments from the procedure catalog, runs the executor and the intake in this process, and stops all of it on Ctrl-C.
Scale-out: the same pieces as separate processes (`runbook intake`, `runbook worker`) against one Prefect
server on PostgreSQL; see the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from runbook.app.catalog import PROCEDURES
from runbook.app.intake.app import IntakeSettings, create_app
from runbook.app.intake.limits import Limits, raise_open_files_limit
from runbook.app.intake.server import IntakeServer, server_config
from runbook.app.remote_run import APPROVAL_TAG, PROCEDURE_TAG, api_client, deployment_filter, request
from runbook.engine.config import PROJECT_ROOT, load_playbooks


def register_deployments(api_url: str, work_pool: str = "runbook", auth: str | None = None) -> None:
    """Create the process work pool if missing and upsert one deployment per procedure of the catalog.

    The catalog (``@procedure`` in flows/) is the one list of procedures: each deployment's form comes from the
    flow's typed signature, with dry_run defaulting to true and the schema enforced, so a run created with a
    parameter the flow does not take (e.g. one claiming an approval) is refused by the server. Done over the REST
    API rather than `prefect deploy` (a CLI subprocess and a second list in prefect.yaml). ``auth``: the API's auth
    string (by default PREFECT_API_AUTH_STRING).
    """
    environments = sorted(load_playbooks().environments)
    with api_client(api_url, auth=auth) as http:
        if request(http, "GET", f"/work_pools/{work_pool}").status_code == 404:
            _post(http, "/work_pools/", {"name": work_pool, "type": "process"})
        for spec in PROCEDURES.values():
            flow_id = _post(http, "/flows/", {"name": spec.name}).json()["id"]
            module, _, fn = spec.flow_path.partition(":")
            kept = _post(http, "/deployments/", {
                "name": spec.deployment_name, "flow_id": flow_id, "work_pool_name": work_pool,
                "work_queue_name": "default", "description": spec.summary,
                "tags": [PROCEDURE_TAG, *spec.tags, *([APPROVAL_TAG] if spec.approval == "required" else [])],
                "entrypoint": f"{module.replace('.', '/')}.py:{fn}",
                "path": str(PROJECT_ROOT),
                "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT_ROOT)}}],
                "parameters": {"dry_run": True}, "enforce_parameter_schema": True,
                "parameter_openapi_schema": spec.form_schema(environments),
            }).json()["id"]
            _drop_stale_deployments(http, spec.name, kept)
    apply_verification_schedules(api_url, auth)


def _drop_stale_deployments(http: httpx.Client, procedure: str, kept: str) -> None:
    """A procedure has one deployment: drop the others of its flow (e.g. an earlier name) so the UI lists each
    procedure once and a client finding it by flow gets the current one."""
    body = {**deployment_filter(procedure), "limit": 50}
    for dep in _post(http, "/deployments/filter", body).json():
        if dep["id"] != kept:
            request(http, "DELETE", f"/deployments/{dep['id']}").raise_for_status()


def _post(http: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    """POST with the remote path's retries on 503/429 (a SQLite-backed server is busy just after start-up)."""
    return request(http, "POST", path, json=body).raise_for_status()


def apply_verification_schedules(api_url: str, auth: str | None = None) -> None:
    """One backup-verification schedule per environment whose playbook sets backups.verify_cron (UTC).

    The cron lives in the playbook, not in prefect.yaml, so the platform's description stays in one place.
    Schedules are identified by slug (verify-ENV), so applying twice changes nothing; they record their result
    (dry_run=False: see _verify_params).
    """
    wanted = {f"verify-{e.name}": (e.backups.verify_cron, e.name)
              for e in load_playbooks().environments.values() if e.backups and e.backups.verify_cron}
    with api_client(api_url, auth=auth) as http:
        found = _post(http, "/deployments/filter", deployment_filter("backup-verification")).json()
        if not found:
            return
        dep_id = found[0]["id"]
        listed = request(http, "GET", f"/deployments/{dep_id}/schedules").raise_for_status().json()
        existing = {s.get("slug"): s for s in listed}
        for slug, sched in existing.items():
            if slug and slug.startswith("verify-"):
                cron = (sched.get("schedule") or {}).get("cron")
                params = sched.get("parameters") or {}
                if slug not in wanted or wanted[slug][0] != cron or params != _verify_params(wanted[slug][1]):
                    request(http, "DELETE", f"/deployments/{dep_id}/schedules/{sched['id']}").raise_for_status()
                else:
                    wanted.pop(slug)
        if wanted:
            request(http, "POST", f"/deployments/{dep_id}/schedules", json=[
                {"schedule": {"cron": cron, "timezone": "UTC"}, "active": True, "slug": slug,
                 "parameters": _verify_params(env)}
                for slug, (cron, env) in wanted.items()]).raise_for_status()


def _verify_params(env: str) -> dict[str, Any]:
    """A scheduled verification records its result next to the backup (dry_run=False): verifying is read-only,
    recording is its whole point, and a dry run would leave `runbook backups list` saying "never verified"."""
    return {"env": env, "dry_run": False}


def run_intake(api_url: str, token: str, host: str, port: int, state_dir: Path, executor: Any = None,
               playbook_dirs: list[Path] | None = None, limits: Limits | None = None,
               state_dsn: str | None = None, auth: str | None = None) -> None:
    """Serve the intake with uvicorn until interrupted; created runs go straight to ``executor`` when given.
    With ``state_dsn`` its state is in PostgreSQL (shared by replicas), else in SQLite under ``state_dir``.

    The open-file soft limit is raised to the hard limit first (where allowed): it caps how many connections the
    intake can hold, and the connection cap is derived from it (see runbook.app.intake.server)."""
    raise_open_files_limit()
    limits = limits or Limits()
    app = create_app(IntakeSettings(
        token=token, prefect_api_url=api_url, prefect_api_auth=auth, state_dir=state_dir, state_dsn=state_dsn,
        playbook_dirs=playbook_dirs,
        on_created=executor.submit if executor else None, limits=limits,
    ))
    config = server_config(app, host, port, limits, on_close=app.state.metrics.connection_closed,
                           timeout_graceful_shutdown=5)
    IntakeServer(config).run()
