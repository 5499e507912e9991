"""Backup remediations: take a backup; restore the database from a backup (the data-corruption procedure).

Both follow the check/plan/apply/verify contract. ``TakeBackup`` is guarded by the age of the newest backup (a
second run within ``fresh_within_s`` has nothing to do). ``RestoreFromBackup`` plans only when the live database
differs from the backup in a way that means lost data (tables or columns missing or changed, key rows gone); after a
successful restore it plans nothing. Its apply never drops or overwrites anything that held data: the live
database is kept under a dated name, a safety backup is taken first, and a failure at any step leaves the original
database in place and the writers started again, naming the step where it stopped.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import httpx
from psycopg import sql
from pydantic import BaseModel

from runbook.engine.clients import database_name, postgres_admin
from runbook.engine.config import Environment
from runbook.engine.errors import QueryFailed, RemediationFailed, TargetUnreachable
from runbook.engine.findings import Change
from runbook.engine.remediation import Remediation, register
from tasks.backup_checks import check_stream
from tasks.backup_dump import check_dump_login, log_line, take_backup
from tasks.backup_files import Manifest, Shape, backup_name, utc_stamp
from tasks.backup_restore import derived_db_name, drop_database, restore_backup
from tasks.backup_store import BackupEntry, BackupStore, list_backups, open_store
from tasks.database_shape import compare_shapes, live_shape, shape_of
from tasks.writers import NO_DOCKER, Writers, writer_services, writers_for


@dataclass(frozen=True)
class BackupState:
    """What ``TakeBackup.check`` read: the newest backup of the same purpose and its age (None: there is none)."""

    dbname: str
    store: str
    latest: str | None
    age_s: float | None


@register
class TakeBackup(Remediation[BackupState]):
    """pg_dump -> gzip -> store, unless a backup of the same purpose finished less than ``fresh_within_s`` ago."""

    name = "take-backup"

    def __init__(self, env: Environment, database: str = "main", purpose: str = "backup",
                 fresh_within_s: float = 300.0, timeout_s: float = 3600.0) -> None:
        self.env, self.database, self.purpose = env, database, purpose
        self.fresh_within_s, self.timeout_s = fresh_within_s, timeout_s
        self.manifest: Manifest | None = None

    @property
    def target(self) -> str:
        return f"{self.env.name}/{self.database}"

    def check(self) -> BackupState:
        dbname = database_name(self.env, self.database)
        check_dump_login(self.env, self.database)  # a dry run proves the backup could be taken, login included
        with open_store(self.env) as store:
            entries, _ = list_backups(store, dbname)
            where = store.describe()
        same = [e for e in entries if e.purpose == self.purpose]
        latest = same[0] if same else None
        return BackupState(dbname=dbname, store=where, latest=latest.name if latest else None,
                           age_s=(datetime.now(UTC) - latest.taken_at).total_seconds() if latest else None)

    def plan(self, state: BackupState) -> list[Change]:
        if state.age_s is not None and state.age_s < self.fresh_within_s:
            return []
        return [Change(
            action="backup", subject=f"database {state.dbname} -> {state.store}", key="",
            before={"latest": state.latest or "none",
                    "age": f"{state.age_s / 3600:.1f} h" if state.age_s is not None else "-"},
            after={"file": backup_name(state.dbname, "<UTC time>", self.purpose == "safety")},
        )]

    def apply(self, plan: list[Change]) -> list[Change]:
        state = self.check()  # guard: another run may have just taken one
        if not self.plan(state):
            return []
        with open_store(self.env) as store:
            try:
                m = take_backup(self.env, self.database, store, purpose=self.purpose, timeout_s=self.timeout_s)
            except RemediationFailed as exc:
                log_line(store, self.env, f"ERROR backup of {state.dbname} failed: {exc}")
                raise
            log_line(store, self.env, f"OK backup {m.file} ({m.size_bytes} bytes)")
        self.manifest = m
        return [plan[0].model_copy(update={"after": {"file": m.file, "size_bytes": m.size_bytes,
                                                     "sha256": (m.sha256 or "")[:16], "rows": m.key_rows}})]

    def verify(self, applied: list[Change]) -> tuple[bool, str]:
        name = applied[0].after["file"]
        with open_store(self.env) as store:
            entries, _ = list_backups(store)
            entry = next((e for e in entries if e.name == name), None)
            if entry is None:
                return False, f"{name} is not in {store.describe()}"
            with store.open_read(name) as fh:
                res = check_stream(fh, entry.checksum)
        if not res.ok:
            return False, f"{name}: " + "; ".join(m for _, m in res.problems)
        return True, (f"{name}: {res.compressed_bytes} bytes, gzip intact, checksum matches, "
                      f"{res.tables_in_dump} tables")


# ------------------------------------------------------------------ restore


class RestoreStep(StrEnum):
    """The restore's six steps, in order (each one a planned change; a failure names the step it stopped at)."""

    STOP_WRITERS = "stop-writers"
    SAFETY_BACKUP = "safety-backup"
    RESTORE = "restore"
    VERIFY_RESTORED = "verify-restored"
    SWAP = "swap"
    START_WRITERS = "start-writers"


