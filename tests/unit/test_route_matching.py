"""Route matching as Alertmanager does it: RE2 (linear time), patterns anchored, checked when the playbooks load."""

from __future__ import annotations

from pathlib import Path

import pytest

from runbook.engine.config import Route, load_playbooks
from runbook.engine.errors import ConfigError

ROUTE = """
environments:
  staging: {{}}
routes:
  - name: {name}
    match: {{alertname: HostDown}}
    match_re: {{instance: '{pattern}'}}
    procedure: network-checks
    env: staging
"""


def _route(pattern: str, **match: str) -> Route:
    return Route(name="r", match={"alertname": "HostDown", **match}, match_re={"instance": pattern},
                 procedure="network-checks", env="staging")


@pytest.mark.parametrize(("pattern", "why"), [
    (r"(a)\1", "invalid escape sequence"),  # a backreference: Python's re takes it, RE2 and Alertmanager do not
    ("(?=web)web.*", "invalid perl operator"),  # lookahead
    ("([a-z]", "missing )"),
])
def test_a_pattern_re2_refuses_is_a_config_error_naming_file_route_and_label(tmp_path: Path, pattern: str,
                                                                            why: str) -> None:
    (tmp_path / "p.yaml").write_text(ROUTE.format(name="hosts-down", pattern=pattern))
    with pytest.raises(ConfigError) as exc:
        load_playbooks([tmp_path])
    text = str(exc.value)
    assert f"{tmp_path / 'p.yaml'}: routes.0" in text
    assert "route 'hosts-down': match_re.instance" in text and "not an RE2 regular expression" in text
    assert why in text


def test_patterns_are_anchored_as_alertmanager_anchors_them() -> None:
    route = _route("web|db")
    assert route.matches({"alertname": "HostDown", "instance": "web"})
    assert route.matches({"alertname": "HostDown", "instance": "db"})
    assert not route.matches({"alertname": "HostDown", "instance": "web-1"})
    assert not route.matches({"alertname": "HostDown", "instance": "my-db"})
    assert not route.matches({"alertname": "HostDown", "instance": "web\n"})


def test_a_missing_label_is_the_empty_string() -> None:
    assert _route(".*").matches({"alertname": "HostDown"})
    assert not _route(".+").matches({"alertname": "HostDown"})
    assert _route(".*", team="").matches({"alertname": "HostDown"})


def test_the_redos_pattern_answers_for_a_long_hostile_label() -> None:
    """``([a-z0-9]+-?)+`` is exponential in Python's re for a value that almost matches; RE2 is linear (the
    timing is in bench/bench_intake.py, not here)."""
    route = _route("([a-z0-9]+-?)+")
    assert not route.matches({"alertname": "HostDown", "instance": "a" * 40 + "!"})
    assert not route.matches({"alertname": "HostDown", "instance": "a1-" * 5000 + "!"})
    assert route.matches({"alertname": "HostDown", "instance": "web-01-eu"})


def test_utf8_label_names_can_be_matched_and_mapped() -> None:
    route = Route(name="r", match={"alertname": "HighMemoryUsage", "service.name": "pafar-backend"},
                  match_re={"k8s.namespace.name": "pafar-.*"}, procedure="memory-leak", env="staging",
                  labels={"service": {"label": "service.name", "inventory": "services"}})
    assert route.matches({"alertname": "HighMemoryUsage", "service.name": "pafar-backend",
                          "k8s.namespace.name": "pafar-prod"})
    assert not route.matches({"alertname": "HighMemoryUsage", "service_name": "pafar-backend"})


def test_a_label_naming_a_target_must_be_a_whole_name(tmp_path: Path) -> None:
    """Even without an inventory to check against, the value must pass the playbooks' name rule as a whole
    ("main\\n" passes a ``re.match`` of ``^...$``; it must not pass here)."""
    from datetime import UTC, datetime

    from runbook.app.intake.models import Alert
    from runbook.app.intake.routing import build_request
    from runbook.engine.errors import BadInput

    (tmp_path / "p.yaml").write_text("""
environments:
  staging: {}
routes:
  - name: db
    match: {alertname: DatabaseConnectionHigh}
    procedure: db-slowness
    env: staging
    labels: {database: {label: db}}
""")
    playbooks = load_playbooks([tmp_path])
    for value in ("main\n", "main; id", "Main"):
        alert = Alert(status="firing", labels={"alertname": "DatabaseConnectionHigh", "db": value},
                      startsAt=datetime.now(UTC), fingerprint="ab12")
        with pytest.raises(BadInput, match="is not a valid name for 'database'"):
            build_request(playbooks.routes[0], alert, playbooks)
