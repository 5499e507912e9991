"""A real headless Chromium driven over the DevTools protocol, for looking at the Prefect UI as a person would.

Hand-written on `websockets` (already installed with Prefect) because the CDP calls needed are four; Selenium or
Playwright would bring a driver or a browser download this machine cannot fetch. Chromium runs with the flags
that keep it on loopback (no background networking, every host but 127.0.0.1 unresolvable).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class Browser:
    def __init__(self, profile: Path) -> None:
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--disable-extensions", "--window-size=1400,1000",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
             f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = self._devtools_port()
        self.base = f"http://127.0.0.1:{port}"
        target = httpx.put(f"{self.base}/json/new?about:blank", timeout=10).json()
        self.ws = connect(target["webSocketDebuggerUrl"], max_size=50 * 1024 * 1024, open_timeout=10)
        self._ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Runtime.enable")

    def _devtools_port(self, timeout_s: float = 30) -> int:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                return int(m.group(1))
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError("chromium did not start its DevTools endpoint")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def js(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return res.get("result", {}).get("value")

    def wait_for_text(self, *needles: str, timeout_s: float = 45) -> str:
        deadline = time.monotonic() + timeout_s
        text = ""
        while time.monotonic() < deadline:
            text = self.js("document.body ? document.body.innerText : ''") or ""
            if all(n in text for n in needles):
                return text
            time.sleep(0.3)
        raise AssertionError(f"page never showed {needles}; it shows: {text[:1500]!r}")

    def login(self, ui: str, auth: str, timeout_s: float = 45) -> None:
        """Sign in to the Prefect UI as a person does: its login form (shown because the server demands basic auth)
        takes the server's auth string; the UI keeps it in localStorage and sends it with every API call."""
        self.goto(ui)
        self.wait_for_text("Login", timeout_s=timeout_s)
        deadline = time.monotonic() + timeout_s
        while not self.js("!!document.querySelector('input[type=password]')"):
            if time.monotonic() > deadline:
                raise AssertionError("the Prefect UI showed no login form")
            time.sleep(0.3)
        self.js(  # the native setter and an input event: what typing does, so the UI's own model sees the value
            "(() => { const el = document.querySelector('input[type=password]');"
            " Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(el, "
            f"{json.dumps(auth)}); el.dispatchEvent(new Event('input', {{bubbles: true}}));"
            " el.form.requestSubmit(); })()")
        while self.js("!!document.querySelector('input[type=password]') || !localStorage.getItem('prefect-password')"):
            if time.monotonic() > deadline:
                raise AssertionError(f"the Prefect UI did not accept the auth string; it shows: "
                                     f"{(self.js('document.body.innerText') or '')[:500]!r}")
            time.sleep(0.3)

    def click_text(self, text: str) -> bool:
        return bool(self.js(
            "(() => { const els = [...document.querySelectorAll('button, a, [role=button]')];"
            f" const el = els.find(e => e.innerText.trim() === {json.dumps(text)});"
            " if (el) { el.click(); return true; } return false; })()"))

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
