"""`runbook run` follows a run through the server's event stream (runbook.app.remote_run.RunWatch): it reads the
run again when the run changes state, instead of every 50 ms; with no stream (refused, dropped) it polls as before.
Against the sandbox's real Prefect server, which demands its auth string on the websocket too."""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from runbook.app import remote_run
from runbook.app.remote_run import WATCHED_POLL_S, Finished, RunWatch, api_client, follow
from runbook.engine.prefect_env import env_auth_string
from runbook.engine.run_inputs import REPORT_INPUT_KEY
from runbook.sandbox import SandboxState
from tests.prefect_runs import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def api(sandbox_state: SandboxState) -> str:
    assert sandbox_state.prefect_api_url
    return sandbox_state.prefect_api_url


@pytest.fixture
def run_id(api: str) -> Iterator[str]:
    """A flow run nobody executes: the test moves it from state to state itself."""
    with api_client(api) as http:
        flow_id = http.post("/flows/", json={"name": "test-run-watch"}).raise_for_status().json()["id"]
        run = http.post("/flow_runs/", json={"flow_id": flow_id, "name": f"watch-{uuid.uuid4().hex[:8]}",
                                             "state": {"type": "PENDING", "name": "Pending"}}).raise_for_status()
        yield run.json()["id"]
        http.delete(f"/flow_runs/{run.json()['id']}")


def _set(api: str, run_id: str, state: str, name: str | None = None) -> None:
    with api_client(api) as http:
        http.post(f"/flow_runs/{run_id}/set_state", json={
            "state": {"type": state, "name": name or state.title()}, "force": True}).raise_for_status()


def _follow_driven(api: str, run_id: str, watch: RunWatch, drive: Callable[[], None],
                   on_request: Callable[[httpx.Request], None]) -> Finished:
    """Follow the run while ``drive`` moves it from state to state, every request of follow's seen by
    ``on_request``."""
    driver = threading.Thread(target=drive)
    with api_client(api) as http:
        http.event_hooks["request"].append(on_request)
        driver.start()
        try:
            return follow(http, run_id, on_log=lambda _line: None, on_paused=lambda _run: None, watch=watch)
        finally:
            driver.join()
            watch.stop()


def test_the_watch_wakes_on_each_state_change_of_its_run(api: str, run_id: str) -> None:
    watch = RunWatch(api, env_auth_string(), run_id).start()
    try:
        wait_for(watch.open.is_set, 30, "the event stream to open (auth message accepted, filter sent)")
        for state in ("RUNNING", "COMPLETED"):
            watch.changed.clear()
            _set(api, run_id, state, "Needs attention" if state == "COMPLETED" else None)  # an outcome's name
            assert watch.changed.wait(30), f"no event for the run entering {state}"
            assert watch.open.is_set()
            assert watch.ended.is_set() == (state == "COMPLETED")  # final by its type, whatever its name
        assert watch.final is not None
        assert (watch.final["type"], watch.final["name"]) == ("COMPLETED", "Needs attention"), watch.final
    finally:
        watch.stop()


def test_a_refused_stream_ends_and_follow_polls_instead(api: str, run_id: str) -> None:
    watch = RunWatch(api, "runbook:not-the-auth-string", run_id).start()
    wait_for(watch.changed.is_set, 30, "the refused stream to end")
    assert not watch.open.is_set()
    done = threading.Timer(0.5, _set, (api, run_id, "COMPLETED"))
    done.start()
    try:
        with api_client(api) as http:
            finished = follow(http, run_id, on_log=lambda _line: None, on_paused=lambda _run: None, watch=watch)
    finally:
        done.join()
    assert finished.run["state"]["type"] == "COMPLETED"


