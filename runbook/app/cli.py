"""`runbook`: the operator's command line. Errors are mapped to exit codes here, at one boundary.

Exit codes (`runbook run`): 0 nothing critical found, nothing failed; 4 critical found, remediated and verified;
3 needs attention (something critical remains, a remediation failed, or changes were not applied: dry run,
rejected, timed out); 2 bad input (unknown procedure, invalid playbook, missing secret, bad parameter, approval
refused at the prompt or impossible without a terminal); 1 engine failure.

Imports of Prefect, the catalog (every flow and task module), the executor and the sandbox sit inside the commands
that need them: `runbook --help`, `check` and `sandbox ...` would otherwise pay seconds of imports. These are the
only function-local imports of our own modules (tests/unit/test_import_contracts.py checks it).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from rich.console import Console
from rich.text import Text

from runbook.engine.errors import BadInput, ConfigError, RunbookError
from runbook.engine.redact import redact

EXIT_OK, EXIT_ENGINE, EXIT_BAD_INPUT, EXIT_CRITICAL, EXIT_REMEDIATED = 0, 1, 2, 3, 4
OUTCOME_EXIT = {"Completed": EXIT_OK, "Remediated": EXIT_REMEDIATED, "Needs attention": EXIT_CRITICAL,
                "Not applied": EXIT_CRITICAL}

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Executable runbook for the Pafar platform: diagnose, then remediate (dry run by default).")
sandbox_app = typer.Typer(no_args_is_help=True, help="Real local services for tests, the demo and benchmarks.")
app.add_typer(sandbox_app, name="sandbox")
backups_app = typer.Typer(no_args_is_help=True, help="Backups in an environment's backup location.")
app.add_typer(backups_app, name="backups")
local_app = typer.Typer(no_args_is_help=True, help="The background Prefect server and executor `runbook run` starts "
                                                    "when PREFECT_API_URL is not set.")
app.add_typer(local_app, name="local")
incident_app = typer.Typer(no_args_is_help=True, help="What an alert's runs did: the post-incident review.")
app.add_typer(incident_app, name="incident")

# No markup on either console: errors and reports quote user text (a pattern such as ^[a-z][a-z0-9_-]{0,62}$, a
# path, a server's message) that rich would otherwise read as style tags and drop. Styles go in as Text.
out = Console(markup=False)
err = Console(stderr=True, markup=False)


def _fail(code: int, message: str) -> typer.Exit:
    err.print(Text.assemble(("error:", "bold red"), " ", redact(message)), highlight=False, soft_wrap=True)
    return typer.Exit(code)


# ------------------------------------------------------------------ list / check


@app.command("list")
def list_procedures() -> None:
    """Every procedure with its summary and the parameters `--param` takes (type, default, what it means)."""
    from rich.table import Table

    from runbook.app.catalog import PROCEDURES

    for info in PROCEDURES.values():
        out.print(Text.assemble((info.name, "bold"), "  ", info.summary), highlight=False)  # wrapped to the width
        help_text = info.form_schema()["properties"]
        params = Table(box=None, show_header=False, pad_edge=False, padding=(0, 1))
        params.add_column(style="cyan", no_wrap=True)
        params.add_column(overflow="fold")
        for p in info.parameters():
            default = "" if p.default is inspect.Parameter.empty else f" (default {p.default})"
            params.add_row(f"  {p.name}={_type_name(p.annotation)}",
                           f"{help_text.get(p.name, {}).get('description', '')}{default}")
        if params.row_count:
            out.print(params)


def _type_name(ann: Any) -> str:
    origin = get_origin(ann)
    if origin is Annotated:
        return _type_name(get_args(ann)[0])
    if origin in (Union, UnionType):
        return " | ".join(_type_name(a) for a in get_args(ann))
    if origin is Literal:
        return "|".join(str(a) for a in get_args(ann))
    if ann is type(None):
        return "None"
    return ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")


@app.command()
def check(
    playbooks: Annotated[list[Path] | None, typer.Option("--playbooks", help="directory (or file) to check")] = None,
    schema: Annotated[bool, typer.Option("--schema", help="print the playbook JSON schema and exit")] = False,
    env: Annotated[str | None, typer.Option("--env", help="also resolve this environment's secrets")] = None,
) -> None:
    """Validate every playbook; each error names the file, the path inside it and what was expected."""
    from runbook.engine.config import iter_secret_refs, load_playbooks, playbook_json_schema

    if schema:
        print(json.dumps(playbook_json_schema(), indent=2))
        return
    try:
        loaded = load_playbooks(playbooks)
        if not loaded.files:
            where = ", ".join(map(str, playbooks)) if playbooks else "the defaults"
            raise ConfigError(f"no playbook files found in {where}")
        if env:
            from runbook.engine.clients import check_secrets  # the clients' imports cost ~0.8 s: only with --env

            target = loaded.environment(env)
            target.check_env_file()
            check_secrets(target, everything=True)  # every secret resolved, every DSN parsed as libpq reads it
    except ConfigError as exc:
        raise _fail(EXIT_BAD_INPUT, str(exc)) from None
    for e in loaded.environments.values():
        refs = ", ".join(ref.describe() for _, ref in iter_secret_refs(e, everything=True)) or "none"
        out.print(Text.assemble(("ok", "green"), f" {e.name} ({e.source}): secrets referenced: {refs}"),
                  highlight=False)
    out.print(f"{len(loaded.files)} file(s), {len(loaded.environments)} environment(s) valid")


# ------------------------------------------------------------------ run


def _raw_params(raw: list[str]) -> dict[str, str]:
    """``k=v`` strings as a dict; ``env`` and ``dry_run`` are flags (--env, --apply), never parameters."""
    params: dict[str, str] = {}
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInput(f"--param {item!r}: expected key=value")
        if key in ("env", "dry_run"):
            raise BadInput(f"--param {key}: use {'--env' if key == 'env' else '--apply'} instead")
        params[key] = value
    return params


@app.command()
def run(
    procedure: Annotated[str, typer.Argument(help="procedure name, see `runbook list`")],
    env: Annotated[str, typer.Option("--env", help="environment from the playbooks")],
    param: Annotated[list[str] | None, typer.Option("--param", help="procedure parameter as key=value")] = None,
    apply: Annotated[bool, typer.Option("--apply", help="carry out remediations (default: dry run)")] = False,
    output: Annotated[str, typer.Option("--output", help="text or json")] = "text",
    yes: Annotated[bool, typer.Option("--yes", help="with --apply: approve the plan without the prompt (scripts); "
                                                    "recorded as this OS user and host")] = False,
    in_process: Annotated[bool, typer.Option("--in-process", help="run the flow in this process instead of "
                                             "handing it to a warm executor")] = False,
) -> None:
    """Run a procedure: a dry run unless --apply. Procedures that need approval show the plan and ask for `yes`.

    With a warm executor reachable (`runbook serve` or `runbook worker` on PREFECT_API_URL, or the background one
    this command starts at a terminal when PREFECT_API_URL is not set; RUNBOOK_LOCAL_SERVER=1 asks for it from a
    script) the run goes there, like an alert's run, and its progress and report come back here; otherwise the
    flow runs in this process.
    """
    if output not in {"text", "json"}:
        raise _fail(EXIT_BAD_INPUT, f"--output {output!r}: expected 'text' or 'json'")
    try:
        if yes and not apply:
            raise BadInput("--yes needs --apply (a dry run has nothing to approve)")
        raw = _raw_params(param or [])
    except BadInput as exc:
        raise _fail(EXIT_BAD_INPUT, str(exc)) from None
    if not in_process:
        try:
            warm = _warm_api()
        except BadInput as exc:  # the API refused our auth string: running elsewhere would hide that
            raise _fail(EXIT_BAD_INPUT, str(exc)) from None
        if warm:
            _run_warm(*warm, procedure, env, raw, apply, yes, output)  # exits, unless no executor took the run
    _run_in_process(procedure, env, raw, apply, yes, output)


def _preload(*modules: str) -> None:
    """Import ``modules`` in a background thread while this process waits on the Prefect server (its first
    requests, then the run): the report's models cost ~30 ms of CPU that need not come before the run is
    created. An import in the main thread meanwhile waits for the module, as any concurrent import does."""

    def load() -> None:
        for name in modules:
            importlib.import_module(name)

    threading.Thread(target=load, name="preload", daemon=True).start()


def _warm_api() -> tuple[str, str | None] | None:
    """The API (and its auth string) of a Prefect server with a live warm executor: PREFECT_API_URL's, or the
    background one (started now when nothing is configured). None when there is none to use (the run then happens
    in this process)."""
    from runbook.app import remote_run
    from runbook.engine.prefect_env import env_auth_string

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        from runbook.app import local_server

        # a person at a terminal gets the background server; scripts and CI keep the embedded API unless asked
        if not (sys.stderr.isatty() or os.environ.get("RUNBOOK_LOCAL_SERVER") == "1"):
            return None
        try:
            api = local_server.ensure(say=lambda line: err.print(line, style="dim", highlight=False, markup=False,
                                                                 soft_wrap=True))
        except RunbookError as exc:
            err.print(f"no background server ({redact(str(exc))[:300]}); running in this process", style="yellow",
                      markup=False, highlight=False)
            return None
        return api, local_server.auth_string()
    auth = env_auth_string()
    with remote_run.api_client(api, timeout_s=2, auth=auth or "") as http:
        return (api, auth) if remote_run.warm_executor_ready(http) else None


def _run_warm(api: str, auth: str | None, procedure: str, env: str, raw: dict[str, str], apply: bool, yes: bool,
              output: str) -> None:
    """Create the run on the server, follow its log, answer an approval here, print its report and exit; returns
    only when no executor claimed the run in time and it was withdrawn (the caller then runs it in process).

    A dry run reads no playbooks here: the server checks ``env`` against the environments it was deployed with,
    and the executor resolves it. Applying reads them for the environment's approval rule (ask before creating
    the run, not after it paused, when there is no terminal to ask at)."""
    from runbook.app import remote_run

    started = time.monotonic()
    with remote_run.api_client(api, auth=auth or "") as http:
        try:
            dep = remote_run.deployment(http, procedure)
            params = remote_run.coerce_params(dep.get("parameter_openapi_schema") or {}, raw)
            if apply:
                from runbook.engine.config import load_playbooks

                required = remote_run.APPROVAL_TAG in (dep.get("tags") or []) or \
                    load_playbooks().environment(env).approvals.get(procedure) == "required"
                if required and not yes and not _interactive():
                    raise BadInput(f"{procedure} needs approval to apply and there is no terminal to ask at: run it "
                                   "at a terminal (it shows the plan and asks for `yes`) or pass --yes from a script")
            created = remote_run.create_run(http, dep, {"env": env, "dry_run": not apply, **params})
        except (ConfigError, BadInput) as exc:
            raise _fail(EXIT_BAD_INPUT, str(exc)) from None
        except RunbookError as exc:
            raise _fail(EXIT_ENGINE, str(exc)) from None
        run_id = created["id"]
        _preload("runbook.engine.findings", "runbook.engine.decisions")  # wanted once the run ends or pauses
        err.print(f"run {created['name']} ({run_id}) on the warm executor at {api.removesuffix('/api')}",
                  style="dim", highlight=False, markup=False, soft_wrap=True)

        def on_log(line: dict[str, Any]) -> None:
            err.print(f"{time.monotonic() - started:5.1f}s {redact(str(line.get('message', '')))[:300]}",
                      style="dim", highlight=False, markup=False, soft_wrap=True)

        def on_step(st: remote_run.Step) -> None:
            err.print(f"{time.monotonic() - started:5.1f}s {'ok ' if st.state == 'Completed' else st.state + ' '}"
                      f"{st.name} ({st.seconds:.2f} s)", style="dim", highlight=False, markup=False, soft_wrap=True)

        def on_paused(run_doc: dict[str, Any]) -> None:
            from runbook.engine.decisions import operator_identity, parse_plan_input

            view = parse_plan_input(remote_run.waiting_plan(http, run_id) or "")
            if view is None:
                return  # not our approval form: leave it to the UI
            decision = (_auto_approver if yes else _terminal_approver)(view)  # as for a run in this process
            remote_run.resume(http, run_id, decision.approved, decision.approver or operator_identity(),
                              decision.reason or decision.how)

        watch = remote_run.RunWatch(api, auth, run_id).start()
        try:
            finished = remote_run.follow(http, run_id, on_log, on_paused, on_step, watch=watch)
        except remote_run.NotClaimed as exc:
            err.print(f"{exc}; running it in this process", style="yellow", highlight=False, markup=False,
                      soft_wrap=True)
            return
        except RunbookError as exc:
            raise _fail(EXIT_ENGINE, f"{procedure}: {exc}") from None
        finally:
            watch.stop()
    doc = finished.report
    global _quick_exit
    _quick_exit = True  # nothing of Prefect's in this process: no queued logs or events for atexit to flush
    if doc is None:
        state = finished.run.get("state") or {}
        raise _fail(EXIT_BAD_INPUT if "ConfigError" in str(state.get("message")) else EXIT_ENGINE,
                    f"{procedure} ended {state.get('name')} without a report: {redact(str(state.get('message')))}")
    from runbook.engine.findings import render_terminal, report_from_json

    _print_report(doc, output, render_terminal, report_from_json)


def _print_report(doc: dict[str, Any], output: str, render: Any, parse: Any) -> None:
    report = parse(doc)
    if output == "json":
        print(json.dumps(doc, indent=2))
    else:
        render(report, out)
    raise typer.Exit(OUTCOME_EXIT.get(report.outcome, EXIT_CRITICAL if report.has_critical else EXIT_OK))


def _run_in_process(procedure: str, env: str, raw: dict[str, str], apply: bool, yes: bool,
                    output: str) -> None:
    from runbook.app.catalog import PROCEDURES
    from runbook.engine.clients import check_secrets
    from runbook.engine.config import load_playbooks
    from runbook.engine.decisions import local_approver
    from runbook.engine.findings import render_terminal, report_from_json
    from runbook.engine.procedure import attended_run

    if procedure not in PROCEDURES:
        raise _fail(EXIT_BAD_INPUT, f"unknown procedure {procedure!r}; known: {', '.join(PROCEDURES)}")
    spec = PROCEDURES[procedure]
    try:
        params = spec.validate_params(dict(raw), label="--param ")
        environment = load_playbooks().environment(env)
        check_secrets(environment)  # fail fast, before a flow run exists: secrets resolved, DSNs parsed
        if apply and spec.approval_for(environment) == "required" and not yes and not _interactive():
            raise BadInput(f"{procedure} needs approval to apply and there is no terminal to ask at: run it at a "
                           "terminal (it shows the plan and asks for `yes`), pass --yes from a script, or run it "
                           "through the Prefect server (it pauses for approval)")
    except (ConfigError, BadInput) as exc:
        raise _fail(EXIT_BAD_INPUT, str(exc)) from None
    flow_fn = spec.load_flow()
    try:
        with attended_run(), local_approver(_auto_approver if yes else _terminal_approver):
            doc = flow_fn(env=environment.name, dry_run=not apply, **params)
    except (ConfigError, BadInput) as exc:
        raise _fail(EXIT_BAD_INPUT, str(exc)) from None
    except RunbookError as exc:
        raise _fail(EXIT_ENGINE, f"{procedure} failed: {exc}") from None
    except Exception as exc:  # the engine's last line: a bug or unexpected library error; redacted, no traceback
        if _unauthorized(exc):
            raise _fail(EXIT_BAD_INPUT, _unauthorized(exc)) from None
        raise _fail(EXIT_ENGINE, f"{procedure} failed unexpectedly: {type(exc).__name__}: {exc}") from None
    _print_report(doc, output, render_terminal, report_from_json)


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _unauthorized(exc: BaseException) -> str:
    """The auth message when ``exc`` (or what caused it) is a 401 from the Prefect API (Prefect's own client raises
    httpx's HTTPStatusError); "" otherwise."""
    import httpx

    from runbook.app.remote_run import unauthorized_for

    cur: BaseException | None = exc
    while cur is not None:
        if isinstance(cur, httpx.HTTPStatusError) and cur.response.status_code == 401:
            return unauthorized_for(cur.request)
        cur = cur.__cause__ or cur.__context__
    return ""


def _auto_approver(view: Any) -> Any:
    """--yes: the plan is printed for the record and approved as the OS user and host running the script."""
    from runbook.engine.decisions import Decision, operator_identity

    err.print(view.text(), markup=False, highlight=False)
    return Decision(approved=True, approver=operator_identity(), how="--yes (script)")


def _terminal_approver(view: Any) -> Any:
    """Terraform's habit: print the plan, apply only on the literal answer `yes`."""
    from runbook.engine.decisions import Decision, operator_identity

    if not _interactive():
        return Decision(approved=False, reason="no terminal to ask at (pass --yes from a script)")
    err.print(view.text(), markup=False, highlight=False)
    err.print("Only 'yes' will be accepted to approve.", highlight=False)
    try:
        answer = input("Apply this plan? ").strip()
    except EOFError:
        answer = ""
    who = operator_identity()
    if answer != "yes":
        return Decision(approved=False, approver=who, reason=f"answered {answer[:20]!r} at the terminal",
                        how="at the terminal")
    return Decision(approved=True, approver=who, how="at the terminal")


# ------------------------------------------------------------------ the background server of `runbook run`


@local_app.command("status")
def local_status() -> None:
    """Whether the background server runs, where, and its state directory."""
    from runbook.app import local_server
    from runbook.engine.prefect_env import AUTH_FILE

    api = local_server.running()
    where = local_server.state_dir()
    if api:
        out.print(f"running: {api.removesuffix('/api')} (state {where}, log {where / 'serve.log'}; the UI asks for "
                  f"the auth string in {where / AUTH_FILE})", highlight=False)
    else:
        out.print(f"not running (state {where})", highlight=False)


@local_app.command("stop")
def local_stop() -> None:
    """Stop the background server (the next `runbook run` starts it again)."""
    from runbook.app import local_server

    out.print("stopped" if local_server.stop() else "was not running")


# ------------------------------------------------------------------ sandbox


@sandbox_app.command("up")
def sandbox_up(
    only: Annotated[str | None, typer.Option("--only", help="comma-separated services")] = None,
) -> None:
    """Start (or reuse) the sandbox's services on free loopback ports; writes the `sandbox` environment."""
    from runbook import sandbox

    names = [s.strip() for s in only.split(",") if s.strip()] if only else None
    started = time.monotonic()
    try:
        state = sandbox.up(names)
    except ValueError as exc:
        raise _fail(EXIT_BAD_INPUT, str(exc)) from None
    except sandbox.MissingSystemPackage as exc:
        raise _fail(EXIT_BAD_INPUT, str(exc)) from None
    except sandbox.SandboxError as exc:
        raise _fail(EXIT_ENGINE, str(exc)) from None
    _print_sandbox(state)
    out.print(f"sandbox up in {time.monotonic() - started:.1f} s; environment `sandbox` in {state.playbook_dir}")
    out.print('point a shell at it (or: eval "$(runbook sandbox env)"):', markup=False)
    for line in _sandbox_exports(state):
        out.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)


