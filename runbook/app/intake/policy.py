"""Policy decisions for accepted alerts: dedup, cooldown per procedure+target, circuit breaker per route.

Decisions for one webhook batch are made together, so two alerts for the same target in one batch still get
one run. They read, and the batch is then written, inside one transaction holding the lock of each procedure
involved (store.Store.deciding), so replicas sharing a PostgreSQL store cannot both take the breaker's last run
or both start a cooled-down target.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace

from runbook.app.intake.routing import RunRequest
from runbook.app.intake.store import Decider
from runbook.engine.config import Route

MODE_TAG = "mode:"
TIMEOUT_TAG = "approval-timeout-s:"
FINGERPRINT_TAG = "fingerprint:"  # `runbook incident review FINGERPRINT` finds an alert's runs by it
STARTS_AT_TAG = "alert-starts-at:"  # the post-incident review's timeline starts here


@dataclass(frozen=True)
class Decision:
    request: RunRequest
    outcome: str  # run | duplicate | cooldown
    reason: str = ""
    breaker_tripped: bool = False


def decide(batch: list[tuple[RunRequest, Route]], store: Decider, now: float | None = None) -> list[Decision]:
    now = time.time() if now is None else now
    seen_keys: set[str] = set()
    targets: dict[str, float] = {}
    applying: Counter[str] = Counter()
    stored: dict[str, int] = {}  # applying runs per route before this batch: one query per route, not per alert
    known = store.known_keys([req.key for req, _ in batch])
    out: list[Decision] = []
    for req, route in batch:
        if req.key in seen_keys or req.key in known:
            out.append(Decision(req, "duplicate", "this alert occurrence already has its run"))
            continue
        seen_keys.add(req.key)
        pol = route.policy
        if pol.cooldown_s > 0:
            if req.target in targets or store.ran_for_target(req.target, now - pol.cooldown_s):
                out.append(Decision(req, "cooldown", f"a run for the same procedure and target started within "
                                                     f"the last {pol.cooldown_s:g} s"))
                continue
        targets[req.target] = now
        mode, reason, tripped = pol.mode, "", False
        if mode == "auto":
            if route.name not in stored:
                stored[route.name] = store.applying_runs(route.name, now - pol.breaker.window_s)
            used = stored[route.name] + applying[route.name]
            if used >= pol.breaker.max_remediations:
                mode, tripped = "dry_run", True
                reason = (f"circuit breaker open: {used} applying runs of route {route.name!r} in the last "
                          f"{pol.breaker.window_s:g} s (limit {pol.breaker.max_remediations}); dry run only")
            else:
                applying[route.name] += 1
        tags = [f"route:{route.name}", f"{MODE_TAG}{mode}", f"alert:{req.alertname}"[:100],
                f"{FINGERPRINT_TAG}{req.fingerprint}", f"{STARTS_AT_TAG}{req.starts_at}"]
        if mode == "approve":
            tags.append(f"{TIMEOUT_TAG}{int(pol.approval_timeout_s)}")
        out.append(Decision(replace(req, mode=mode, tags=tags), "run", reason, tripped))
    return out


def run_parameters(req: RunRequest) -> dict[str, object]:
    """The flow parameters for a request: the policy decides dry_run, never the alert."""
    return {**req.params, "env": req.env, "dry_run": req.mode not in ("auto", "approve")}