def _watched(api: str, run_id: str) -> tuple[RunWatch, list[float], Callable[[httpx.Request], None]]:
    """An open watch of the run, and a request hook that notes when follow reads the run (and the list it notes
    the times in)."""
    reads: list[float] = []

    def count(request: httpx.Request) -> None:
        if request.method == "GET" and request.url.path.endswith(f"/flow_runs/{run_id}"):
            reads.append(time.monotonic())

    watch = RunWatch(api, env_auth_string(), run_id).start()
    wait_for(watch.open.is_set, 30, "the event stream to open")
    return watch, reads, count


def test_follow_reads_the_run_when_it_changes_not_every_50_ms(api: str, run_id: str) -> None:
    watch, reads, count = _watched(api, run_id)

    def drive() -> None:
        _set(api, run_id, "RUNNING")
        time.sleep(2.0)  # a run that takes two seconds: polling would read it ~40 times
        _set(api, run_id, "COMPLETED")

    started = time.monotonic()
    finished = _follow_driven(api, run_id, watch, drive, count)
    elapsed = time.monotonic() - started
    assert finished.run["state"]["type"] == "COMPLETED"
    # one read at the start, one once it ended and one per safety poll (and one to spare), however slow the
    # machine: neither its RUNNING event nor progress polls (steps and logs, every 0.3 s) read the run (they did:
    # 9 reads here)
    bound = 1 + math.ceil(elapsed / WATCHED_POLL_S) + 2
    assert len(reads) <= bound, (len(reads), bound, elapsed)


def test_follow_reads_the_run_on_an_event_it_must_act_on_not_on_a_running_one(
        api: str, run_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's RUNNING event wakes follow without a read of the run (nothing to do); a PAUSED one is read at once
    (an approval form may be waiting). The safety poll is pushed out of the way so only events cause reads."""
    monkeypatch.setattr(remote_run, "WATCHED_POLL_S", 30.0)
    watch, reads, count = _watched(api, run_id)
    marks: dict[str, float] = {}

    def drive() -> None:
        for state, name in (("RUNNING", None), ("PAUSED", "Paused"), ("COMPLETED", None)):
            time.sleep(1.0)
            marks[state] = time.monotonic()
            _set(api, run_id, state, name)

    finished = _follow_driven(api, run_id, watch, drive, count)
    assert finished.run["state"]["type"] == "COMPLETED"
    between = {state: sum(1 for t in reads if start <= t < end) for state, start, end in (
        ("RUNNING", marks["RUNNING"], marks["PAUSED"]), ("PAUSED", marks["PAUSED"], marks["COMPLETED"]))}
    assert between == {"RUNNING": 0, "PAUSED": 1}, (between, reads, marks)


def test_a_run_that_ended_with_its_report_is_not_read_again(api: str, run_id: str) -> None:
    watch = RunWatch(api, env_auth_string(), run_id).start()
    wait_for(watch.open.is_set, 30, "the event stream to open")
    reads_after_end: list[str] = []
    ended_at: list[float] = []

    def count(request: httpx.Request) -> None:
        if request.method == "GET" and request.url.path.endswith(f"/flow_runs/{run_id}") and ended_at:
            reads_after_end.append(request.url.path)

    def drive() -> None:
        _set(api, run_id, "RUNNING")
        with api_client(api) as http:  # what the engine stores just before the final state
            http.post(f"/flow_runs/{run_id}/input", json={"key": REPORT_INPUT_KEY,
                                                          "value": json.dumps({"outcome": "Completed"})}
                      ).raise_for_status()
        ended_at.append(time.monotonic())
        _set(api, run_id, "COMPLETED", "Needs attention")

    finished = _follow_driven(api, run_id, watch, drive, count)
    assert finished.report == {"outcome": "Completed"}
    # the final state as its event gave it, not the run read again (that would carry flow_id, tags, ...)
    assert finished.run == {"id": run_id, "state": {"type": "COMPLETED", "name": "Needs attention",
                                                    "message": finished.run["state"]["message"]}}, finished.run
    assert len(reads_after_end) <= 1, reads_after_end  # a safety poll under way as it ended may still land
