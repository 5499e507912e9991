"""Benchmark: backup integrity check and test restore on a generated dump of >= 500 MB of SQL.

Measured in one run, on the same file, against the sandbox's real PostgreSQL:
  integrity   tasks.backup_checks.check_stream (gzip CRC/length, sha256, dump header/trailer, one streamed pass)
              vs `gunzip -t FILE`                                    goal: throughput >= 1.0x gunzip -t
  memory      peak RSS growth of a process doing the check and the restore over its baseline   goal: < 50 MB
  restore     tasks.backup_restore.restore_backup into a new database (streamed through psql)
              vs `gunzip -c FILE | psql` into an empty database      goal: time <= 1.2x
The dump is generated into a temporary directory (never in git) and removed, with both databases, at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from psycopg import sql  # noqa: E402

from runbook import sandbox  # noqa: E402

TARGET_MB = int(os.environ.get("BENCH_DUMP_MB", "520"))
NAME = "benchdb-20260101T000000Z.sql.gz"
ROW = "{i}\t{u}\t{status}\t{amount}\t2024-01-01 00:00:00+00\tsome free text about booking number {i}\n"


def generate(path: Path, target_bytes: int) -> int:
    """A pg_dump-shaped plain SQL file (header, table, COPY data, index, trailer), gzip'd by gzip(1)."""
    statuses = ["completed", "confirmed", "pending", "cancelled"]
    written = 0
    with open(path, "wb") as out:
        gz = subprocess.Popen(["gzip", "-6", "-c"], stdin=subprocess.PIPE, stdout=out)
        assert gz.stdin is not None

        def w(text: str) -> None:
            nonlocal written
            data = text.encode()
            gz.stdin.write(data)  # type: ignore[union-attr]
            written += len(data)

        w("--\n-- PostgreSQL database dump\n--\n\nSET statement_timeout = 0;\nSET client_encoding = 'UTF8';\n"
          "SELECT pg_catalog.set_config('search_path', '', false);\n\nSET default_table_access_method = heap;\n\n"
          "CREATE TABLE public.bookings (id bigint NOT NULL, user_id uuid, status text, amount numeric(10,2),"
          " created_at timestamp with time zone, note text);\n\n"
          "COPY public.bookings (id, user_id, status, amount, created_at, note) FROM stdin;\n")
        i, batch = 0, []
        while written < target_bytes:
            i += 1
            batch.append(ROW.format(i=i, u=f"{i:08x}-0000-4000-8000-{(i * 7919) % 10**12:012d}",
                                    status=statuses[i % 4], amount=f"{(i * 7907) % 50000 / 100:.2f}"))
            if len(batch) == 20000:
                w("".join(batch))
                batch = []
        w("".join(batch) + "\\.\n\n\nALTER TABLE ONLY public.bookings ADD CONSTRAINT bookings_pkey PRIMARY KEY (id);"
          "\n\n--\n-- PostgreSQL database dump complete\n--\n\n")
        gz.stdin.close()
        if gz.wait() != 0:
            raise SystemExit("gzip failed")
    return written


CHILD = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from runbook.engine.config import load_playbooks
from tasks.backup_checks import check_stream
from tasks.backup_restore import restore_backup
from tasks.backup_store import LocalStore
env = load_playbooks().environment("sandbox")
store = LocalStore(Path(sys.argv[2]))
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = rss()
t = time.perf_counter()
with store.open_read(sys.argv[3]) as fh:
    res = check_stream(fh)
check_s = time.perf_counter() - t
assert res.ok, res.problems
after_check = rss()
t = time.perf_counter()
restore_backup(env, "main", store, sys.argv[3], sys.argv[4], None)
restore_s = time.perf_counter() - t
print(json.dumps({"check_s": check_s, "restore_s": restore_s, "base_mb": base, "after_check_mb": after_check,
                  "after_restore_mb": rss(), "uncompressed": res.uncompressed_bytes}))
