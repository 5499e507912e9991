"""A route's environment: the alert's env_label when it names an environment of the playbooks, else the route's."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from runbook.app.intake.models import Alert
from runbook.app.intake.routing import route_env
from runbook.engine.config import Route, load_playbooks
from runbook.engine.errors import BadInput

ENVS = "environments:\n  production: {}\n  sandbox: {}\n"


def _alert(**labels: str) -> Alert:
    return Alert(status="firing", labels={"alertname": "ServiceDown", **labels}, startsAt=datetime.now(UTC),
                 fingerprint="ab12")


def test_the_alert_names_the_environment_or_the_route_does(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(ENVS)
    playbooks = load_playbooks([tmp_path])
    route = Route(name="r", match={"alertname": "ServiceDown"}, procedure="service-outage", env="production",
                  env_label="environment")
    assert route_env(route, _alert(environment="sandbox"), playbooks) == "sandbox"
    assert route_env(route, _alert(), playbooks) == "production"
    with pytest.raises(BadInput, match=r"label environment='staging' is not an environment of the playbooks"):
        route_env(route, _alert(environment="staging"), playbooks)
    label_only = route.model_copy(update={"env": None})
    with pytest.raises(BadInput, match="label 'environment' is missing"):
        route_env(label_only, _alert(), playbooks)


def test_a_route_must_name_an_environment_somehow() -> None:
    with pytest.raises(ValueError, match="needs env"):
        Route(name="r", match={"alertname": "X"}, procedure="service-outage")
