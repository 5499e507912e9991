"""Keeps secrets out of logs, artifacts, reports and error messages.

Every resolved secret registers its value here; ``redact`` replaces those values and any credentials embedded in
URLs/DSNs. Renderers and the log filter call it, so a secret that slips into an exception text is still scrubbed.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any
from urllib.parse import unquote

MASK = "***"
_MIN_SECRET_LEN = 6
_lock = threading.Lock()
_secrets: set[str] = set()
# scheme://user:password@host  ->  scheme://user:***@host
_URL_CREDENTIALS = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]+)(?P<post>@)")
# libpq keyword form: password=secret
_KEYWORD_PASSWORD = re.compile(r"(?P<pre>\bpassword\s*=\s*)(?P<pw>'[^']*'|\S+)", re.IGNORECASE)


def register_secret(value: str) -> None:
    """Remember a secret (and the password inside it, if it is a URL) so that every later output masks it."""
    candidates = {value}
    for m in _URL_CREDENTIALS.finditer(value or ""):
        candidates |= {m.group("pw"), unquote(m.group("pw"))}
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


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in the final message (Prefect's run logger included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to logging's own error handling
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_log_redaction() -> None:
    """Attach the filter to every handler of the root and Prefect loggers (idempotent)."""
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
