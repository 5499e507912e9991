"""The intake's bounds, in one place: request sizes, alerts per webhook, connection timeouts and counts, and a log
that says "this happened N times" instead of writing a line (or a traceback) per hostile request."""

from __future__ import annotations

import logging
import resource
import threading
import time
from dataclasses import dataclass

from runbook.app.intake.models import MAX_ALERTS

MAX_BODY = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one intake process accepts. ``max_connections`` 0 means "from the open-file limit" (see
    ``connection_cap``)."""

    max_body: int = MAX_BODY  # bytes per request, counted while streaming
    max_alerts: int = MAX_ALERTS  # per webhook; the rest are rejected one by one
    header_timeout_s: float = 10.0  # a request's headers must be complete within this of the connection (or of
    # the previous response on a kept-alive one)
    body_timeout_s: float = 30.0  # ... and its body within this of its headers
    keep_alive_s: float = 5.0  # an idle kept-alive connection is closed after this
    max_connections: int = 0  # beyond it the connection waiting longest for its client is closed
    max_in_flight: int = 64  # webhooks being processed at once; beyond, 503 (Alertmanager retries)

    def connection_cap(self) -> int:
        """``max_connections``, or what the open-file soft limit leaves after 64 descriptors for the process
        (store, connections to Prefect, the executor's runs) and four accept batches; 64 to 10,000."""
        if self.max_connections > 0:
            return self.max_connections
        return max(64, min(10_000, _open_files() - 64 - 4 * self.accept_batch()))

    def accept_batch(self) -> int:
        """How many connections asyncio accepts in one go before any of them is looked at (the cap is enforced
        once a connection is made, and an evicted one frees its descriptor a few loop turns later): a sixteenth of
        the open-file limit, 16 to 1,024, so the batches in flight fit in the descriptors the cap leaves and the
        process never hits EMFILE (asyncio would stop accepting for a second). The kernel's listen queue is
        deeper (server.LISTEN_QUEUE): a burst waits there instead of having its SYNs dropped."""
        return max(16, min(1024, _open_files() // 16))


def _open_files() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def raise_open_files_limit(ceiling: int = 1 << 20) -> int:
    """Raise the open-file soft limit to the hard limit where allowed (systemd's LimitNOFILE=1024 soft is the
    usual cap on connections); returns the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # not allowed here: the connection cap follows the limit we have
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _Folding:
    """Admits one event per key per interval and counts the ones it folds into the next admitted one."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[object, tuple[float, int]] = {}  # key -> (when last admitted, events folded since)

    def admit(self, key: object) -> str | None:
        """None to drop the event; else the suffix to write with it ('' or "(and N more like it ...)")."""
        now = time.monotonic()
        with self._lock:
            last, folded = self._last.get(key, (-self.interval_s, 0))
            if now - last < self.interval_s:
                self._last[key] = (last, folded + 1)
                return None
            self._last[key] = (now, 0)
        return f" (and {folded} more like it in the last {now - last:.0f} s)" if folded else ""


class RateLimitedLog:
    """One line per kind of event per interval, saying how many were folded into it.

    A flood of aborted uploads, malformed requests or stalled connections must not write a line, let alone a
    traceback, per request: the intake once wrote 59 MB of log in 20 s that way.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger = logger
        self._folding = _Folding(interval_s)

    def note(self, kind: str, message: str, level: int = logging.WARNING) -> None:
        more = self._folding.admit(kind)
        if more is not None:
            self.logger.log(level, "%s%s", message, more)


class RateLimitFilter(logging.Filter):
    """The same folding for other libraries' loggers (uvicorn's "Invalid HTTP request received.", asyncio's
    accept errors when file descriptors run out): one record per message per interval; a traceback is kept only
    on the record that is written."""

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self._folding = _Folding(interval_s)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        more = self._folding.admit((record.name, str(record.msg)[:200]))
        if more is None:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError):  # EMFILE, ECONNRESET...: the traceback says nothing more (and formatting it
            more = f": {exc!r}{more}"  # may need the very file descriptors that ran out)
            record.exc_info, record.exc_text = None, None
        if more:
            record.msg, record.args = record.getMessage() + more, ()
        return True


def install_rate_limit(*logger_names: str, interval_s: float = 10.0) -> None:
    """Fold repeated warnings of these loggers (idempotent: one filter per logger)."""
    for name in logger_names:
        lg = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) for f in lg.filters):
            lg.addFilter(RateLimitFilter(interval_s))
