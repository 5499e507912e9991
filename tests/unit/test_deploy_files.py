"""deploy/ and the procedure catalog agree with the runbook and with each other; Prometheus' and Alertmanager's own
checkers accept our files."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from runbook.app.catalog import PROCEDURES
from runbook.engine.config import PROJECT_ROOT, load_playbooks

RULES = PROJECT_ROOT / "deploy" / "prometheus" / "pafar-alerts.yml"
RECEIVER = PROJECT_ROOT / "deploy" / "alertmanager" / "runbook-receiver.yml"
RUNBOOK_ALERTS = {"ServiceDown", "HighErrorRate", "DatabaseConnectionHigh", "HighResponseTime", "HighMemoryUsage"}


def test_promtool_accepts_the_rules() -> None:
    proc = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 5 rules found" in proc.stdout


def test_amtool_accepts_the_receiver() -> None:
    proc = subprocess.run(["amtool", "check-config", str(RECEIVER)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_receivers_send_no_more_alerts_than_the_intake_takes_per_webhook() -> None:
    """max_alerts 0 (no limit) lets a storm group grow past the intake's body limit, and a 413 is never retried:
    the shipped receiver and the sandbox's bound the group within the intake's per-webhook limit."""
    from runbook.app.intake.models import MAX_ALERTS
    from runbook.sandbox.alertmanager import alertmanager_config

    shipped = yaml.safe_load(RECEIVER.read_text())
    sandbox = alertmanager_config("http://127.0.0.1:9/alerts")
    for config in (shipped, sandbox):
        hooks = [w for r in config["receivers"] for w in r.get("webhook_configs", [])]
        assert hooks and all(0 < w["max_alerts"] <= MAX_ALERTS for w in hooks), hooks


def test_every_runbook_alert_is_routed_to_a_registered_procedure() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alertnames = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert alertnames == RUNBOOK_ALERTS
    routes = load_playbooks([PROJECT_ROOT / "playbooks"]).routes
    routed = {r.match["alertname"]: r for r in routes}
    assert set(routed) >= RUNBOOK_ALERTS
    for route in routes:
        assert route.procedure in PROCEDURES, f"route {route.name}: unknown procedure {route.procedure}"


def test_every_flow_module_declares_its_procedure_and_names_match() -> None:
    """One list: the catalog is what @procedure declared in flows/; names are what routes and the executor use."""
    import pkgutil

    import flows

    modules = {f"flows.{m.name}" for m in pkgutil.iter_modules(flows.__path__)}
    assert {info.flow_path.partition(":")[0] for info in PROCEDURES.values()} == modules
    for name, info in PROCEDURES.items():
        assert info.load_flow().name == name
        assert all(r.name for r in info.remediations)


@pytest.mark.parametrize("name", sorted(PROCEDURES))
def test_every_deployment_form_explains_itself(name: str) -> None:
    """The Prefect UI's run form: every parameter has help text, env is a choice, nothing else is accepted."""
    from prefect.utilities.schema_tools.validation import validate

    schema = PROCEDURES[name].form_schema(["production", "sandbox"])
    props = schema["properties"]
    missing = [p for p, s in props.items() if not s.get("description")]
    assert missing == [], f"{name}: no description for {missing}"
    assert props["env"]["enum"] == ["production", "sandbox"]
    assert schema["additionalProperties"] is False
    errors = validate({"env": "nowhere"}, schema, raise_on_error=False)
    assert errors, "an environment the playbooks do not define is refused"


def test_the_committed_playbook_schema_is_the_generated_one() -> None:
    """deploy/playbook.schema.json (for editors) is exactly `runbook check --schema`: regenerate it when the models
    change (`runbook check --schema > deploy/playbook.schema.json`)."""
    import json

    from runbook.engine.config import playbook_json_schema

    committed = json.loads((PROJECT_ROOT / "deploy" / "playbook.schema.json").read_text())
    assert committed == json.loads(json.dumps(playbook_json_schema()))


CLUSTER = PROJECT_ROOT / "deploy" / "cluster"


def _env_file(path: object) -> dict[str, str]:
    lines = [ln for ln in CLUSTER.joinpath(str(path)).read_text().splitlines() if ln and not ln.startswith("#")]
    return dict(ln.split("=", 1) for ln in lines)


def test_the_cluster_description_uses_the_prefect_settings_the_test_starts() -> None:
    """deploy/cluster/ is what tests/e2e/test_cluster.py runs: the same multi-replica settings, nginx config and
    commands, so the description cannot drift from what is tested."""
    from runbook.sandbox.cluster import HA_SETTINGS, nginx_conf

    env = _env_file("prefect.env")
    assert {k: env[k] for k in HA_SETTINGS} == HA_SETTINGS
    assert {"PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_REDIS_MESSAGING_HOST", "PREFECT_SERVER_DOCKET_URL",
            "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK", "PREFECT_SERVER_API_AUTH_STRING"} <= set(env)
    body = CLUSTER.joinpath("nginx.conf").read_text().split("\n", 3)[3]  # after the three comment lines
    assert body == nginx_conf(4200, ["prefect-api-1.internal:4200", "prefect-api-2.internal:4200"],
                              9095, ["intake-1.internal:9095", "intake-2.internal:9095"], listen_host="0.0.0.0")
    units = {p.name: p.read_text() for p in CLUSTER.glob("*.service")}
    assert "server start --host 0.0.0.0 --port %i --no-services" in units["prefect-api@.service"]
    assert "server services start" in units["prefect-services.service"]
    assert "server database upgrade -y" in units["prefect-migrate.service"]
    assert "runbook intake --host 0.0.0.0 --port %i" in units["runbook-intake@.service"]
    assert "runbook worker --grace" in units["runbook-worker.service"]
    runbook_env = _env_file("runbook.env")
    assert runbook_env["PREFECT_API_URL"].endswith(":4200/api")
    assert runbook_env["PREFECT_API_AUTH_STRING"] == env["PREFECT_SERVER_API_AUTH_STRING"], "the same string"
    assert runbook_env["RUNBOOK_INTAKE_STATE_DSN"].startswith("postgresql://"), "the intakes share one state"