@dataclass(frozen=True)
class StepDone:
    """One step the restore got through: what it did, and when."""

    step: RestoreStep
    detail: str
    at: datetime


@dataclass(frozen=True)
class RejectedBackup:
    """A backup that cannot be a restore source, with every reason."""

    file: str
    problems: list[str]


@dataclass(frozen=True)
class ChosenBackup:
    """The newest backup that passed the integrity checks: the restore source."""

    file: str
    taken_at: datetime
    age_h: float
    sha256: str | None
    manifest: Manifest


@dataclass(frozen=True)
class RestoreState:
    """What ``RestoreFromBackup.check`` read: the restore source (None: no usable backup), the ones rejected, the
    live database (``exists``, its owner and shape) and what it lost against the source (``damage``)."""

    store: str
    rejected: list[RejectedBackup]
    exists: bool
    owner: str | None
    live: Shape | None
    backup: ChosenBackup | None
    damage: list[str]


def integrity_problems(store: BackupStore, entry: BackupEntry, dbname: str) -> list[str]:
    """Why a backup cannot be a restore source (empty: it can): stream check, checksum, manifest."""
    problems: list[str] = []
    if entry.manifest is None:
        problems.append(entry.manifest_error or "no manifest: cannot tell what a correct restore looks like")
    elif entry.manifest.database != dbname:
        problems.append(f"a dump of database {entry.manifest.database!r}, not {dbname!r}")
    with store.open_read(entry.name) as fh:
        res = check_stream(fh, entry.checksum)
    problems.extend(m for _, m in res.problems)
    if entry.checksum is None:
        problems.append("no checksum file")
    return problems


def damage(manifest: Manifest, live: Shape | None, row_loss_tolerance_pct: float) -> list[str]:
    """What is lost in the live database compared with the backup: the reasons to restore (empty: none)."""
    if live is None:
        return ["the database does not exist"]
    out = compare_shapes(manifest.shape, Shape(tables=live.tables))
    for table, want in manifest.key_rows.items():
        got = live.key_rows.get(table)
        if want is None or got is None:
            continue
        lost = want - got
        if lost > 0 and lost > want * row_loss_tolerance_pct / 100:
            out.append(f"{table}: {got} rows, {lost} fewer than the backup's {want} "
                       f"({100 * lost / max(want, 1):.1f}% lost)")
    return out