@sandbox_app.command("status")
def sandbox_status() -> None:
    """Show each sandbox service: running or not, pid, port."""
    from runbook import sandbox

    state = sandbox.status()
    _print_sandbox(state)
    if state.running():
        for line in _sandbox_exports(state):
            out.print(line, markup=False, highlight=False, soft_wrap=True)


def _sandbox_exports(state: Any) -> list[str]:
    import shlex

    exports = {**state.engine_env(), **state.prefect_env()}  # the API auth string beside the API it opens
    return [f"export {key}={shlex.quote(value)}" for key, value in exports.items() if value]


@sandbox_app.command("env")
def sandbox_env() -> None:
    """Print `export` lines that point the engine at the running sandbox (use: eval "$(runbook sandbox env)")."""
    from runbook import sandbox

    state = sandbox.status()
    if not state.running():
        raise _fail(EXIT_BAD_INPUT, "the sandbox is not running: start it with `runbook sandbox up`")
    for line in _sandbox_exports(state):
        print(line)


@sandbox_app.command("down")
def sandbox_down() -> None:
    """Stop every process the sandbox started (by PID) and remove its generated environment."""
    from runbook import sandbox

    stopped = sandbox.down()
    out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


def _print_sandbox(state: Any) -> None:
    from rich.table import Table

    t = Table("service", "state", "pid", "port")
    for name, rec in sorted(state.services.items()):
        running = getattr(rec, "running", True)
        t.add_row(name, "running" if running else "stopped", str(rec.pid), str(rec.port))
    out.print(t)


