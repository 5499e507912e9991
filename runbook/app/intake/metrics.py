"""The intake's Prometheus metrics (GET /metrics), in a registry of their own so two intakes in one process (tests,
benchmarks) never count into each other."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

INCIDENT_BUCKETS = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("runbook_intake_alerts_received", "alerts received", ["status"], registry=r)
        self.runs = Counter("runbook_intake_runs_created", "runs requested (one per occurrence and route)",
                            ["route"], registry=r)
        self.deduplicated = Counter("runbook_intake_alerts_deduplicated", "resends of a known occurrence",
                                    registry=r)
        self.suppressed = Counter("runbook_intake_alerts_suppressed", "held back by a cooldown", ["route"],
                                  registry=r)
        self.rejected = Counter("runbook_intake_alerts_rejected", "alerts rejected one by one (the rest of their "
                                "webhook is processed)", ["reason"], registry=r)
        self.requests_rejected = Counter("runbook_intake_requests_rejected", "requests refused whole (not a webhook, "
                                         "unauthorized, too large, busy, Prefect unreachable)", ["reason"], registry=r)
        self.truncated = Counter("runbook_intake_alerts_truncated", "alerts the sender left out of its webhooks "
                                 "(Alertmanager's max_alerts)", registry=r)
        self.connections_closed = Counter("runbook_intake_connections_closed", "connections the intake closed "
                                          "before a complete request (timeouts, evictions)", ["reason"], registry=r)
        self.in_flight = Gauge("runbook_intake_requests_in_flight", "webhooks being processed", registry=r)
        self.unrouted = Counter("runbook_intake_alerts_unrouted", "alerts no route matched", registry=r)
        self.breaker = Counter("runbook_intake_breaker_trips", "runs narrowed to dry run by a breaker", ["route"],
                               registry=r)
        self.cancelled = Counter("runbook_intake_runs_cancelled", "runs cancelled on resolve", registry=r)
        self.latency = Histogram("runbook_intake_request_seconds", "webhook handling time", registry=r,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

        # post-incident reviews (runbook.app.review): one observation per reviewed alert occurrence and procedure
        self.time_to_remediate = Histogram(
            "runbook_incident_time_to_remediate_seconds", "alert start to the first change a run made", ["procedure"],
            registry=r, buckets=INCIDENT_BUCKETS)
        self.time_to_recover = Histogram(
            "runbook_incident_time_to_recover_seconds", "alert start to a verified change, else to the alert's "
            "resolve", ["procedure"], registry=r, buckets=INCIDENT_BUCKETS)

    def observe_review(self, procedure: str, remediate_s: float | None, recover_s: float | None) -> None:
        """A review's figures (a figure it does not have, e.g. nothing was changed, is not observed)."""
        if remediate_s is not None:
            self.time_to_remediate.labels(procedure or "unknown").observe(max(0.0, remediate_s))
        if recover_s is not None:
            self.time_to_recover.labels(procedure or "unknown").observe(max(0.0, recover_s))

    def connection_closed(self, reason: str) -> None:
        self.connections_closed.labels(reason).inc()

    def exposition(self) -> str:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry).decode()
