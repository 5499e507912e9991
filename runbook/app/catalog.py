"""The procedure catalog: every ``@procedure`` declared in the ``flows`` package, found by importing its modules once.

This is the one list of procedures: the CLI, the deployments, the executor and the alert routes all read it. It lives
in the application shell because finding the procedures means importing flows/, which the engine never does.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from typing import Any

from runbook.engine.errors import BadInput
from runbook.engine.procedure import ProcedureSpec, declared_procedures

FLOWS_PACKAGE = "flows"


class _Catalog(Mapping[str, ProcedureSpec]):
    """Lazy: importing flows/ loads Prefect and every task module, which `runbook --help` should not pay for."""

    _loaded = False

    def _load(self) -> Mapping[str, ProcedureSpec]:
        if not self._loaded:
            package = importlib.import_module(FLOWS_PACKAGE)
            for mod in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
                importlib.import_module(f"{FLOWS_PACKAGE}.{mod}")
            self._loaded = True
        return declared_procedures()

    def __getitem__(self, key: str) -> ProcedureSpec:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


PROCEDURES: Mapping[str, ProcedureSpec] = _Catalog()


def get_procedure(name: str) -> ProcedureSpec:
    """The procedure called ``name``; BadInput lists the known ones otherwise."""
    if name not in PROCEDURES:
        raise BadInput(f"unknown procedure {name!r}; known: {', '.join(PROCEDURES)}")
    return PROCEDURES[name]


def validate_params(procedure: str, params: dict[str, Any], label: str = "") -> dict[str, Any]:
    """Validate ``params`` against the named procedure's signature (see ProcedureSpec.validate_params)."""
    return get_procedure(procedure).validate_params(params, label)
