"""The project's own errors. Third-party exceptions are mapped to these at one boundary (runbook.engine.clients)."""

from __future__ import annotations


class RunbookError(Exception):
    """Base of every error the engine raises on purpose."""


class ConfigError(RunbookError):
    """A playbook is invalid or names something that does not exist. Exit code 2."""


class MissingSecret(ConfigError):
    """A referenced secret (environment variable or Prefect Secret block) is not available. Exit code 2."""


class BadInput(RunbookError):
    """A CLI argument, parameter or payload was rejected. Exit code 2."""


class TargetUnreachable(RunbookError):
    """A target (database, host, API) could not be reached in time. Flows turn this into a finding."""

    def __init__(self, target: str, reason: str) -> None:
        super().__init__(f"{target} unreachable: {reason}")
        self.target = target
        self.reason = reason


class QueryFailed(RunbookError):
    """A database refused a statement (permission, object in use, timeout...): its first line and SQLSTATE.

    The message is the server's own first line, secret-free, so a finding built from it reads as the server said.
    """

    def __init__(self, target: str, reason: str, sqlstate: str | None = None) -> None:
        super().__init__(reason)
        self.target = target
        self.reason = reason
        self.sqlstate = sqlstate


class RemediationFailed(RunbookError):
    """A remediation's apply raised, or its verify did not confirm the change.

    ``done`` carries the changes already made before the failure (Ansible's ``fail_json(**result)``), so a partial
    apply is reported as what it is, never as "changed nothing".
    """

    def __init__(self, message: str, done: list | None = None) -> None:  # type: ignore[type-arg]
        super().__init__(message)
        self.done = list(done or [])
