"""YAML output for generated files: safe-dump semantics, with chosen leaves inline like the documented shape."""

from __future__ import annotations

from typing import Any

import yaml


class Flow(dict):  # type: ignore[type-arg]
    """A mapping written in YAML flow style ({a: 1}); everything else is block style."""


class FlowList(list):  # type: ignore[type-arg]
    """A sequence written in YAML flow style ([a, b])."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that renders Flow/FlowList inline, matching the documented file shape."""


_Dumper.add_representer(Flow, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=True))
_Dumper.add_representer(FlowList, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def dump_yaml(data: dict[str, Any]) -> str:
    """yaml.safe_dump semantics (plain data only) with Flow/FlowList leaves kept inline."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)
