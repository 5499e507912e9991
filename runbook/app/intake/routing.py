"""From an alert to a run request: which routes match, and the procedure parameters its labels name.

A label value becomes a parameter only if it names something that exists in the playbook inventory (a service,
a database ...); anything else is rejected with the reason. Values are never interpolated anywhere: they are
passed on as typed parameters, validated against the flow's own signature.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

from runbook.app.catalog import PROCEDURES, validate_params
from runbook.app.intake.models import Alert
from runbook.engine.config import Playbooks, Route
from runbook.engine.errors import BadInput, ConfigError
from runbook.engine.params import NAME_PATTERN

_NAME = re.compile(NAME_PATTERN)  # the playbooks' own name rule: a label naming a target must pass it


@dataclass(frozen=True)
class RunRequest:
    """One alert occurrence for one route: what the dispatcher turns into exactly one flow run."""

    key: str  # the dedup key: route + fingerprint + startsAt
    route: str
    procedure: str
    env: str
    params: dict[str, Any]
    target: str  # procedure + env + params, for cooldowns
    fingerprint: str
    starts_at: str
    alertname: str
    summary: str = ""
    mode: str = "dry_run"
    tags: list[str] = field(default_factory=list)


def occurrence_key(route: str, alert: Alert) -> str:
    """Identifies one occurrence of one alert for one route, however often Alertmanager resends it."""
    starts = alert.startsAt.astimezone(UTC).isoformat()
    raw = f"{route}\0{alert.fingerprint}\0{starts}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def matching_routes(routes: list[Route], labels: dict[str, str]) -> list[Route]:
    """The routes an alert's labels select, by Alertmanager's rules (linear-time RE2, see Route.matches)."""
    return [r for r in routes if r.matches(labels)]


def route_env(route: Route, alert: Alert, playbooks: Playbooks) -> str:
    """The environment an alert's run goes to: its ``env_label`` label when the route names one and the alert
    carries it (it must be an environment of the playbooks), else the route's ``env``."""
    raw = alert.labels.get(route.env_label) if route.env_label else None
    if raw is not None:
        if raw not in playbooks.environments:
            known = ", ".join(sorted(playbooks.environments)) or "none"
            raise BadInput(f"label {route.env_label}={_show(raw)} is not an environment of the playbooks (known: "
                           f"{known})")
        return raw
    if route.env is None:
        raise BadInput(f"label {route.env_label!r} is missing (route {route.name!r} takes the environment from it)")
    if route.env not in playbooks.environments:
        raise ConfigError(f"route {route.name!r}: unknown environment {route.env!r}")
    return route.env


def build_request(route: Route, alert: Alert, playbooks: Playbooks) -> RunRequest:
    """Map labels to parameters and validate everything; BadInput names what was wrong."""
    if route.procedure not in PROCEDURES:
        raise ConfigError(f"route {route.name!r}: unknown procedure {route.procedure!r}")
    env = playbooks.environment(route_env(route, alert, playbooks))
    params: dict[str, Any] = dict(route.params)
    for param, spec in route.labels.items():
        raw = alert.labels.get(spec.label)
        if raw is None:
            if spec.required:
                raise BadInput(f"label {spec.label!r} is missing (route {route.name!r} needs it for {param!r})")
            continue
        value = spec.map.get(raw, raw)
        if not _NAME.fullmatch(value):  # fullmatch: `$` alone lets "main\n" through
            raise BadInput(f"label {spec.label}={_show(raw)} is not a valid name for {param!r}")
        if spec.inventory is not None:
            known = getattr(env, spec.inventory)
            if value not in known:
                raise BadInput(
                    f"label {spec.label}={_show(raw)}: no {spec.inventory[:-1].replace('_', ' ')} {value!r} in "
                    f"environment {env.name!r} (known: {', '.join(sorted(known)) or 'none'})"
                )
        params[param] = value
    if "since" in PROCEDURES[route.procedure].parameter_names() and "since" not in params:
        params["since"] = alert.startsAt  # "when the alert began": guards such as "not restarted since" use it
    params = validate_params(route.procedure, params)
    what = {k: v for k, v in params.items() if k != "since"}  # the target, not the occurrence: cooldowns key on it
    target = json.dumps({"procedure": route.procedure, "env": env.name, **what}, sort_keys=True, default=str)
    return RunRequest(
        key=occurrence_key(route.name, alert),
        route=route.name,
        procedure=route.procedure,
        env=env.name,
        params=params,
        target=target,
        fingerprint=alert.fingerprint,
        starts_at=alert.startsAt.astimezone(UTC).isoformat(),
        alertname=alert.labels.get("alertname", ""),
        summary=alert.annotations.get("summary", "")[:500],
        mode=route.policy.mode,
    )


def _show(value: str) -> str:
    """A label value as it may appear in an error: quoted, escaped, bounded."""
    return repr(value[:80] + ("…" if len(value) > 80 else ""))
