"""The one loader and schema: valid playbooks load, every invalid one names file, path and expectation."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from runbook.engine.config import (
    MAX_PLAYBOOK_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    PROJECT_ROOT,
    load_playbooks,
    playbook_json_schema,
)
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


def _laughs(levels: int) -> str:
    """A "billion laughs": each level an anchor of nine aliases of the previous one (9^levels strings)."""
    lines = ["      l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"      l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return ("routes:\n  - name: laughs\n    match: {alertname: X}\n    procedure: db-slowness\n    env: staging\n"
            "    params:\n" + "\n".join(lines) + "\n")


def test_alias_bomb_is_refused_while_composing_naming_file_line_and_bound(tmp_path: Path) -> None:
    """Nine lines that stand for 9^8 nodes: refused after ~10^5 counted nodes, long before anything expands."""
    path = write(tmp_path, MINIMAL + _laughs(8))
    started = time.monotonic()
    with pytest.raises(ConfigError) as exc:
        load_playbooks([tmp_path])
    assert time.monotonic() - started < 5
    msg = str(exc.value)
    assert msg.startswith(f"{path}: line ")
    assert f"refused: more than {MAX_YAML_NODES} nodes with aliases expanded" in msg


def test_aliases_and_merge_keys_within_bounds_load(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL + "    thresholds: &t {db_connections: 50}\n"
                              "  other:\n    thresholds:\n      <<: *t\n      cpu_percent: 70\n" + _laughs(2))
    loaded = load_playbooks([tmp_path])
    assert loaded.environment("other").thresholds.db_connections == 50
    assert loaded.environment("other").thresholds.cpu_percent == 70
    assert loaded.routes[0].params["l2"][8][8][8] == "lol"


def test_an_alias_to_its_own_ancestor_is_refused(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL + "routes: &r\n  - *r\n")
    with pytest.raises(ConfigError, match="refused: alias \\*r refers to a node that contains it"):
        load_playbooks([tmp_path])


@pytest.mark.parametrize("shape", ["flow", "block"])
def test_10000_deep_yaml_is_a_config_error_not_a_crash(tmp_path: Path, shape: str) -> None:
    deep = ("environments: " + "[" * 10_000 + "]" * 10_000 + "\n" if shape == "flow" else
            "environments:\n" + "- " * 10_000 + "x\n")  # compact block sequences, one in the other
    path = write(tmp_path, deep)
    with pytest.raises(ConfigError) as exc:
        load_playbooks([tmp_path])
    assert str(exc.value).startswith(f"{path}: line ")
    assert f"refused: nested deeper than {MAX_YAML_DEPTH} levels" in str(exc.value)


def test_depth_counts_through_aliases(tmp_path: Path) -> None:
    """Each anchor 40 deep, the next one nesting an alias of it: every single piece is shallow, the whole is not."""
    nest = 40
    a = "[" * nest + "x" + "]" * nest
    b = "[" * nest + "*a" + "]" * nest
    write(tmp_path, MINIMAL + f"routes:\n  - name: deep\n    match: {{alertname: X}}\n    procedure: p\n"
                              f"    env: staging\n    params: {{a: &a {a}, b: {b}}}\n")
    with pytest.raises(ConfigError, match=f"nested deeper than {MAX_YAML_DEPTH} levels"):
        load_playbooks([tmp_path])


def test_oversize_playbook_is_refused_naming_file_and_limit(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "    description: '" + "x" * MAX_PLAYBOOK_BYTES + "'\n")
    with pytest.raises(ConfigError) as exc:
        load_playbooks([tmp_path])
    assert str(exc.value) == (f"{path}: larger than the limit of {MAX_PLAYBOOK_BYTES} bytes for a playbook file "
                              f"({path.stat().st_size} bytes)")


def test_a_fifo_named_like_a_playbook_is_refused_not_waited_on(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "p.yaml")
    with pytest.raises(ConfigError, match="p.yaml: not a regular file"):
        load_playbooks([tmp_path])
