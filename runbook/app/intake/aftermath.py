"""After an alert resolves: the resolve recorded with its run, the status-page incident resolved, and the
post-incident review written once the occurrence's runs have finished.

All of it runs on one thread of its own, never in the intake's request path or its worker threads: a storm of
resolves, or reviews waiting minutes for their runs, must not delay the next webhook. Resolves are handled in
arrival order (a few bounded HTTP calls each); each occurrence then waits, polled once a second, until its runs are
final or REVIEW_WAIT_S has passed, and its review is written, published and handed to ``on_review`` (/metrics).
Stopping drops what is still queued and says so: `runbook incident review` builds any of them later.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import httpx

from runbook.app.intake.resolve import ALREADY_RESOLVED, record_resolve
from runbook.app.intake.store import Occurrence
from runbook.app.remote_run import api_client
from runbook.app.review import Review, build_review, find_runs, publish_artifact, runs_final, write_files
from runbook.engine.config import Playbooks
from runbook.engine.errors import RunbookError
from runbook.engine.redact import redact

log = logging.getLogger(__name__)
REVIEW_WAIT_S = 600.0  # a review waits this long for its runs to finish, then describes them as they are
MAX_QUEUED = 10_000  # resolves and reviews held at once; beyond, a resolve is logged and left to the CLI


class Aftermath:
    def __init__(self, api_url: str, playbooks: Playbooks, reviews_dir: Path | None,
                 on_review: Callable[[Review], None]) -> None:
        self.api_url, self.playbooks, self.reviews_dir, self.on_review = api_url, playbooks, reviews_dir, on_review
        self._resolves: queue.Queue[tuple[Occurrence, datetime]] = queue.Queue(MAX_QUEUED)
        self._waiting: dict[str, float] = {}  # occurrence -> monotonic deadline of its review
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True, name="aftermath")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        left = self._resolves.qsize() + len(self._waiting)
        if left:
            log.warning("stopping with %d resolved occurrence(s) not yet reviewed (`runbook incident review` "
                        "builds them)", left)

    def resolved(self, occ: Occurrence, at: datetime) -> None:
        """Queue a resolved occurrence (called from the request path: never blocks)."""
        try:
            self._resolves.put_nowait((occ, at))
        except queue.Full:
            log.warning("resolve of %s not recorded: %d resolves already queued", occ.key, MAX_QUEUED)

    def _main(self) -> None:
        with api_client(self.api_url) as http:
            while not self._stop.is_set():
                try:
                    occ, at = self._resolves.get(timeout=1.0)
                except queue.Empty:
                    pass
                else:
                    self._record(http, occ, at)
                    if self._resolves.qsize():
                        continue  # resolves first: the status page should not wait for reviews
                self._review_ready(http)

    def _record(self, http: httpx.Client, occ: Occurrence, at: datetime) -> None:
        try:
            detail = record_resolve(http, self.playbooks, occ, at)
        except httpx.HTTPError as exc:
            detail = f"not recorded: Prefect API {type(exc).__name__}"
        log.info("alert resolved (%s, run %s): %s", occ.route, occ.flow_run_id, detail)
        if occ.flow_run_id and self.reviews_dir is not None and detail != ALREADY_RESOLVED \
                and len(self._waiting) < MAX_QUEUED:
            self._waiting.setdefault(occ.key, time.monotonic() + REVIEW_WAIT_S)

    def _review_ready(self, http: httpx.Client) -> None:
        assert self.reviews_dir is not None or not self._waiting
        for occurrence, deadline in list(self._waiting.items()):
            if self._stop.is_set():
                return
            try:
                runs = find_runs(http, occurrence)
                if not runs_final(runs) and time.monotonic() < deadline:
                    continue
                review = build_review(http, runs)
                assert self.reviews_dir is not None
                md_path, _ = write_files(review, self.reviews_dir)
                self.on_review(review)
                publish_artifact(http, review)
                log.info("post-incident review of %s written to %s", occurrence, md_path)
            except (httpx.HTTPError, RunbookError) as exc:  # the API away, or no run to review
                if time.monotonic() < deadline:
                    continue
                log.warning("no post-incident review of %s: %s", occurrence, redact(str(exc))[:300])
            self._waiting.pop(occurrence, None)
