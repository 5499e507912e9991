"""Errors raised by the sandbox, kept apart so every service module can import them."""

from __future__ import annotations


class SandboxError(RuntimeError):
    """A sandbox service failed to start, answer or stop; the message carries its log tail."""


class MissingSystemPackage(SandboxError):
    """A binary the sandbox needs is absent; the message names the package and the install command."""

    def __init__(self, what: str, package: str, install_command: str, kind: str = "Debian") -> None:
        self.what = what
        self.package = package
        self.install_command = install_command
        super().__init__(f"{what} not found: install the {kind} package with '{install_command}'")
