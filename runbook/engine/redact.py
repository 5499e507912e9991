"""Keeps secrets out of logs, artifacts, reports and error messages.

Every resolved secret registers its value here; ``redact`` replaces those values and any credentials embedded in
URLs/DSNs. Renderers and the log filter call it, so a secret that slips into an exception text is still scrubbed.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote

from runbook.engine.errors import RunbookError

MASK = "***"
_MIN_SECRET_LEN = 6
_lock = threading.Lock()
_secrets: set[str] = set()
# scheme://user:password@host  ->  scheme://user:***@host
_URL_CREDENTIALS = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]+)(?P<post>@)")
# libpq keyword form: password=secret
_KEYWORD_PASSWORD = re.compile(r"(?P<pre>\bpassword\s*=\s*)(?P<pw>'[^']*'|\S+)", re.IGNORECASE)
# a keyword password as a person may have mistyped it: unquoted, with spaces, up to the next ``key=`` or the end
_KEYWORD_PASSWORD_LOOSE = re.compile(r"\bpassword\s*=\s*(?P<pw>.*?)\s*(?=\s[A-Za-z_]+\s*=|$)", re.IGNORECASE)


def register_secret(value: str) -> None:
    """Remember a secret, and the password inside it if it is a DSN, so that every later output masks it.

    A password libpq cannot parse (an unquoted space in a keyword DSN, a stray ``%`` in a URL) is registered too,
    whole and word by word: its parse error would otherwise quote a part of it."""
    candidates = {value}
    for m in _URL_CREDENTIALS.finditer(value or ""):
        candidates |= {m.group("pw"), unquote(m.group("pw"))}
    for m in _KEYWORD_PASSWORD_LOOSE.finditer(value or ""):
        pw = m.group("pw").strip("'")
        candidates |= {pw, *pw.split()}
    with _lock:
        # very short values would mask innocent text everywhere; they are still masked inside URLs by pattern
        _secrets.update(c for c in candidates if len(c) >= _MIN_SECRET_LEN)


def redact(text: str) -> str:
    """Return ``text`` with every known secret and every URL/keyword password masked."""
    if not text:
        return text
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _URL_CREDENTIALS.sub(lambda m: m.group("pre") + MASK + m.group("post"), text)
    return _KEYWORD_PASSWORD.sub(lambda m: m.group("pre") + MASK, text)


def redact_obj(value: Any) -> Any:
    """Redact every string inside a JSON-like structure."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_obj(k): redact_obj(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_obj(v) for v in value]
    return value


def mask_exception(exc: BaseException) -> BaseException:
    """``exc`` itself when neither its text nor its chain holds a secret; else a copy of the same type with the
    secrets masked in its args and string attributes and no chain (the chain is what held them).

    A copy whose text still leaks (a class that formats its message from elsewhere) becomes a RunbookError that
    names the type. Prefect builds state messages and "Encountered exception" log lines from ``str(exc)`` and
    ``repr(exc)``, so what leaves a flow or a task must already be clean.
    """
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    if all(redact(_text(e)) == _text(e) for e in chain):
        return exc
    try:
        clean = type(exc).__new__(type(exc))  # not copy.copy: that calls __init__ with args it may not take
        clean.args = tuple(redact(a) if isinstance(a, str) else a for a in exc.args)
        for key, value in vars(exc).items():
            setattr(clean, key, redact(value) if isinstance(value, str) else value)
        if redact(_text(clean)) != _text(clean):
            raise ValueError("still leaks")
    except Exception:  # noqa: BLE001 - any class that cannot be copied cleanly gets the generic error
        clean = RunbookError(redact(f"{type(exc).__name__}: {exc}"))
    clean.__cause__, clean.__context__, clean.__suppress_context__ = None, None, True
    return clean.with_traceback(exc.__traceback__)


def _text(exc: BaseException) -> str:
    try:
        return f"{exc} {exc!r}"
    except Exception:  # noqa: BLE001 - a broken __str__ has no secret to show
        return ""


@contextmanager
def masked_exceptions() -> Iterator[None]:
    """Re-raise any exception leaving the block with its secrets masked (``mask_exception``)."""
    try:
        yield
    except Exception as exc:
        clean = mask_exception(exc)
        if clean is exc:
            raise
        raise clean from None


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in the final message and in the traceback that goes with it (Prefect's
    run logger included: its API handler and console format ``exc_text`` when it is set)."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to logging's own error handling
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_log_redaction() -> None:
    """Attach the filter to every handler of the root and Prefect loggers (idempotent)."""
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
