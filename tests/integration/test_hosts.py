"""Host diagnostics over SSH against the sandbox's private sshd: snapshots, bounded fan-out, and every way a host
can refuse us (unknown key, changed key, refused, silent) turning into a finding within the timeout."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import paramiko
import pytest

from assessments.hosts import host_findings
from flows.high_cpu import high_cpu
from runbook.engine.config import Environment, SSHHostConfig
from tasks.hosts import HOST_SNAPSHOT, HostSnapshot, collect_host_snapshots, run_on_hosts
from tests.integration.derived_env import derive

pytestmark = pytest.mark.integration


def with_hosts(env: Environment, hosts: dict[str, SSHHostConfig]) -> Environment:
    return env.model_copy(update={"ssh_hosts": hosts})


def test_snapshot_of_the_sandbox_host(sandbox_env) -> None:  # noqa: ANN001
    [snap] = collect_host_snapshots.fn(sandbox_env)
    assert not snap.error, snap
    stats = snap.stats
    assert snap.host == "app-1" and stats is not None, snap
    assert stats.cpus >= 1 and stats.mem_total > 0 and 0 <= stats.mem_percent <= 100
    assert stats.disks and all(0 <= d.percent <= 100 for d in stats.disks)
    assert stats.top and all(p.pid > 0 for p in stats.top)


def test_fan_out_to_many_hosts_is_bounded_and_complete(sandbox_env) -> None:  # noqa: ANN001
    app = sandbox_env.ssh_hosts["app-1"]
    env = with_hosts(sandbox_env, {f"app-{i}": app for i in range(1, 13)})
    results = run_on_hosts(env, list(env.ssh_hosts), "echo ok", max_parallel=4)
    assert [r.host for r in results] == [f"app-{i}" for i in range(1, 13)]
    assert all(r.status == 0 and r.output == "ok\n" for r in results), results


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)
    return " ".join(Path(f"{path}.pub").read_text().split()[:2])


@pytest.mark.parametrize("case", ["unknown", "changed"])
def test_host_key_not_in_known_hosts_is_refused(case: str, sandbox_env, tmp_path: Path) -> None:  # noqa: ANN001
    app = sandbox_env.ssh_hosts["app-1"]
    known = tmp_path / "known_hosts"
    if case == "unknown":
        known.write_text(f"[127.0.0.1]:{app.port + 1} {_keygen(tmp_path / 'other')}\n")  # another host only
    else:
        known.write_text(f"[127.0.0.1]:{app.port} {_keygen(tmp_path / 'impostor')}\n")  # same host, other key
    env = with_hosts(sandbox_env, {"app-1": app.model_copy(update={"known_hosts": known})})
    [snap] = collect_host_snapshots.fn(env)
    expected = ("host key not in known_hosts (refused)" if case == "unknown"
                else "host key differs from known_hosts (refused: possible man-in-the-middle)")
    assert snap == HostSnapshot("app-1", error=expected, target="host app-1")
    assert known.read_text().count("\n") == 1, "the unknown key was learned"


def test_refused_and_silent_hosts_are_findings_within_their_timeout(
    sandbox_env, dead_port: int, silent_port: int,  # noqa: ANN001, F811
) -> None:
    app = sandbox_env.ssh_hosts["app-1"]
    env = with_hosts(sandbox_env, {
        "app-1": app,
        "refused": app.model_copy(update={"port": dead_port}),
        "silent": app.model_copy(update={"port": silent_port, "timeout_s": 2}),
    })
    started = time.monotonic()
    snaps = collect_host_snapshots.fn(env)
    elapsed = time.monotonic() - started
    by_host = {s.host: s for s in snaps}
    assert by_host["app-1"].stats is not None and not by_host["app-1"].error, "one bad host hid a good one"
    assert by_host["refused"].error.startswith("connection refused")
    assert by_host["silent"].error == "no answer within 2 s"
    assert elapsed < 2 + 15, "the SSH timeout did not bound the wait"
    titles = {f.subject: (f.severity.value, f.title) for f in host_findings(snaps, env.thresholds)}
    assert titles["host silent"] == ("critical", "host silent unreachable: no answer within 2 s")
    assert titles["host refused"][0] == "critical"


def test_unknown_host_key_is_a_finding_of_the_flow(
    sandbox_state, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    name = derive(sandbox_state, tmp_path, monkeypatch, "strangerhost",
                  {"ssh_hosts": {"app-1": {**_sandbox_host(sandbox_state), "known_hosts": str(empty)}}},
                  drop=("docker", "databases"))
    doc = high_cpu(env=name, dry_run=True)
    crit = [f for f in doc["findings"] if f["severity"] == "critical"]
    assert [f["title"] for f in crit] == ["host app-1 unreachable: host key not in known_hosts (refused)"]


def _sandbox_host(state) -> dict:  # noqa: ANN001
    import yaml

    return yaml.safe_load(state.playbook_path.read_text())["environments"]["sandbox"]["ssh_hosts"]["app-1"]


def test_only_the_constant_snapshot_reaches_the_remote_shell(
    sandbox_state, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    # nothing from outside (alert labels, parameters, the CLI) reaches the remote shell: every command a procedure
    # sends over SSH, recorded at paramiko's exec_command, is the fixed HOST_SNAPSHOT of tasks/hosts.py
    sent: list[str] = []
    real = paramiko.SSHClient.exec_command

    def recording(self: paramiko.SSHClient, command: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(command)
        return real(self, command, *args, **kwargs)

    monkeypatch.setattr(paramiko.SSHClient, "exec_command", recording)
    name = derive(sandbox_state, tmp_path, monkeypatch, "constcmd", {}, drop=("docker", "databases"))
    doc = high_cpu(env=name, dry_run=True, sample_interval_s=0.2)
    assert sent and set(sent) == {HOST_SNAPSHOT}, sent
    assert not any(f["subject"] == "host app-1" and "unreachable" in f["title"] for f in doc["findings"])
    assert "{" not in HOST_SNAPSHOT and "%" not in HOST_SNAPSHOT.replace("pcpu", "")
