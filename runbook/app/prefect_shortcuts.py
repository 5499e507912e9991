"""Round trips Prefect's engine makes on every flow run that a long-lived executor can do without.

Traced on the sandbox (one db-slowness dry run on the warm executor): before the first task the engine and the
executor made ten sequential API calls. Four of them ask the server something that does not change while the
executor lives, and each costs 10-40 ms on a quiet machine, more on a busy one:

- ``GET /csrf-token`` once per API client, and Prefect makes a new client for the claim and another for the run.
  A server without CSRF protection (Prefect's default, and every server this project starts) answers 422 "CSRF
  protection is disabled"; the executor asks once at start and, on that answer only, runs its clients without
  CSRF support. A server that protects itself keeps the token exchange.
- ``GET /admin/storage`` (the server's default result storage) once per flow run and once more per task result
  store. It changes only when an administrator sets it (``prefect result-storage set``/``clear``): read once, then
  at most every ``STORAGE_TTL_S``.
- the per-run suspension observer (a websocket opened and awaited around every deployment run: 0.1 s before Running,
  0.2 s to close): nothing suspends our runs from outside (approval pauses inside the run).
- a TLS context per API client: Prefect builds one with ``ssl.create_default_context()`` in every client's
  constructor, even with verification off (it still loads the system's CA store), and the engine makes a client
  per flow run, per task run and per closing call: 15-30 ms of CPU each, about 0.2 s of a 7-task run here (py-spy).
  Against a plain-http API the context is never used; the executor builds it once per distinct call.

Each replacement is looked up on Prefect's module at call time and installed only where Prefect (3.9, pinned) has
the function; a Prefect without it is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ssl
import threading
import time
import types
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import httpx
import prefect.client.orchestration as prefect_clients
import prefect.flow_engine
import prefect.results
from prefect.client.orchestration import get_client
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import (
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
    PREFECT_API_URL,
    PREFECT_CLIENT_CSRF_SUPPORT_ENABLED,
)

STORAGE_TTL_S = 60.0
CSRF_DISABLED = "CSRF protection is disabled"


def run_settings(api_url: str, headers: dict[str, str] | None = None) -> dict[Any, Any]:
    """Prefect settings for the executor's clients: no CA bundle for a plain-http API, no CSRF token exchange
    with a server that says it has no CSRF protection (asked once, here; any other answer keeps it)."""
    updates: dict[Any, Any] = {}
    if api_url.startswith("http://"):
        updates[PREFECT_API_TLS_INSECURE_SKIP_VERIFY] = True  # no certifi bundle for a connection without TLS
    if api_url and server_without_csrf(api_url, headers or {}):
        updates[PREFECT_CLIENT_CSRF_SUPPORT_ENABLED] = False
    return updates


def server_without_csrf(api_url: str, headers: dict[str, str], timeout_s: float = 5.0) -> bool:
    """True only when the server itself says CSRF protection is disabled (the answer Prefect's client also turns
    its CSRF support off on, after paying the request once per client)."""
    try:
        resp = httpx.get(f"{api_url.rstrip('/')}/csrf-token", params={"client": "runbook-probe"}, headers=headers,
                         timeout=timeout_s)
    except httpx.HTTPError:
        return False  # unknown: keep Prefect's default
    return resp.status_code == 422 and CSRF_DISABLED in resp.text


def install(api_url: str) -> None:
    """Replace the suspension observer, cache the server's default result storage and, for a plain-http API,
    the TLS context of Prefect's API clients, for this process."""
    if api_url.startswith("http://") and isinstance(getattr(prefect_clients, "ssl", None), types.ModuleType):
        setattr(prefect_clients, "ssl", _OnceSsl())  # noqa: B010 - replacing a module global on purpose
    if hasattr(prefect.flow_engine, "observe_flow_run_suspension"):
        prefect.flow_engine.observe_flow_run_suspension = _no_observer
    if hasattr(prefect.results, "_read_server_default_result_storage_block_id"):
        prefect.results._read_server_default_result_storage_block_id = _default_storage_id
    if hasattr(prefect.results, "_aread_server_default_result_storage_block_id"):
        prefect.results._aread_server_default_result_storage_block_id = _adefault_storage_id


class _OnceSsl:
    """Prefect's client module's view of ``ssl``: ``create_default_context`` returns one context per distinct
    call (Prefect's two calls, bare for skip-verify and with its CA file, each set up the same way every time);
    everything else is the real module. Only installed for a plain-http API, where no context is ever used."""

    def __init__(self) -> None:
        self._made: dict[str, ssl.SSLContext] = {}
        self._lock = threading.Lock()

    def create_default_context(self, *args: Any, **kwargs: Any) -> ssl.SSLContext:
        key = repr((args, sorted(kwargs.items())))
        with self._lock:
            if key not in self._made:
                self._made[key] = ssl.create_default_context(*args, **kwargs)
            return self._made[key]

    def __getattr__(self, name: str) -> Any:
        return getattr(ssl, name)


@contextlib.contextmanager
def _no_observer(*_args: object, **_kwargs: object) -> Iterator[None]:
    yield


_storage_lock = threading.Lock()
_storage: dict[str, tuple[float, UUID | None]] = {}  # API URL -> (read at, the server's answer: None = none set)


def _default_storage_id() -> UUID | None:
    """The server's default result storage block (None: none set), read at most every STORAGE_TTL_S per API. As
    Prefect's own reader: an unreadable answer falls back to local storage (None), and is not remembered."""
    api = str(PREFECT_API_URL.value() or "")
    with _storage_lock:
        at, value = _storage.get(api, (float("-inf"), None))
    if time.monotonic() - at < STORAGE_TTL_S:
        return value
    try:
        value = get_client(sync_client=True).read_server_default_result_storage().default_result_storage_block_id
    except (httpx.HTTPError, RuntimeError, ValueError, PrefectHTTPStatusError):
        return None
    with _storage_lock:
        _storage[api] = (time.monotonic(), value)
    return value


async def _adefault_storage_id() -> UUID | None:
    return await asyncio.to_thread(contextvars.copy_context().run, _default_storage_id)
