"""Pure parts of the container and host procedures: CPU % on both engines, growth fit, parsing, findings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from assessments.hosts import host_findings
from flows.memory_leak import MIB, assess_growth, fit_all
from flows.service_outage import assess_containers, incident_summary
from runbook.engine.config import Thresholds
from runbook.engine.findings import Report, Severity
from tasks.containers import ContainerInfo, MemorySeries, cpu_percent, fit_growth, parse_time, sparkline
from tasks.hosts import Disk, HostSnapshot, Process, parse_snapshot

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _sample(cpu_ns: int, at: datetime, system_ns: int | None = None) -> dict:
    s = {"read": at.isoformat().replace("+00:00", "Z"), "cpu_stats": {"cpu_usage": {"total_usage": cpu_ns}}}
    if system_ns is not None:
        s["cpu_stats"]["system_cpu_usage"] = system_ns
    return s


def test_cpu_percent_matches_docker_stats_on_docker_engine_samples() -> None:
    # Docker Engine: system_cpu_usage advances by online_cpus ns per ns; docker stats = cpu/system * cpus * 100
    cpus, wall_ns, used_ns = 4, 1_000_000_000, 1_500_000_000  # 1.5 cores busy for 1 s
    a = _sample(10_000, T0, 50 * 10**9)
    b = _sample(10_000 + used_ns, T0 + timedelta(seconds=1), 50 * 10**9 + cpus * wall_ns)
    docker_cli = used_ns / (cpus * wall_ns) * cpus * 100
    assert cpu_percent(a, b, wall_s=99) == pytest.approx(docker_cli) == pytest.approx(150.0)


def test_cpu_percent_on_podman_samples_ignores_its_wall_clock_system_usage() -> None:
    # Podman 4.3: system_cpu_usage advances with wall time, so the CLI formula would double a one-core burner
    a = _sample(0, T0, 0)
    b = _sample(990_000_000, T0 + timedelta(seconds=1), 1_000_000_000)
    assert cpu_percent(a, b, wall_s=1.0) == pytest.approx(99.0)


def test_cpu_percent_falls_back_to_wall_time_without_read_stamps() -> None:
    a = {"cpu_stats": {"cpu_usage": {"total_usage": 0}}}
    b = {"cpu_stats": {"cpu_usage": {"total_usage": 250_000_000}}}
    assert cpu_percent(a, b, wall_s=0.5) == pytest.approx(50.0)


def test_parse_time_handles_nanoseconds_zero_time_and_offsets() -> None:
    assert parse_time("2026-11-27T07:31:14.411282924Z") == datetime(2026, 11, 27, 7, 31, 14, 411282, tzinfo=UTC)
    assert parse_time("0001-01-01T00:00:00Z") is None
    assert parse_time("2026-11-27T09:00:00+02:00") == datetime(2026, 11, 27, 7, 0, tzinfo=UTC)


def test_growth_fit_and_sparkline() -> None:
    t = [0.0, 1.0, 2.0, 3.0]
    fit = fit_growth(t, [100, 200, 300, 400])
    assert fit["rate_bps"] == pytest.approx(100) and fit["r2"] == pytest.approx(1.0)
    assert fit_growth(t, [5, 5, 5, 5]) == {"rate_bps": 0.0, "r2": 0.0}
    assert sparkline([1, 2, 3, 4]) == "▁▃▅█" and sparkline([3, 3]) == "▁▁"


def _container(cid: str, name: str, service: str, running: bool = True) -> ContainerInfo:
    return ContainerInfo(id=cid, name=name, service=service, running=running, state="running" if running else
                         "exited", exit_code=0 if running else 137, restart_count=0, oom_killed=False,
                         started_at=T0, image="img", image_id="sha")


def test_only_steady_growth_is_a_leak() -> None:
    containers = [_container("a", "grower", "celery-worker"), _container("b", "steady", "backend"),
                  _container("c", "step", "nginx")]
    t = [0.0, 1.0, 2.0, 3.0]
    series = {
        "a": MemorySeries(t, [10 * MIB, 12 * MIB, 14 * MIB, 16 * MIB], 512 * MIB),
        "b": MemorySeries(t, [50 * MIB, 50 * MIB + 4096, 50 * MIB - 4096, 50 * MIB], 512 * MIB),
        "c": MemorySeries(t, [500_000, 500_000, 700_000, 700_000], 256 * MIB),  # fast, but tiny
    }
    report = Report(procedure="memory-leak", env="t", dry_run=True)
    leakers = assess_growth(report, fit_all(containers, series), 1.0 * MIB / 60)
    assert [r.container.name for r in leakers] == ["grower"]
    assert leakers[0].rate_bps == pytest.approx(2 * MIB)
    assert leakers[0].to_limit_s == pytest.approx((512 - 16) / 2)
    assert any(f.subject == "container grower" and f.severity is Severity.CRITICAL for f in report.findings)


SNAPSHOT = """@@load
0.50 0.40 0.30 2/100 1234
@@cpus
2
@@mem
MemTotal:        4000000 kB
MemFree:          500000 kB
MemAvailable:    1000000 kB
@@disk
Filesystem     1024-blocks     Used Available Capacity Mounted on
/dev/vda         1000000   950000     50000      95% /
@@top
   42 root     99.5  0.1  1024 yes
    1 root      0.0  0.0   512 init
"""


def test_parse_snapshot_and_host_findings() -> None:
    snap = parse_snapshot(SNAPSHOT)
    assert snap.load1 == 0.5 and snap.cpus == 2 and snap.mem_percent == 75.0
    assert snap.disks == [Disk(mount="/", size=1000000 * 1024, used=950000 * 1024, avail=50000 * 1024, percent=95.0)]
    assert snap.top[0] == Process(pid=42, user="root", cpu_percent=99.5, mem_percent=0.1, rss=1024 * 1024,
                                  command="yes")
    found = host_findings([HostSnapshot("app-1", snap), HostSnapshot("app-2", error="connection refused after 0.0 s")],
                          Thresholds())
    assert found[0].severity is Severity.WARNING and "1 disk(s) over 90 %" in found[0].title
    assert found[1].severity is Severity.CRITICAL and found[1].title == "host app-2 unreachable: connection " \
                                                                         "refused after 0.0 s"


def test_outage_assessment_and_summary_say_what_was_done() -> None:
    report = Report(procedure="service-outage", env="t", dry_run=True)
    assess_containers(report, "backend", [_container("a", "pafar-backend-1", "backend", running=False),
                                          _container("b", "pafar-nginx-1", "nginx")])
    assert report.findings[0].severity is Severity.CRITICAL
    summary = incident_summary(report, "backend")
    assert summary["dry_run"] is True and "DRY RUN, nothing changed" in summary["text"]
    assert summary["critical"] == ["backend: none of its 1 container(s) is running"]
