"""The background server's record names a process by PID and start time: a reused PID is never signalled."""

from __future__ import annotations

import json
import os
from pathlib import Path

from runbook.app import local_server
from runbook.engine.daemon import start_ticks


def test_a_pid_that_now_names_another_process_is_neither_used_nor_signalled(tmp_path: Path) -> None:
    me = os.getpid()  # a live process that is not the server: stop() must not SIGTERM it (this test would die)
    ticks = start_ticks(me)
    assert ticks is not None
    (tmp_path / local_server.RECORD).write_text(json.dumps(
        {"pid": me, "ticks": ticks + 1, "port": 1, "api_url": "http://127.0.0.1:1/api"}))
    assert local_server.running(tmp_path) is None
    assert local_server.stop(tmp_path) is False
    assert not (tmp_path / local_server.RECORD).exists(), "the stale record is forgotten"
