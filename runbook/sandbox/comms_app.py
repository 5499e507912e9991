"""The sandbox's communication stand-ins (a development tool, not a real status page or chat service).

A loopback HTTP server implementing the subset of Atlassian Statuspage's REST API (v1) the engine uses: create
(``POST /v1/pages/{page_id}/incidents``), update (``PATCH .../incidents/{id}``), read (``GET .../incidents/{id}``,
``GET .../incidents``), with ``Authorization: OAuth <key>`` checked; and a Slack-compatible incoming webhook
(``POST /slack/<token>`` with ``{"text": ...}``). It records every request it accepted, in order, so tests can
check what was announced (``GET /_requests``; the Slack token is masked in the recorded path). Nothing real stands
behind it: incidents live in memory and are gone when it stops. Run as ``python -m runbook.sandbox.comms_app
--port P --keys FILE`` (FILE: JSON with ``page_id``, ``api_key``, ``slack_token``; 0600).
"""

from __future__ import annotations

import argparse
import hmac
import json
import re
import secrets
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

STATUSES = {"investigating", "identified", "monitoring", "resolved", "scheduled", "in_progress", "verifying",
            "completed"}
MAX_BODY = 1 << 20
_INCIDENTS = re.compile(r"^/v1/pages/([A-Za-z0-9_-]+)/incidents(?:/([A-Za-z0-9_-]+))?$")


class State:
    def __init__(self, page_id: str, api_key: str, slack_token: str) -> None:
        self.page_id, self.api_key, self.slack_token = page_id, api_key, slack_token
        self.incidents: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def record(self, kind: str, path: str, body: Any, incident_id: str = "") -> None:
        with self.lock:
            self.requests.append({"kind": kind, "path": path.replace(self.slack_token, "***"), "body": body,
                                  "incident_id": incident_id, "at": datetime.now(UTC).isoformat()})


def make_handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "runbook-comms-stand-in/1"

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/healthz":
                return self._send(200, {"status": "ok"})
            if self.path == "/_requests":
                with state.lock:
                    return self._send(200, list(state.requests))
            m = self._incidents()
            if m is None:
                return
            with state.lock:
                if m.group(2) is None:
                    return self._send(200, sorted(state.incidents.values(), key=lambda i: i["created_at"]))
                incident = state.incidents.get(m.group(2))
            self._send(200, incident) if incident else self._send(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.startswith("/slack/"):
                token = self.path.removeprefix("/slack/")
                if not hmac.compare_digest(token.encode(), state.slack_token.encode()):
                    return self._send(404, {"error": "no_service"})
                body = self._body()
                if not isinstance(body, dict) or not isinstance(body.get("text"), str):
                    return self._send(400, {"error": "invalid_payload"})
                state.record("slack", self.path, body)
                return self._send(200, "ok")
            m = self._incidents()
            if m is None or m.group(2) is not None:
                return self._send(405, {"error": "method not allowed"}) if m else None
            incident = self._incident_body()
            if incident is None:
                return
            now = datetime.now(UTC).isoformat()
            iid = secrets.token_hex(6)
            doc = {"id": iid, "page_id": state.page_id, "created_at": now, "updated_at": now,
                   "resolved_at": now if incident.get("status") == "resolved" else None,
                   "incident_updates": [{"status": incident.get("status"), "body": incident.get("body", ""),
                                         "created_at": now}], **incident}
            with state.lock:
                state.incidents[iid] = doc
            state.record("create", self.path, incident, iid)
            self._send(201, doc)

        def do_PATCH(self) -> None:  # noqa: N802
            m = self._incidents()
            if m is None:
                return
            iid = m.group(2) or ""
            with state.lock:
                known = iid in state.incidents
            if not known:
                return self._send(404, {"error": "not found"})
            incident = self._incident_body()
            if incident is None:
                return
            now = datetime.now(UTC).isoformat()
            with state.lock:
                doc = state.incidents[iid]
                doc.update(incident)
                doc["updated_at"] = now
                if incident.get("status") == "resolved":
                    doc["resolved_at"] = now
                doc["incident_updates"].append({"status": doc.get("status"), "body": incident.get("body", ""),
                                                "created_at": now})
                out = dict(doc)
            state.record("resolve" if incident.get("status") == "resolved" else "update", self.path, incident, iid)
            self._send(200, out)

        # ---------------------------------------------------------------- helpers

        def _incidents(self) -> re.Match[str] | None:
            """The incidents path, authorised for the page; otherwise the error is sent and None returned."""
            m = _INCIDENTS.match(self.path)
            if m is None:
                self._send(404, {"error": "not found"})
                return None
            auth = self.headers.get("authorization", "")
            if not hmac.compare_digest(auth.encode(), f"OAuth {state.api_key}".encode()):
                self._send(401, {"error": "Could not authenticate"})
                return None
            if m.group(1) != state.page_id:
                self._send(404, {"error": "page not found"})
                return None
            return m

        def _incident_body(self) -> dict[str, Any] | None:
            body = self._body()
            incident = body.get("incident") if isinstance(body, dict) else None
            if not isinstance(incident, dict) or not isinstance(incident.get("name", ""), str) \
                    or incident.get("status", "investigating") not in STATUSES:
                self._send(422, {"error": "incident: name (text) and a known status expected"})
                return None
            return incident

        def _body(self) -> Any:
            size = int(self.headers.get("content-length") or 0)
            if size > MAX_BODY:
                return None
            try:
                return json.loads(self.rfile.read(size) or b"null")
            except ValueError:
                return None

        def _send(self, code: int, doc: Any) -> None:
            data = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--keys", type=Path, required=True)
    args = parser.parse_args()
    keys = json.loads(args.keys.read_text())
    state = State(keys["page_id"], keys["api_key"], keys["slack_token"])
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(state))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
