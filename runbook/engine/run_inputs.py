"""The names under which the engine keeps things with a flow run on the Prefect server, shared by the engine
that writes them and the CLI and reviews that read them over the REST API (a module of constants: the CLI's
warm path imports it before its first request)."""

REPORT_INPUT_KEY = "runbook-report"  # the finished run's report (JSON), read back by `runbook run` on the warm path
PLAN_INPUT_KEY = "runbook-plan"  # the plan a run waiting for approval shows its approvers (JSON)
PAUSE_KEY = "approval"  # the pause of a run waiting for approval