# ------------------------------------------------------------------ Prefect: deploy, worker, intake, serve, approve


def _api() -> tuple[str, str | None]:
    """The Prefect API and its auth string, both from one place: PREFECT_API_URL and PREFECT_API_AUTH_STRING from
    the environment, else the background server `runbook run` started (its state dir's file), else Prefect's
    profile. The auth string is checked with one request: a missing or wrong one is exit 2, said once (a server
    that cannot be reached yet is each command's own business: the intake answers 503 until it is back)."""
    from runbook.app import local_server, remote_run
    from runbook.engine.prefect_env import env_auth_string

    url: str | None = os.environ.get("PREFECT_API_URL")
    auth = env_auth_string()
    if not url:
        url = local_server.running()
        auth = local_server.auth_string() if url else None
    if not url:
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL  # the active profile may name one

        url, auth = PREFECT_API_URL.value(), PREFECT_API_AUTH_STRING.value()
    if not url:
        raise _fail(EXIT_BAD_INPUT, "PREFECT_API_URL is not set: point it at the Prefect server's /api")
    try:
        with remote_run.api_client(str(url), auth=auth or "") as http:
            remote_run.check_access(http)
    except BadInput as exc:
        raise _fail(EXIT_BAD_INPUT, str(exc)) from None
    except remote_run.RemoteRunError:
        pass
    return str(url), auth


