"""The standard suite every registered remediation passes, against real services.

A dry run leaves the state unchanged and plans the same change a real run makes; apply then verify passes;
a second apply reports no change.
"""

from __future__ import annotations

import pytest

import tasks.postgres_remediations  # noqa: F401  (registers)
from runbook.engine.remediation import REGISTRY
from runbook.engine.runner import run_remediation
from tests.scenarios import SCENARIOS

pytestmark = pytest.mark.integration


def test_every_registered_remediation_has_a_scenario() -> None:
    missing = sorted(set(REGISTRY) - set(SCENARIOS))
    assert not missing, f"add a scenario in tests/scenarios.py for: {missing}"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_remediation_contract(name: str, sandbox_env, app_dsn: str) -> None:  # noqa: ANN001
    with SCENARIOS[name](sandbox_env, app_dsn) as (rem, snapshot):
        assert type(rem) is REGISTRY[name]
        before = snapshot()
        dry = run_remediation(rem, dry_run=True)
        assert snapshot() == before, "a dry run changed state"
        assert dry.planned, "the scenario should need a change"
        assert not dry.changed and not dry.error

        real = run_remediation(rem, dry_run=False)
        assert not real.error, real.error
        assert [(c.action, c.subject) for c in real.planned] == [(c.action, c.subject) for c in dry.planned]
        assert real.changed and real.verified

        again = run_remediation(rem, dry_run=False)
        assert not again.changed and again.planned == [] and not again.error
