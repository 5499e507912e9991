"""Types of the parameters procedures share, declared once: each becomes a validated field of the deployment's form
(pattern, description) and is checked before it reaches a query, a container name or a file path."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
"""Environments, services, databases, hosts: safe to log, to pass as arguments and to match alert labels."""

EnvName = Annotated[str, Field(pattern=NAME_PATTERN, description="environment from playbooks/")]
DbName = Annotated[str, Field(pattern=NAME_PATTERN, description="database name from the playbook")]
ServiceName = Annotated[str, Field(pattern=NAME_PATTERN, description="compose service from the playbook")]
BackupFile = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,200}\.sql\.gz$", description="a backup file name")]
