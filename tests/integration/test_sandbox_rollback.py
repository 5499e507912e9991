"""A sandbox `up` that fails half-way stops what it started: no processes or mounts are left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from runbook import sandbox
from runbook.sandbox import Service, ServiceRecord, lifecycle, net
from runbook.sandbox.errors import SandboxError

pytestmark = pytest.mark.integration


class Broken(Service):
    """A service that cannot start (the one stand-in here: making a real one fail on cue would need a broken
    system package)."""

    name = "broken"
    requirements = ()

    def start(self, state: Path, port: int, peers: dict[str, ServiceRecord] | None = None) -> ServiceRecord:
        raise SandboxError("broken on purpose")


def test_a_failed_up_stops_the_services_it_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(lifecycle.SERVICES, "broken", Broken())
    monkeypatch.setattr(lifecycle, "ALL_SERVICES", (*lifecycle.ALL_SERVICES, "broken"))
    stopped: list[ServiceRecord] = []
    real_stop = lifecycle._stop_one

    def spy(name: str, rec: ServiceRecord, root: Path) -> bool:
        stopped.append(rec)
        return real_stop(name, rec, root)

    monkeypatch.setattr(lifecycle, "_stop_one", spy)
    state_dir = tmp_path / "state"
    with pytest.raises(SandboxError, match=r"stopped again what this call had started: redis"):
        sandbox.up(only=["redis", "broken"], state_dir=state_dir)
    assert [r.name for r in stopped] == ["redis"]
    assert not net.port_accepts(stopped[0].port), "redis was stopped, by PID"
    assert sandbox.status(state_dir).services == {}, "nothing is recorded as running"
