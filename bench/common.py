"""Shared benchmark helpers: data generation, process measurement, verification."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
from typing import Any

import duckdb
import psutil
import psycopg

MIXED_DDL = """
CREATE TABLE IF NOT EXISTS {name} (
    id bigint PRIMARY KEY, i integer, s text, j jsonb, n numeric(12,2), ts timestamptz, b boolean, t text)
"""

MIXED_FILL = """
INSERT INTO {name}
SELECT g, (g * 7) % 100000, 'name-' || (g % 9973),
       jsonb_build_object('id', g, 'tags', jsonb_build_array('alpha', 'beta', g % 13),
                          'payload', repeat(chr(97 + (g % 26)), 120), 'ok', g % 2 = 0),
       ((g * 31) % 10000000) / 100.0, timestamptz '2024-01-01' + g * interval '1 second', g % 3 = 0,
       CASE WHEN g % 5 = 0 THEN NULL ELSE md5(g::text) || repeat('z', 18) END
FROM generate_series({lo}, {hi}) g
"""


def create_mixed(dsn: str, name: str, rows: int, step: int = 500_000) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(MIXED_DDL.format(name=name))
        for lo in range(1, rows + 1, step):
            conn.execute(MIXED_FILL.format(name=name, lo=lo, hi=min(lo + step - 1, rows)))
        conn.execute(f"VACUUM ANALYZE {name}")
        # the pages VACUUM dirtied are written now, not by the checkpointer while the tools are timed
        conn.execute("CHECKPOINT")


@dataclasses.dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    returncode: int
    stderr: str


def measure(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Run ``cmd``; wall time and the peak RSS of the process tree (polled)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    ps = psutil.Process(proc.pid)
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            stop.wait(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    _, err = proc.communicate()
    elapsed = time.perf_counter() - started
    stop.set()
    t.join()
    return Run(elapsed, peak / 2**20, proc.returncode, err)


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


# one md5 per row over the same canonical text on both sides, summed: order-independent
_PG_FP = (
    "SELECT count(*), coalesce(sum(('x' || lpad(left(md5(concat_ws('|', id, i, s, j::text, n::text, "
    "(extract(epoch from ts) * 1000000)::bigint, b::text, t)), 15), 16, '0'))::bit(64)::bigint::numeric), 0) "
    "FROM {name}"
)
_DUCK_FP = (
    "SELECT count(*), coalesce(sum(CAST(('0x' || left(md5(concat_ws('|', id, i, s, CAST(j AS VARCHAR), "
    "CAST(n AS VARCHAR), epoch_us(ts), CAST(b AS VARCHAR), t)), 15)) AS BIGINT)::HUGEINT), 0) FROM {name}"
)


def fingerprint_pg(dsn: str, name: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(_PG_FP.format(name=name)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def fingerprint_duck(path: str, name: str) -> tuple[int, int]:
    con = duckdb.connect(path, read_only=True)
    try:
        row = con.execute(_DUCK_FP.format(name=name)).fetchone()
    finally:
        con.close()
    assert row is not None
    return int(row[0]), int(row[1])


def types_duck(path: str, schema: str, table: str) -> dict[str, Any]:
    con = duckdb.connect(path, read_only=True)
    try:
        return dict(
            con.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = ? "
                "AND table_name = ? ORDER BY ordinal_position",
                [schema, table],
            ).fetchall()
        )
    finally:
        con.close()
