"""Alertmanager's webhook payload (version 4), validated strictly enough that nothing odd gets further.

Alertmanager may add fields in later versions (ignored); the fields we use are typed and bounded.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

LabelKey = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]{0,127}$")]
LabelValue = Annotated[str, StringConstraints(max_length=1024)]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=64)]
Annotations = Annotated[dict[LabelKey, Annotated[str, StringConstraints(max_length=8192)]], Field(max_length=64)]


class Alert(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    status: Literal["firing", "resolved"]
    labels: Labels
    annotations: Annotations = Field(default_factory=dict)
    startsAt: datetime  # noqa: N815 (Alertmanager's field names)
    endsAt: datetime | None = None  # noqa: N815
    generatorURL: Annotated[str, StringConstraints(max_length=4096)] = ""  # noqa: N815
    fingerprint: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{1,64}$")]


class Webhook(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    version: Literal["4"]
    status: Literal["firing", "resolved"]
    receiver: Annotated[str, StringConstraints(max_length=256)] = ""
    alerts: Annotated[list[Alert], Field(min_length=1, max_length=1000)]
    groupLabels: Labels = Field(default_factory=dict)  # noqa: N815
    commonLabels: Labels = Field(default_factory=dict)  # noqa: N815
    commonAnnotations: Annotations = Field(default_factory=dict)  # noqa: N815
    externalURL: Annotated[str, StringConstraints(max_length=4096)] = ""  # noqa: N815
    groupKey: Annotated[str, StringConstraints(max_length=8192)] = ""  # noqa: N815
    truncatedAlerts: int = Field(0, ge=0)  # noqa: N815