"""


def main() -> int:
    print("starting sandbox (postgres, backups)...", flush=True)
    was_running = set(sandbox.status().running())
    os.environ.update(sandbox.up(["postgres", "backups"]).engine_env())
    from runbook.engine.clients import postgres_admin, postgres_program
    from runbook.engine.config import load_playbooks
    from tasks.backup_restore import drop_database

    env = load_playbooks().environment("sandbox")
    ours_db, base_db = "pafar_restore_bench1", "pafar_restore_bench2"
    tmp = Path(tempfile.mkdtemp(prefix="runbook-bench-backups-"))
    try:
        path = tmp / NAME
        t = time.perf_counter()
        raw = generate(path, TARGET_MB * 1_000_000)
        size = path.stat().st_size
        print(f"generated {raw / 1e6:.0f} MB of SQL -> {size / 1e6:.0f} MB gzip in {time.perf_counter() - t:.0f} s",
              flush=True)

        subprocess.run(["gunzip", "-t", str(path)], check=True)  # warm the page cache for both contenders
        t = time.perf_counter()
        subprocess.run(["gunzip", "-t", str(path)], check=True)
        gunzip_t = time.perf_counter() - t

        def baseline() -> float:
            """`gunzip -c FILE | psql` into an empty database (created first, dropped after)."""
            with postgres_admin(env, "main") as admin:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(base_db)))
            conninfo, penv = postgres_program(env, "main", admin=True, dbname=base_db)
            t = time.perf_counter()
            gunzip = subprocess.Popen(["gunzip", "-c", str(path)], stdout=subprocess.PIPE)
            psql = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--dbname", conninfo],
                                  stdin=gunzip.stdout, stdout=subprocess.DEVNULL, env=penv, check=False)
            assert gunzip.stdout is not None
            gunzip.stdout.close()
            elapsed = time.perf_counter() - t
            if gunzip.wait() != 0 or psql.returncode != 0:
                raise SystemExit("baseline restore failed")
            drop_database(env, "main", base_db, "_restore_bench")
            return elapsed

        baselines = [baseline()]  # before and after ours: order effects (checkpoints, cache) show up as spread
        child = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(tmp), NAME, ours_db],
                               capture_output=True, text=True, check=False, env={**os.environ})
        if child.returncode != 0:
            raise SystemExit(f"benchmark child failed: {child.stderr[-2000:]}")
        ours = json.loads(child.stdout.strip().splitlines()[-1])
        drop_database(env, "main", ours_db, "_restore_bench")
        baselines.append(baseline())
        baseline_restore = sum(baselines) / len(baselines)
    finally:
        for db in (ours_db, base_db):
            try:
                drop_database(env, "main", db, "_restore_bench")
            except Exception as exc:  # best effort cleanup of a benchmark
                print(f"cleanup of {db}: {exc}")
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
        if not was_running:
            sandbox.down()

    mb = ours["uncompressed"] / 1e6
    check_ratio = gunzip_t / ours["check_s"]
    restore_ratio = ours["restore_s"] / baseline_restore
    growth = max(ours["after_check_mb"], ours["after_restore_mb"]) - ours["base_mb"]
    print(f"\ndump: {mb:.0f} MB of SQL, {size / 1e6:.0f} MB compressed")
    print(f"  integrity  gunzip -t              {gunzip_t:7.2f} s  ({size / 1e6 / gunzip_t:6.1f} MB/s compressed)")
    print(f"             check_stream (+sha256) {ours['check_s']:7.2f} s  ({size / 1e6 / ours['check_s']:6.1f} MB/s)"
          f"   throughput ratio {check_ratio:.2f}x (goal >= 1.0x): {'met' if check_ratio >= 1.0 else 'NOT met'}")
    print(f"  restore    gunzip -c | psql       {baseline_restore:7.2f} s  (mean of {baselines[0]:.2f} before and "
          f"{baselines[1]:.2f} after)")
    print(f"             restore_backup         {ours['restore_s']:7.2f} s"
          f"   time ratio {restore_ratio:.2f}x (goal <= 1.2x): {'met' if restore_ratio <= 1.2 else 'NOT met'}")
    print(f"  memory     baseline {ours['base_mb']:.0f} MB, after check {ours['after_check_mb']:.0f} MB, after restore "
          f"{ours['after_restore_mb']:.0f} MB: growth {growth:.1f} MB (goal < 50 MB): "
          f"{'met' if growth < 50 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
