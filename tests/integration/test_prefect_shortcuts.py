"""The round trips the warm executor leaves out (runbook.app.prefect_shortcuts), checked against the sandbox's real
Prefect server: each shortcut is taken only where the server's own answer allows it, and Prefect still works."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import prefect.client.orchestration as prefect_clients
import prefect.results
import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.settings import PREFECT_CLIENT_CSRF_SUPPORT_ENABLED, temporary_settings

from runbook.app import prefect_shortcuts
from runbook.sandbox import SandboxState
from tests.prefect_runs import api_headers, api_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def api(sandbox_state: SandboxState) -> str:
    assert sandbox_state.prefect_api_url
    return sandbox_state.prefect_api_url


def test_csrf_exchange_is_dropped_only_when_the_server_says_it_has_no_csrf_protection(api: str) -> None:
    assert prefect_shortcuts.server_without_csrf(api, api_headers())
    assert prefect_shortcuts.run_settings(api, api_headers())[PREFECT_CLIENT_CSRF_SUPPORT_ENABLED] is False


def test_a_server_with_csrf_protection_keeps_the_token_exchange(csrf_server: str) -> None:
    """A loopback stand-in answering /csrf-token with a token, as a Prefect server with
    PREFECT_SERVER_CSRF_PROTECTION_ENABLED does (starting a second real server for one answer costs ~30 s)."""
    assert not prefect_shortcuts.server_without_csrf(csrf_server, {})
    assert PREFECT_CLIENT_CSRF_SUPPORT_ENABLED not in prefect_shortcuts.run_settings(csrf_server, {})


def test_an_unreachable_server_keeps_prefects_defaults() -> None:
    assert not prefect_shortcuts.server_without_csrf("http://127.0.0.1:9/api", {}, timeout_s=1)


def test_the_default_result_storage_is_read_once_and_is_the_servers_answer(api: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    real = SyncPrefectClient.read_server_default_result_storage
    calls: list[int] = []

    def counted(self: SyncPrefectClient) -> object:  # a spy: the real request is made
        calls.append(1)
        return real(self)

    monkeypatch.setattr(SyncPrefectClient, "read_server_default_result_storage", counted)
    monkeypatch.setattr(prefect_shortcuts, "_storage", {})
    prefect_shortcuts.install(api)
    expected = httpx.get(f"{api}/admin/storage", headers=api_headers(), timeout=10).json()
    with temporary_settings(updates=api_settings(api)):
        answers = [prefect.results._read_server_default_result_storage_block_id() for _ in range(3)]
    assert len(calls) == 1
    assert {str(a) if a else None for a in answers} == {expected.get("default_result_storage_block_id")}


def test_prefect_clients_share_one_tls_context_and_still_talk_to_the_server(api: str) -> None:
    prefect_shortcuts.install(api)
    once = prefect_clients.ssl
    assert once.create_default_context() is once.create_default_context()
    assert once.create_default_context(cafile=None) is not once.create_default_context()
    assert once.CERT_NONE == __import__("ssl").CERT_NONE  # the rest is the real module
    with temporary_settings(updates=api_settings(api)), get_client(sync_client=True) as client:
        assert client.hello().status_code == 200
        assert client.read_flow_runs(limit=1) is not None


def test_an_https_api_keeps_prefects_tls_setup() -> None:
    """A fresh process: install() for an https API leaves Prefect's ``ssl`` alone (verification as configured)."""
    code = ("import types, prefect.client.orchestration as c; from runbook.app import prefect_shortcuts as s; "
            "s.install('https://127.0.0.1:9/api'); assert isinstance(c.ssl, types.ModuleType)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture
def csrf_server() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            body = json.dumps({"token": "t", "client": "runbook-probe", "expiration": "2030-01-01T00:00:00Z"})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()
        server.server_close()