def _token(token_env: str) -> str:
    token = os.environ.get(token_env, "")
    if len(token) < 16:
        raise _fail(EXIT_BAD_INPUT, f"environment variable {token_env} must hold the intake's bearer token "
                                    "(at least 16 characters); Alertmanager sends it via http_config.authorization")
    return token


@app.command()
def deploy() -> None:
    """Register every procedure's deployment (from the catalog) and the `runbook` work pool on PREFECT_API_URL."""
    from runbook.app.serve import register_deployments

    api, auth = _api()
    try:
        register_deployments(api, auth=auth or "")
    except BadInput as exc:
        raise _fail(EXIT_BAD_INPUT, str(exc)) from None
    except RunbookError as exc:
        raise _fail(EXIT_ENGINE, str(exc)) from None
    out.print(f"deployments registered on {api}")


@app.command()
def worker(
    pool: Annotated[str, typer.Option(help="work pool to serve")] = "runbook",
    poll: Annotated[float, typer.Option(help="seconds between safety-net polls (new runs arrive as events)")] = 15.0,
    max_runs: Annotated[int, typer.Option(help="flow runs at once in this process")] = 16,
    grace: Annotated[float, typer.Option(help="on SIGTERM/Ctrl-C: seconds running runs get to finish before they "
                                         "are handed back to the pool")] = 30.0,
) -> None:
    """Run deployment flow runs in this warm process (scale out: start several against one server)."""
    from runbook.app.executor import Executor, preload_flows

    _api()
    preload_flows()
    ex = Executor(work_pool=pool, poll_s=poll, max_runs=max_runs)
    ex.start()
    out.print(f"executor {ex.name} serving work pool {pool!r}; Ctrl-C stops it", highlight=False)
    sys.stdout.flush()
    try:
        _wait_forever()
    finally:
        _drain(ex, grace)
    _exit_if_handed_back()


