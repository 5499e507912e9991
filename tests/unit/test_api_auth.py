"""The Prefect API auth string of the servers we start: generated once into a 0600 file, reused, sent as basic auth,
and masked wherever it could be printed."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from runbook.app.remote_run import unauthorized_message
from runbook.engine.errors import RunbookError
from runbook.engine.prefect_env import (
    AUTH_ENV,
    SERVER_AUTH_ENV,
    auth_header,
    client_env,
    ensure_auth_string,
    env_auth_string,
    prefect_server_command,
    prefect_server_env,
    read_auth_string,
)
from runbook.engine.redact import redact


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_string_is_generated_once_into_a_file_only_its_owner_reads(tmp_path: Path) -> None:
    path = tmp_path / "state" / "prefect-api-auth"
    auth = ensure_auth_string(path)
    assert _mode(path) == 0o600
    user, _, password = auth.partition(":")
    assert user == "runbook" and len(password) >= 40  # token_urlsafe(32): 43 characters, 256 bits
    assert ensure_auth_string(path) == auth, "a second call reuses the string (shells that exported it still work)"
    assert read_auth_string(path) == auth
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temp file left behind"


def test_each_server_gets_its_own_string(tmp_path: Path) -> None:
    assert ensure_auth_string(tmp_path / "a") != ensure_auth_string(tmp_path / "b")


def test_a_file_others_could_read_is_tightened_and_an_existing_string_kept(tmp_path: Path) -> None:
    path = tmp_path / "prefect-api-auth"
    path.write_text("admin:chosen-by-the-operator\n")
    path.chmod(0o644)
    assert ensure_auth_string(path) == "admin:chosen-by-the-operator"
    assert _mode(path) == 0o600


def test_an_empty_or_missing_file_means_no_string(tmp_path: Path) -> None:
    assert read_auth_string(tmp_path / "absent") is None
    (tmp_path / "empty").write_text("\n")
    assert read_auth_string(tmp_path / "empty") is None
    with pytest.raises(RunbookError, match="holds no API auth string"):  # never a server without one
        ensure_auth_string(tmp_path / "empty")
    assert (tmp_path / "empty").read_text() == "\n", "left for its owner to look at"


def test_the_header_is_basic_auth_of_the_whole_string() -> None:
    header = auth_header("runbook:s3cret-Value_x")
    assert header == {"Authorization": "Basic " + base64.b64encode(b"runbook:s3cret-Value_x").decode()}
    assert auth_header(None) == {} and auth_header("") == {}


def test_clients_and_servers_get_the_variables_prefect_reads(tmp_path: Path) -> None:
    assert client_env("http://127.0.0.1:1/api", "runbook:xyz-123456") == {
        "PREFECT_API_URL": "http://127.0.0.1:1/api", AUTH_ENV: "runbook:xyz-123456"}
    assert client_env("http://127.0.0.1:1/api", None) == {"PREFECT_API_URL": "http://127.0.0.1:1/api"}
    env = prefect_server_env(tmp_path, 4321, "sqlite+aiosqlite:///x.db", "runbook:server-side-1")
    assert env[SERVER_AUTH_ENV] == "runbook:server-side-1"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and env["DO_NOT_TRACK"] == "1"
    assert not any("server-side" in arg for arg in prefect_server_command(4321)), "never on the command line"


def test_a_loaded_string_is_masked_in_anything_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "prefect-api-auth"
    auth = ensure_auth_string(path)
    token = base64.b64encode(auth.encode()).decode()
    assert auth not in redact(f"it failed with {auth} and Basic {token}")
    assert token not in redact(f"Authorization: Basic {token}")
    monkeypatch.setenv(AUTH_ENV, "admin:from-the-environment")
    assert env_auth_string() == "admin:from-the-environment"
    assert "from-the-environment" not in redact("PREFECT_API_AUTH_STRING=admin:from-the-environment")
    monkeypatch.setenv(AUTH_ENV, "")
    assert env_auth_string() is None


def test_the_401_message_says_where_to_set_the_string() -> None:
    missing = unauthorized_message("http://127.0.0.1:4200", sent=False)
    wrong = unauthorized_message("http://127.0.0.1:4200", sent=True)
    for text in (missing, wrong):
        assert AUTH_ENV in text and SERVER_AUTH_ENV in text and "prefect-api-auth" in text
        assert "runbook sandbox env" in text
    assert "no auth string was sent" in missing and "refused the auth string sent" in wrong
