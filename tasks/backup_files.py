"""What a backup is on disk: its file names, its manifest and its verification record.

``<db>-<UTC>[-safety].sql.gz`` beside ``.sha256``, ``.manifest.json`` and ``.verify.json`` sidecars; one naming
scheme shared by taking, listing, verifying and restoring backups, so each of them reads the others' files.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict

SUFFIX = ".sql.gz"
PARTIAL_SUFFIX = ".partial"
MANIFEST_FORMAT = 1
BACKUP_NAME = re.compile(r"^(?P<db>[A-Za-z0-9_-]+)-(?P<stamp>\d{8}T\d{6}Z)(?P<safety>-safety)?\.sql\.gz$")

Tables = dict[str, list[tuple[str, str]]]
"""Schema-qualified table -> its columns as (name, type), in column order."""
KeyRows = dict[str, int | None]
"""Key table -> exact row count (None: the table is missing)."""


def utc_stamp(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def backup_name(dbname: str, stamp: str, safety: bool = False) -> str:
    return f"{dbname}-{stamp}{'-safety' if safety else ''}{SUFFIX}"


def side_name(backup: str, kind: str) -> str:
    """Sidecar files: ``<backup>.sha256``, ``<backup>.manifest.json``, ``<backup>.verify.json``."""
    return f"{backup}.{kind}"


class Shape(BaseModel):
    """A database's shape: user tables with their columns, and exact row counts of the key tables."""

    model_config = ConfigDict(frozen=True)

    tables: Tables = {}
    key_rows: KeyRows = {}


class Manifest(BaseModel):
    """``<backup>.manifest.json``: what a correct restore of the backup looks like.

    Written by the backup (every field set, in this order); read back leniently (a field missing from an older or
    hand-made manifest is None or empty, as a reader of the JSON would find it).
    """

    model_config = ConfigDict(frozen=True)

    format: int | None = None
    file: str | None = None
    database: str | None = None
    purpose: str | None = None
    server_version: str | None = None
    owner: str | None = None
    encoding: str | None = None
    extensions: list[str] = []
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    key_rows: KeyRows = {}
    tables: Tables = {}

    @property
    def shape(self) -> Shape:
        return Shape(tables=self.tables, key_rows=self.key_rows)

    def to_json(self) -> str:
        return _json(self)


class Verification(BaseModel):
    """``<backup>.verify.json``: the last backup-verification's verdict on the backup."""

    model_config = ConfigDict(frozen=True)

    file: str
    verified_at: str
    passed: bool
    reasons: list[str]
    age_h: float
    restore_s: float | None
    sha256: str

    def to_json(self) -> str:
        return _json(self)


def _json(record: BaseModel) -> str:
    """A sidecar's text: the same indented JSON (ASCII-escaped) as ``json.dumps(..., indent=1)`` always wrote."""
    return json.dumps(record.model_dump(mode="json"), indent=1) + "\n"
