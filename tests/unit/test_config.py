"""The one loader and schema: valid playbooks load, every invalid one names file, path and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from runbook.engine.config import PROJECT_ROOT, load_playbooks, playbook_json_schema
from runbook.engine.errors import ConfigError, MissingSecret

MINIMAL = """
environments:
  staging:
    databases:
      main:
        dsn: {env: TEST_RUNBOOK_DSN}
"""


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_project_playbooks_are_valid() -> None:
    loaded = load_playbooks([PROJECT_ROOT / "playbooks"])
    prod = loaded.environment("production")
    assert prod.thresholds.db_connections == 80
    assert prod.thresholds.memory_percent == 85
    assert set(prod.services) == {"backend", "celery-worker", "db", "redis", "nginx"}


def test_unknown_key_names_file_and_path(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL.replace("dsn:", "pasword: x\n        dsn:"))
    with pytest.raises(ConfigError) as exc:
        load_playbooks([tmp_path])
    assert f"{tmp_path / 'p.yaml'}: environments.staging.databases.main.pasword: unknown key" in str(exc.value)


def test_wrong_type_names_path_and_value(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL + "    thresholds:\n      db_connections: lots\n")
    with pytest.raises(ConfigError) as exc:
        load_playbooks([tmp_path])
    msg = str(exc.value)
    assert "environments.staging.thresholds.db_connections" in msg
    assert "valid integer" in msg and "'lots'" in msg


def test_inline_password_is_not_accepted(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL.replace("{env: TEST_RUNBOOK_DSN}", "postgresql://u:hunter22@db/x"))
    with pytest.raises(ConfigError) as exc:
        load_playbooks([tmp_path])
    assert "environments.staging.databases.main.dsn" in str(exc.value)
    assert "hunter22" not in str(exc.value)


def test_secret_ref_needs_exactly_one_source(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL.replace("{env: TEST_RUNBOOK_DSN}", "{env: A, prefect_secret: b}"))
    with pytest.raises(ConfigError, match="exactly one"):
        load_playbooks([tmp_path])


def test_missing_env_var_names_file_path_and_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_RUNBOOK_DSN", raising=False)
    env = load_playbooks([write(tmp_path, MINIMAL)]).environment("staging")
    with pytest.raises(MissingSecret) as exc:
        env.resolve_secret(env.databases["main"].dsn, "databases.main.dsn")
    assert str(exc.value) == (
        f"{tmp_path / 'p.yaml'}: environments.staging.databases.main.dsn: "
        "environment variable TEST_RUNBOOK_DSN is not set"
    )


def test_env_file_supplies_secrets_and_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_RUNBOOK_DSN", raising=False)
    (tmp_path / "secrets.env").write_text("# comment\nTEST_RUNBOOK_DSN='postgresql://a:b@h/d'\n")
    env = load_playbooks([write(tmp_path, MINIMAL.replace("  staging:\n", "  staging:\n    env_file: secrets.env\n"))])
    ref = env.environment("staging").databases["main"].dsn
    assert env.environment("staging").resolve_secret(ref, "x") == "postgresql://a:b@h/d"
    monkeypatch.setenv("TEST_RUNBOOK_DSN", "postgresql://c:d@h/d")
    assert env.environment("staging").resolve_secret(ref, "x") == "postgresql://c:d@h/d"


def test_yaml_syntax_error_has_line_number(tmp_path: Path) -> None:
    write(tmp_path, "environments:\n  staging: [unclosed\n")
    with pytest.raises(ConfigError, match=r"p.yaml: line \d+, column \d+: not valid YAML"):
        load_playbooks([tmp_path])


def test_duplicate_environment_across_files(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL, "a.yaml")
    write(tmp_path, MINIMAL, "b.yaml")
    with pytest.raises(ConfigError, match=r"b.yaml: environments.staging: already defined in .*a.yaml"):
        load_playbooks([tmp_path])


def test_names_are_restricted(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL.replace("staging:", "'staging; rm -rf /':"))
    with pytest.raises(ConfigError, match="should match pattern"):
        load_playbooks([tmp_path])


def test_min_above_max_replicas(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL + "    services:\n      backend: {min_replicas: 4, max_replicas: 3}\n")
    with pytest.raises(ConfigError, match=r"services.backend: Value error, min_replicas \(4\) is above max_replicas"):
        load_playbooks([tmp_path])


def test_unknown_environment_lists_known(tmp_path: Path) -> None:
    loaded = load_playbooks([write(tmp_path, MINIMAL)])
    with pytest.raises(ConfigError, match="unknown environment 'prod'; known: staging"):
        loaded.environment("prod")


def test_json_schema_exports() -> None:
    schema = playbook_json_schema()
    assert "environments" in schema["properties"]
    assert schema["additionalProperties"] is False


def test_route_passes_the_alert_start_as_since_where_the_procedure_has_it(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from runbook.app.intake.models import Alert
    from runbook.app.intake.routing import build_request

    (tmp_path / "p.yaml").write_text(MINIMAL + "    services: {backend: {max_replicas: 2}}\n" + """
routes:
  - name: leak
    match: {alertname: HighMemoryUsage}
    procedure: memory-leak
    env: staging
    labels: {service: {label: service, inventory: services}}
""")
    playbooks = load_playbooks([tmp_path])
    started = datetime(2026, 11, 27, 5, 16, 15, tzinfo=UTC)
    alert = Alert(status="firing", labels={"alertname": "HighMemoryUsage", "service": "backend"},
                  startsAt=started, fingerprint="ab12")
    req = build_request(playbooks.routes[0], alert, playbooks)
    assert req.params == {"service": "backend", "since": started}