_HANDED_BACK: list[str] = []


def _drain(ex: Any, grace_s: float) -> None:
    """Stop an executor the way SIGTERM should: finish what can finish in ``grace_s``, hand back the rest."""
    err.print(f"stopping: running runs get {grace_s:g} s to finish", style="dim", highlight=False)
    from runbook.engine.procedure import flush_run_records

    handed_back = ex.stop(grace_s=grace_s)
    flush_run_records()  # while the Prefect server is still up: its log/event workers would retry a dead one at exit
    if handed_back:
        err.print(f"handed back to the pool (another executor, or this one restarted, runs them again): "
                  f"{', '.join(handed_back)}", style="yellow", highlight=False, markup=False, soft_wrap=True)
    _HANDED_BACK.extend(handed_back)


def _exit_if_handed_back() -> None:
    """A handed-back run's thread is still running here: leave now, before it could finish what another executor
    will run again (os._exit: the interpreter would otherwise wait for those threads)."""
    if _HANDED_BACK:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


STATE_DSN_HELP = ("env var holding a PostgreSQL DSN for the intake's state (shared by replicas behind a load "
                  "balancer); unset or empty: the SQLite file in --state")


@app.command()
def intake(
    host: Annotated[str, typer.Option(help="listen address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="listen port")] = 9095,
    token_env: Annotated[str, typer.Option(help="env var holding the bearer token")] = "RUNBOOK_INTAKE_TOKEN",
    state: Annotated[Path, typer.Option(help="directory for the intake's durable store")] = Path(".runbook"),
    state_dsn_env: Annotated[str, typer.Option(help=STATE_DSN_HELP)] = "RUNBOOK_INTAKE_STATE_DSN",
) -> None:
    """Serve the Alertmanager webhook alone (POST /alerts, GET /healthz, GET /metrics)."""
    from runbook.app.serve import run_intake

    api, auth = _api()
    try:
        run_intake(api, _token(token_env), host, port, state, state_dsn=_state_dsn(state_dsn_env), auth=auth or "")
    except ConfigError as exc:
        raise _fail(EXIT_BAD_INPUT, str(exc)) from None
    except RunbookError as exc:  # the state database unreachable at start
        raise _fail(EXIT_ENGINE, str(exc)) from None


def _state_dsn(state_dsn_env: str) -> str | None:
    """The state DSN from its environment variable: a secret, so never a command-line value (``ps`` shows those)."""
    return os.environ.get(state_dsn_env) or None


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="intake port")] = 9095,
    prefect_port: Annotated[int, typer.Option(help="port of the local Prefect server")] = 4200,
    token_env: Annotated[str, typer.Option(help="env var holding the bearer token")] = "RUNBOOK_INTAKE_TOKEN",
    state: Annotated[Path, typer.Option(help="state directory (Prefect home, intake store)")] = Path(".runbook"),
    state_dsn_env: Annotated[str, typer.Option(help=STATE_DSN_HELP)] = "RUNBOOK_INTAKE_STATE_DSN",
    no_intake: Annotated[bool, typer.Option("--no-intake", help="no alert intake: server, deployments and "
                                            "executor only (what `runbook run` starts in the background)")] = False,
    grace: Annotated[float, typer.Option(help="on SIGTERM/Ctrl-C: seconds running runs get to finish before they "
                                         "are handed back to the pool")] = 30.0,
) -> None:
    """Everything in one command: local Prefect server (SQLite), deployments, warm executor, alert intake."""
    from prefect.settings import temporary_settings

    from runbook.app import remote_run
    from runbook.app.executor import Executor, preload_flows
    from runbook.app.serve import register_deployments, run_intake
    from runbook.engine.prefect_env import AUTH_FILE, client_env, ensure_auth_string, local_prefect_server

    token = "" if no_intake else _token(token_env)
    api = os.environ.get("PREFECT_API_URL")
    # our own server demands a string generated once in the state dir; another server, the one we are given
    auth = _api()[1] if api else ensure_auth_string(state / AUTH_FILE)
    started = time.monotonic()

    def step(what: str) -> None:
        out.print(Text.assemble((f"{time.monotonic() - started:5.1f}s", "dim"), f" {what}"), highlight=False)
        sys.stdout.flush()

    step("starting the Prefect server" if not api else f"using the Prefect server at {api}")
    with local_prefect_server(state / "prefect", prefect_port, auth or "") if not api else nullcontext(api) \
            as api_url:
        try:  # a server already on that port (reused) may demand another string
            with remote_run.api_client(api_url, auth=auth or "") as http:
                remote_run.check_access(http)
        except BadInput as exc:
            raise _fail(EXIT_BAD_INPUT, str(exc)) from None
        sign_in = "" if api else f" (sign in with the auth string in {state / AUTH_FILE})"
        step(f"Prefect server up: UI {api_url.removesuffix('/api')}{sign_in}")
        with temporary_settings(updates=client_env(api_url, auth)):
            register_deployments(api_url, auth=auth or "")
            step("deployments registered")
            preload_flows()
            ex = Executor()
            ex.start()
            step(f"executor {ex.name} serving work pool {ex.work_pool!r}")
            try:
                if no_intake:
                    step("ready (no intake); Ctrl-C stops everything")
                    _wait_forever()
                else:
                    step(f"intake on http://127.0.0.1:{port}/alerts; Ctrl-C stops everything")
                    try:
                        run_intake(api_url, token, "127.0.0.1", port, state, executor=ex,
                                   state_dsn=_state_dsn(state_dsn_env), auth=auth or "")
                    except ConfigError as exc:
                        raise _fail(EXIT_BAD_INPUT, str(exc)) from None
                    except RunbookError as exc:
                        raise _fail(EXIT_ENGINE, str(exc)) from None
            finally:
                _drain(ex, grace)
    _exit_if_handed_back()


