"""The fence before applying: a run that the server no longer has Running (a reconciler took its executor for dead
and crashed it, or it was cancelled) must not apply; one still Running may. Against the sandbox's Prefect server."""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Crashed

from runbook.engine.procedure import _taken_over

pytestmark = pytest.mark.integration


@flow(name="fence-probe", persist_result=False)
def fence_probe(crash_first: bool) -> str | None:
    ctx = FlowRunContext.get()
    assert ctx is not None and ctx.flow_run is not None
    if crash_first:  # what Reconciler._finish does to the run of an executor it believes dead
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(ctx.flow_run.id, Crashed(message="its executor runbook-x-1 stopped "
                                                                       "heartbeating 31 s ago"), force=True)
    return _taken_over()


def test_a_crashed_run_is_fenced_and_a_running_one_is_not(sandbox_state) -> None:  # noqa: ANN001
    with temporary_settings(updates={PREFECT_API_URL: sandbox_state.prefect_api_url}):
        assert fence_probe(False) is None
        reason = fence_probe(True, return_state=True).result(raise_on_failure=False)
    assert isinstance(reason, str) and "Crashed" in reason and "stopped heartbeating" in reason, reason