@register
class RestoreFromBackup(Remediation[RestoreState]):
    """Restore the database from its newest good backup into a new database and swap it in by renaming.

    The plan's restore change carries its source file as its target (``RestoreSource``): apply restores exactly the
    file that was shown and approved, and stops before any change when the backup to use is no longer that one.
    """

    name = "restore-from-backup"
    whole_plan = True  # its changes are the steps of one restore

    def __init__(self, env: Environment, database: str = "main", backup: str | None = None,
                 row_loss_tolerance_pct: float = 1.0, timeout_s: float = 3600.0, writer_stop_s: int = 10) -> None:
        self.env, self.database, self.backup, self.writer_stop_s = env, database, backup, writer_stop_s
        self.row_loss_tolerance_pct, self.timeout_s = row_loss_tolerance_pct, timeout_s
        self.dbname = database_name(env, database)
        self.stamp = utc_stamp()
        self.new_db = derived_db_name(self.dbname, "restore", self.stamp)
        self.kept_as = derived_db_name(self.dbname, "before_restore", self.stamp)
        self.safety_file = backup_name(self.dbname, self.stamp, safety=True)
        self.progress: list[StepDone] = []
        self.stopped_at: RestoreStep | None = None
        self.restore_seconds: float | None = None

    @property
    def target(self) -> str:
        return f"{self.env.name}/{self.database} (database {self.dbname})"

    # -------------------------------------------------------------- check / plan

    def check(self) -> RestoreState:
        with open_store(self.env) as store:
            entries, _ = list_backups(store, self.dbname)
            candidates = [e for e in entries if (e.name == self.backup if self.backup else e.purpose == "backup")]
            rejected: list[RejectedBackup] = []
            chosen: BackupEntry | None = None
            for entry in candidates:
                problems = integrity_problems(store, entry, self.dbname)
                if not problems:
                    chosen = entry
                    break
                rejected.append(RejectedBackup(file=entry.name, problems=problems))
            where = store.describe()
        exists, owner, live = self._live()
        backup: ChosenBackup | None = None
        found: list[str] = []
        if chosen is not None and chosen.manifest is not None:  # no problems: it has a manifest
            backup = ChosenBackup(file=chosen.name, taken_at=chosen.taken_at, age_h=round(chosen.age_hours(), 2),
                                  sha256=chosen.checksum, manifest=chosen.manifest)
            found = damage(chosen.manifest, live, self.row_loss_tolerance_pct)
        return RestoreState(store=where, rejected=rejected, exists=exists, owner=owner, live=live, backup=backup,
                            damage=found)

    def _live(self) -> tuple[bool, str | None, Shape | None]:
        with postgres_admin(self.env, self.database) as admin:
            row = admin.execute("SELECT pg_get_userbyid(datdba) AS owner FROM pg_database WHERE datname = %s",
                                (self.dbname,)).fetchone()
        if row is None:
            return False, None, None
        return True, row["owner"], live_shape(self.env, self.database)

    def plan(self, state: RestoreState) -> list[Change]:
        backup = state.backup
        if backup is None or not state.damage:
            return []
        writers = ", ".join(writer_services(self.env)) or "none"
        ctl = writers_for(self.env, self.writer_stop_s)
        manifest = backup.manifest
        return [
            _change(RestoreStep.STOP_WRITERS, writers, before={"how": "docker" if ctl else NO_DOCKER},
                    after={"state": "stopped" if ctl else "unchanged"}),
            _change(RestoreStep.SAFETY_BACKUP, f"database {self.dbname} -> {state.store}",
                    before={"exists": state.exists},
                    after={"file": self.safety_file if state.exists else "none: the database does not exist"}),
            _change(RestoreStep.RESTORE, f"{backup.file} -> database {self.new_db}",
                    before={"file": backup.file, "backup_age_h": backup.age_h,
                            "taken_at": backup.taken_at.isoformat()},
                    after={"database": self.new_db, "owner": state.owner or manifest.owner},
                    target=RestoreSource(file=backup.file)),
            _change(RestoreStep.VERIFY_RESTORED, f"database {self.new_db}",
                    after={"key_rows": manifest.key_rows, "tables": len(manifest.tables)}),
            _change(RestoreStep.SWAP, f"database {self.dbname}", before={"damage": "; ".join(state.damage)[:500]},
                    after={"restored_as": self.dbname, "old_kept_as": self.kept_as if state.exists else "none"}),
            _change(RestoreStep.START_WRITERS, writers, after={"state": "running" if ctl else "unchanged"}),
        ]

    # -------------------------------------------------------------- apply

    def _done(self, step: RestoreStep, detail: str) -> None:
        self.progress.append(StepDone(step=step, detail=detail, at=datetime.now(UTC)))

    def apply(self, plan: list[Change]) -> list[Change]:
        restore = next(c for c in plan if c.action == RestoreStep.RESTORE)
        backup_file = restore.target_as(RestoreSource).file
        state = self.check()  # guards: the same backup is still the one to use, the damage is still there
        if not state.damage:
            return []
        if state.backup is None or state.backup.file != backup_file:
            raise RemediationFailed(f"stopped before any change: the backup to use is no longer {backup_file}")
        manifest = state.backup.manifest
        ctl = writers_for(self.env, self.writer_stop_s)
        stopped: list[str] = []
        created: list[str] = []
        swapped = False
        step = RestoreStep.STOP_WRITERS
        try:
            if ctl is not None:
                stopped = ctl.stop()
                self._done(step, f"stopped {len(stopped)} container(s)")
            else:
                self._done(step, NO_DOCKER)
            step = RestoreStep.SAFETY_BACKUP
            if state.exists:
                with open_store(self.env) as store:
                    safety = take_backup(self.env, self.database, store, purpose="safety", timeout_s=self.timeout_s,
                                         name=self.safety_file)
                    log_line(store, self.env, f"OK safety backup {safety.file} before a restore")
                self._done(step, str(safety.file))
            else:
                self._done(step, "skipped: the database does not exist")
            step = RestoreStep.RESTORE
            started = time.perf_counter()
            with open_store(self.env) as store:
                restore_backup(self.env, self.database, store, backup_file, self.new_db,
                               state.owner or manifest.owner, timeout_s=self.timeout_s, created=created)
            with postgres_admin(self.env, self.database, dbname=self.new_db,
                                statement_timeout_ms=int(self.timeout_s * 1000)) as conn:
                conn.execute("ANALYZE")  # planner statistics before the application sees it
            self.restore_seconds = time.perf_counter() - started
            self._done(step, f"{backup_file} into {self.new_db} in {self.restore_seconds:.1f} s")
            step = RestoreStep.VERIFY_RESTORED
            problems = compare_shapes(manifest.shape, shape_of(self.env, self.database, self.new_db))
            if problems:
                raise RemediationFailed("the restored database differs from the backup's manifest: "
                                        + "; ".join(problems[:10]))
            self._done(step, "tables, columns and key row counts equal the manifest")
            step = RestoreStep.SWAP
            self._swap(state.exists)
            swapped = True
            self._done(step, f"{self.dbname} is the restored database"
                       + (f"; the old one is kept as {self.kept_as}" if state.exists else ""))
        except (RemediationFailed, TargetUnreachable, QueryFailed, OSError) as exc:
            self.stopped_at = step
            cleanup = self._undo(ctl, stopped, bool(created) and not swapped)
            raise RemediationFailed(
                f"stopped at step '{step}': {_short(exc)}. The original database {self.dbname} is in place"
                f"{'' if state.exists else ' (it did not exist)'}; {cleanup}") from None
        step = RestoreStep.START_WRITERS
        if ctl is not None:
            back = ctl.start(stopped)
            self._done(step, f"started {len(back)} of {len(stopped)} container(s)")
            if set(back) != set(stopped):
                self.stopped_at = step
                raise RemediationFailed(f"restored, but only {len(back)} of {len(stopped)} writer containers "
                                        "are running again: start the others by hand",
                                        done=[c for c in plan if c.action != RestoreStep.START_WRITERS])
        else:
            self._done(step, NO_DOCKER)
        with contextlib.suppress(OSError, TargetUnreachable), open_store(self.env) as store:
            log_line(store, self.env, f"OK restored {self.dbname} from {backup_file}; old kept as {self.kept_as}")
        return plan

    def _swap(self, exists: bool) -> None:
        """Both renames in one transaction: either the restored database has the name, or nothing changed."""
        with postgres_admin(self.env, self.database) as admin:
            others = admin.execute(
                """SELECT pid, usename, application_name FROM pg_stat_activity
                    WHERE datname = %s AND pid <> pg_backend_pid()""", (self.dbname,)).fetchall()
            if others:
                who = ", ".join(f"pid {r['pid']} ({r['usename']}, {r['application_name'] or '-'})" for r in others)
                raise RemediationFailed(f"{len(others)} session(s) still connected to {self.dbname}: {who}")
            with admin.transaction():
                if exists:
                    admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(self.dbname), sql.Identifier(self.kept_as)))
                admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(self.new_db), sql.Identifier(self.dbname)))

    def _undo(self, ctl: Writers | None, stopped: list[str], drop_new: bool) -> str:
        """After a failure: start the writers again, drop the never-used restore target. Says what it did."""
        said: list[str] = []
        if drop_new:
            try:
                drop_database(self.env, self.database, self.new_db, f"_restore_{self.new_db.rsplit('_', 1)[-1]}")
                said.append(f"the unfinished {self.new_db} was dropped (it never held live data)")
            except (RemediationFailed, TargetUnreachable, QueryFailed) as exc:
                said.append(f"could not drop the unfinished {self.new_db}: {_short(exc)}")
        if ctl is not None and stopped:
            back = ctl.start(stopped)
            said.append(f"writers started again ({len(back)} of {len(stopped)} containers running)")
        elif ctl is None:
            said.append("writers were not stopped (no docker configured)")
        else:
            said.append("no writer had been stopped")
        return "; ".join(said)

    # -------------------------------------------------------------- verify

    def verify(self, applied: list[Change]) -> tuple[bool, str]:
        state = self.check()
        problems = list(state.damage)
        if state.backup is None:
            problems.append("no usable backup to compare with")
        with postgres_admin(self.env, self.database) as admin:
            names = {r["datname"] for r in admin.execute(
                "SELECT datname FROM pg_database WHERE datname = ANY(%s)", ([self.kept_as, self.new_db],))}
        swap = next(c for c in applied if c.action == RestoreStep.SWAP)
        if swap.after.get("old_kept_as") not in ("none", None) and self.kept_as not in names:
            problems.append(f"the old database is not kept as {self.kept_as}")
        if self.new_db in names:
            problems.append(f"{self.new_db} still exists: the swap did not happen")
        problems.extend(self._health())
        if problems:
            return False, "; ".join(problems)
        source = state.backup.file if state.backup else "?"
        return True, (f"{self.dbname} restored from {source}: tables, columns and key rows as in "
                      f"the backup; old database kept as {self.kept_as}; safety backup {self.safety_file}")

    def _health(self, wait_s: float = 15.0) -> list[str]:
        """Writers with a health_url answer below 500 (each retried for ``wait_s``: they were just started)."""
        problems: list[str] = []
        for name, svc in self.env.services.items():
            if not (svc.writer and svc.health_url):
                continue
            deadline, last = time.monotonic() + wait_s, ""
            while True:
                try:
                    r = httpx.get(svc.health_url, timeout=5.0)
                    if r.status_code < 500:
                        last = ""
                        break
                    last = f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    last = type(exc).__name__
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            if last:
                problems.append(f"{name} health: {last}")
        return problems


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:400]


def _change(step: RestoreStep, subject: str, *, before: dict[str, object] | None = None,
            after: dict[str, object] | None = None, target: BaseModel | None = None) -> Change:
    """One planned step; its identity is the step and its subject, as for any change without a key."""
    return Change(action=step.value, subject=subject, key="", before=before or {}, after=after or {},
                  target=Change.target_of(target) if target is not None else {})


class RestoreSource(BaseModel, frozen=True):
    """The restore change's machine target: the backup file that was shown and approved."""

    file: str
