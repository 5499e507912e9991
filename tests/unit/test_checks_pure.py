"""Pure parts of the network, cache, metrics and log tasks (no services needed)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from runbook.app.catalog import PROCEDURES
from runbook.engine.config import NetworkConfig
from tasks.cache import hit_ratio
from tasks.logs import RUNBOOK_QUERIES, parse_line, query_text
from tasks.metrics import APP_QUERIES, render
from tasks.probes import is_reserved_invalid, resolve


def test_runbook_promql_is_verbatim_with_the_window() -> None:
    assert render(APP_QUERIES["error_rate"], "5m") == 'rate(http_requests_total{status=~"5.."}[5m])'
    assert render(APP_QUERIES["p95_latency"], "30s") == \
        "histogram_quantile(0.95, rate(http_request_duration_seconds_bucket[30s]))"
    with pytest.raises(ValueError):
        render(APP_QUERIES["request_rate"], "5m]) or vector(1")


def test_runbook_kibana_queries_are_verbatim_and_service_is_checked() -> None:
    assert query_text(RUNBOOK_QUERIES["errors"], 5000) == "level:ERROR AND @timestamp:[now-1h TO now]"
    assert query_text(RUNBOOK_QUERIES["auth_failures"], 5000) == \
        'message:"authentication failed" AND @timestamp:[now-24h TO now]'
    assert query_text(RUNBOOK_QUERIES["payment_errors"], 5000, "payment").endswith('AND service:"payment"')
    from runbook.engine.errors import BadInput

    with pytest.raises(BadInput):
        query_text(RUNBOOK_QUERIES["errors"], 5000, 'x" OR *:*')


def test_hit_ratio() -> None:
    assert hit_ratio(6, 2) == 0.75 and hit_ratio(0, 0) is None


def test_invalid_names_never_reach_a_resolver() -> None:
    assert is_reserved_invalid("db.pafar.invalid") and is_reserved_invalid("x.INVALID.")
    assert not is_reserved_invalid("invalid.example")
    r = resolve("db.pafar.invalid", 1)
    assert (r.ok, r.result, r.latency_ms) == (False, "NXDOMAIN", 0.0)


def test_log_lines_parse_as_json_or_text() -> None:
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    j = parse_line('{"level": "error", "service": "payment", "message": "boom", "response_time": 7000}', "x", ts)
    assert (j["level"], j["service"], j["response_time"], j["timestamp"]) == ("ERROR", "payment", 7000, ts)
    t = parse_line("2026 WARNING slow request response_time=6100 path=/api", "backend", ts)
    assert (t["level"], t["service"], t["response_time"]) == ("WARN", "backend", 6100)


def test_network_config_rejects_shell_characters() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        NetworkConfig.model_validate({"targets": {"db": {"host": "db;rm -rf /", "port": 5432}}})
    with pytest.raises(ValidationError):
        NetworkConfig.model_validate({"dns_names": ["-oProxyCommand=x"]})


def test_procedures_are_listed() -> None:
    assert {"network-checks", "cache-api", "log-analysis"} <= set(PROCEDURES)
    for name in PROCEDURES:
        schema = PROCEDURES[name].flow.parameters.model_dump()["properties"]
        assert schema["dry_run"]["default"] is True, f"{name}: dry run must be the default"
        assert "dry_run" not in PROCEDURES[name].parameter_names(), "--param cannot set dry_run"
