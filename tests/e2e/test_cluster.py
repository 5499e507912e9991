"""The multi-node shape of deploy/cluster/ (two Prefect API replicas on PostgreSQL sharing events through Redis,
nginx round-robin, two intakes, two executors) under an alert storm while one intake, one executor and one API
replica are killed: every occurrence gets exactly one run and every run reaches a final state."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster_storm import run_storm, running_cluster

pytestmark = pytest.mark.integration


def test_a_storm_survives_killing_one_of_each_component(sandbox_state, tmp_path: Path) -> None:  # noqa: ANN001
    with running_cluster(sandbox_state, tmp_path) as cluster:
        result = run_storm(cluster, occurrences=30, rounds=8)
        logs = {name: m.log for name, m in cluster.members.items()}
        assert not cluster.member("executor1").alive() and not cluster.member("api1").alive()
        assert cluster.member("intake1").alive(), f"the restarted intake died: {logs['intake1'].read_text()[-2000:]}"
    assert result.stranded == [], f"runs left unfinished: {result.stranded}"
    assert len(result.runs_per_occurrence) == 30, f"occurrences without a run: {30 - len(result.runs_per_occurrence)}"
    assert set(result.runs_per_occurrence.values()) == {1}, f"an occurrence ran twice: {result.runs_per_occurrence}"
    assert result.states == {"COMPLETED": 30}, result.states
    assert result.unrelated_runs == 0
    assert len(result.acks_s) == 3 * 8, "every webhook of every round was acknowledged"