def _wait_forever() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _prefect_http() -> Any:
    from runbook.app.remote_run import api_client

    api, auth = _api()
    return api_client(api, auth=auth or "")


def _waiting_plan(http: Any, run: dict[str, Any]) -> Any:
    """The plan a paused run stored for its approvers, or None when the run is not waiting for approval."""
    from runbook.engine.decisions import parse_plan_input
    from runbook.engine.run_inputs import PAUSE_KEY, PLAN_INPUT_KEY

    state = run.get("state") or {}
    if state.get("type") != "PAUSED" or (state.get("state_details") or {}).get("pause_key") != PAUSE_KEY:
        return None
    resp = http.get(f"/flow_runs/{run['id']}/input/{PLAN_INPUT_KEY}")
    return parse_plan_input(resp.text) if resp.status_code == 200 else None


@app.command()
def approvals(
    output: Annotated[str, typer.Option("--output", help="text or json")] = "text",
) -> None:
    """Runs waiting for approval: procedure, environment, target, age, time left and the plan."""
    from datetime import UTC, datetime

    import httpx
    from rich.table import Table

    if output not in {"text", "json"}:
        raise _fail(EXIT_BAD_INPUT, f"--output {output!r}: expected 'text' or 'json'")
    try:
        with _prefect_http() as http:
            runs = http.post("/flow_runs/filter", json={
                "flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}, "sort": "START_TIME_DESC", "limit": 200,
            }).raise_for_status().json()
            waiting = [(r, v) for r in runs if (v := _waiting_plan(http, r)) is not None]
    except BadInput as exc:
        raise _fail(EXIT_BAD_INPUT, str(exc)) from None
    except httpx.HTTPError as exc:
        raise _fail(EXIT_ENGINE, f"cannot read runs from the Prefect API: {type(exc).__name__}: {exc}") from None
    now = datetime.now(UTC)
    rows = [{"run_id": r["id"], "procedure": v.procedure, "env": v.env, "route": v.route,
             "targets": v.targets, "age_s": round((now - v.asked_at).total_seconds()),
             "time_left_s": round((v.deadline - now).total_seconds()) if v.deadline else None,
             "changes": v.changes} for r, v in waiting]
    if output == "json":
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        out.print("no run is waiting for approval")
        return
    t = Table(title="waiting for approval (runbook approve RUN_ID)")
    for col in ("run", "procedure", "env", "target", "age", "left", "plan"):
        t.add_column(col, overflow="fold")
    for r in rows:
        plan = "; ".join(r["changes"][:3]) + (f" (+{len(r['changes']) - 3} more)" if len(r["changes"]) > 3 else "")
        t.add_row(r["run_id"], r["procedure"], r["env"], ", ".join(r["targets"]), f"{r['age_s'] // 60} min",
                  f"{(r['time_left_s'] or 0) // 60} min", plan)
    out.print(t)


