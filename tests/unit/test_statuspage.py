"""The status page's configuration and adapter pieces that need no server: validation, which runs update the page,
the public text, and ids that could not be used to reach another path."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from runbook.engine.config import Environment, Route, StatusPageConfig
from runbook.engine.statuspage import Statuspage, StatusPageError, incident_update, subject_of, wanted

KEY = {"env": "STATUSPAGE_API_KEY"}


def _cfg(**extra: object) -> StatusPageConfig:
    return StatusPageConfig.model_validate({"page_id": "abc123", "api_key": KEY, **extra})


@pytest.mark.parametrize("bad", [
    {"page_id": "abc/../../admin"}, {"page_id": ""}, {"api_key": "inline-key"}, {"url": "ftp://x"},
    {"url": "https://x/?q=1"}, {"components": {"backend": "id with space"}}, {"incident_name": "a\nb"},
    {"provider": "pagerduty"}, {"timeout_s": 0}, {"surprise": 1},
])
def test_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        StatusPageConfig.model_validate({"page_id": "abc123", "api_key": KEY, **bad})


def test_public_text_names_the_service_and_its_component_only() -> None:
    update = incident_update(_cfg(components={"backend": "cmp1"}), "backend", "identified")
    assert update.name == "Service disruption: backend" and update.status == "identified"
    assert update.components == {"cmp1": "major_outage"} and "backend" in update.body
    assert incident_update(_cfg(), "db", "resolved").components == {}


def test_subject_is_the_service_or_database_else_the_environment() -> None:
    assert subject_of({"service": "backend", "database": "main"}, "prod") == "backend"
    assert subject_of({"database": "main"}, "prod") == "main"
    assert subject_of({"service": 3}, "prod") == "prod"


def _route(status_page: bool | None) -> Route:
    return Route.model_validate({"name": "r", "match": {"alertname": "A"}, "procedure": "db-slowness",
                                 "env": "prod", "status_page": status_page})


def test_which_runs_update_the_page() -> None:
    env = Environment.model_validate({"status_page": {"page_id": "p", "api_key": KEY}})
    assert wanted(env, None, "service-outage") and not wanted(env, None, "db-slowness")
    assert wanted(env, _route(True), "db-slowness") and not wanted(env, _route(False), "service-outage")
    assert wanted(env, _route(None), "service-outage")
    assert not wanted(Environment(), _route(True), "db-slowness")  # no page configured: nothing to update


@pytest.mark.parametrize("incident_id", ["../../pages", "a b", "", "x" * 65, None, 7])
def test_an_incident_id_that_is_not_one_is_never_put_in_a_path(incident_id: object) -> None:
    page = Statuspage("http://127.0.0.1:9", "abc123", "k", 1.0)  # nothing listens: nothing may be asked
    with pytest.raises(StatusPageError, match="usable incident id"):
        page.update(incident_id, incident_update(_cfg(), "backend", "resolved"))  # type: ignore[arg-type]