@app.command()
def approve(
    run_id: Annotated[str, typer.Argument(help="the waiting flow run's id (see `runbook approvals`)")],
    reject: Annotated[bool, typer.Option("--reject", help="reject instead of approving")] = False,
    reason: Annotated[str, typer.Option(help="why (recorded in the run's report)")] = "",
    yes: Annotated[bool, typer.Option("--yes", help="approve without the prompt (scripts)")] = False,
) -> None:
    """Show a waiting run's plan and approve it (asks for `yes`) or --reject it; you are the recorded approver."""
    from uuid import UUID

    import httpx

    from runbook.app import remote_run
    from runbook.engine.decisions import operator_identity

    try:
        uid = UUID(run_id)
    except ValueError:
        raise _fail(EXIT_BAD_INPUT, f"{run_id!r} is not a flow run id (a UUID)") from None
    try:
        with _prefect_http() as http:
            resp = http.get(f"/flow_runs/{uid}")
            if resp.status_code == 404:
                raise _fail(EXIT_BAD_INPUT, f"no flow run {uid}")
            run = resp.raise_for_status().json()
            view = _waiting_plan(http, run)
            if view is None:
                state = (run.get("state") or {}).get("name", "unknown")
                raise _fail(EXIT_BAD_INPUT, f"run {uid} is not waiting for approval (state: {state})")
            out.print(view.text(), markup=False, highlight=False)
            if not reject and not yes:
                if not _interactive():
                    raise _fail(EXIT_BAD_INPUT, "no terminal to ask at: pass --yes to approve from a script")
                if input("Approve and apply this plan? Only 'yes' approves: ").strip() != "yes":
                    out.print("not approved: the run keeps waiting (approve again, or --reject)")
                    raise typer.Exit(EXIT_BAD_INPUT)
            who = operator_identity()
            remote_run.resume(http, str(uid), not reject, who, reason)
    except BadInput as exc:
        raise _fail(EXIT_BAD_INPUT, str(exc)) from None
    except (httpx.HTTPError, RunbookError) as exc:
        raise _fail(EXIT_ENGINE, f"cannot reach the Prefect API: {type(exc).__name__}: {exc}") from None
    out.print(f"{'rejected' if reject else 'approved'} {uid} as {who}", highlight=False)


@incident_app.command("review")
def incident_review(
    ident: Annotated[str, typer.Argument(help="an alert's occurrence key, fingerprint (its latest occurrence) or a "
                                         "flow run id")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="where the .md and .json go (default: "
                                                 "$RUNBOOK_STATE_DIR/reviews)")] = None,
    output: Annotated[str, typer.Option("--output", help="print text (markdown) or json")] = "text",
    artifact: Annotated[bool, typer.Option(help="also publish it as a Prefect markdown artifact")] = True,
) -> None:
    """Build the post-incident review of an alert's runs: timeline, approvals, changes, figures."""
    import httpx

    from runbook.app import local_server, review

    if output not in {"text", "json"}:
        raise _fail(EXIT_BAD_INPUT, f"--output {output!r}: expected 'text' or 'json'")
    try:
        with _prefect_http() as http:
            built = review.build_review(http, review.find_runs(http, ident))
            if artifact:
                review.publish_artifact(http, built)
    except BadInput as exc:
        raise _fail(EXIT_BAD_INPUT, str(exc)) from None
    except (httpx.HTTPError, RunbookError) as exc:
        raise _fail(EXIT_ENGINE, f"cannot build the review: {exc}") from None
    md_path, json_path = review.write_files(built, out_dir or local_server.state_dir() / "reviews")
    if output == "json":
        print(built.model_dump_json(indent=2))
        return
    out.print(review.to_markdown(built), markup=False, highlight=False)
    out.print(f"written: {md_path} and {json_path}", markup=False, highlight=False)


# ------------------------------------------------------------------ backups


@backups_app.command("list")
def backups_list(
    env: Annotated[str, typer.Option("--env", help="environment from the playbooks")],
    database: Annotated[str, typer.Option("--database", help="database from the playbook")] = "main",
    output: Annotated[str, typer.Option("--output", help="text or json")] = "text",
) -> None:
    """Backups newest first: age, size, purpose and the last verification's result (backup-verification)."""
    from datetime import UTC, datetime

    from rich.table import Table

    from runbook.engine.clients import database_name
    from runbook.engine.config import load_playbooks
    from runbook.engine.errors import TargetUnreachable
    from tasks.backup_store import list_backups, open_store

    if output not in {"text", "json"}:
        raise _fail(EXIT_BAD_INPUT, f"--output {output!r}: expected 'text' or 'json'")
    try:
        environment = load_playbooks().environment(env)
        dbname = database_name(environment, database)
        with open_store(environment) as store:
            entries, partials = list_backups(store, dbname)
            where = store.describe()
    except ConfigError as exc:
        raise _fail(EXIT_BAD_INPUT, str(exc)) from None
    except TargetUnreachable as exc:
        raise _fail(EXIT_CRITICAL, str(exc)) from None
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for e in entries:
        v = e.verification or {}
        result = ("never verified" if not v else ("passed" if v.get("passed") else "FAILED: " + "; ".join(
            v.get("reasons") or [])[:120]) + f" ({v.get('verified_at', '?')[:16]})")
        rows.append({"file": e.name, "purpose": e.purpose, "age_h": round(e.age_hours(now), 2),
                     "size_bytes": e.file.size, "verification": result,
                     "restore_s": v.get("restore_s")})
    if output == "json":
        print(json.dumps({"location": where, "database": dbname, "backups": rows,
                          "unfinished": [p.name for p in partials]}, indent=2))
        return
    t = Table(title=f"{dbname} backups in {where}")
    t.add_column("file", no_wrap=True)
    for col in ("purpose", "age", "size", "last verification"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["file"], r["purpose"], f"{r['age_h']:.1f} h", f"{r['size_bytes'] / 1e6:.1f} MB",
                  r["verification"] + (f", restore {r['restore_s']:.1f} s" if r["restore_s"] else ""))
    out.print(t)
    for p in partials:
        out.print(Text.assemble(("unfinished temp file", "yellow"),
                                f" {p.name} ({p.size} bytes, {p.mtime.isoformat(timespec='seconds')})"))
    if not rows:
        out.print(f"no backups of {dbname} in {where}")


# ------------------------------------------------------------------ demo


@app.command()
def demo(keep: Annotated[bool, typer.Option("--keep", help="leave the sandbox running")] = False) -> None:
    """Sandbox up, inject a database incident, db-slowness dry run, then --apply, then apply again (no change)."""
    from runbook.sandbox.demo import run_demo

    raise typer.Exit(run_demo(Console(), keep=keep))  # its own headings use markup; reports go in as Text


_quick_exit = False


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except SystemExit as exc:
        if not _quick_exit:
            raise
        # a warm-path run is over and printed: skip tearing the interpreter down (0.1-0.15 s of module and object
        # finalisation here, a sixth of the whole command). Only this path: an in-process run must let Prefect's
        # atexit handlers send its last logs and events.
        code = 0 if exc.code is None else exc.code
        if not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
