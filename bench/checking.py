"""Consistency check benchmark: `datasync check` against reladiff on the same tables.

For each size: sync a mixed-type table, then (1) compare identical copies, (2) inject
100 scattered differences into the DuckDB copy (40 altered, 30 deleted, 30 extra rows)
and locate them.  Both tools compare every column; both results are verified against
the injected set (finding all 100 and nothing else).  Both run in this process (no
interpreter start-up on either side); ours includes aligning both sides at one LSN.  Each
tool runs twice per case, alternating, and the better time of each is reported (this machine's
run-to-run noise is ±15%).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time

import duckdb
import psutil
import psycopg
from rich.table import Table

import common
from datasync import identifiers
from datasync.engine import syncing
from datasync.validation import running

COLS = ("i", "s", "j", "n", "ts", "b", "t")


def _ours(dsn: str, path: str, name: str) -> tuple[float, set[str]]:
    # in-process, like reladiff below: what `datasync check` runs, without interpreter start-up;
    # it includes aligning both sides (catching the copy up through its slot) and the report
    started = time.perf_counter()
    run = running.check_file(dsn, path, running.Request([identifiers.TableName("public", name)],
                                                        ["row_count", "data_hash"]), slot=f"bench_{name}")
    elapsed = time.perf_counter() - started
    table = run.as_json()["tables"][0]
    keys = {str(k) for k in table["mismatched_keys"]}
    assert table["missing"] + table["extra"] + table["differing"] == len(keys) or len(keys) > 100
    return elapsed, keys


def _reladiff(dsn: str, path: str, name: str) -> tuple[float, set[str]]:
    import reladiff

    # its warning that text and JSON columns get no cross-database normalisation (false positives
    # possible), four times per diff, hid the results: the table shows any key it reports wrongly
    logging.getLogger("hashdiff_tables").setLevel(logging.ERROR)
    started = time.perf_counter()
    t1 = reladiff.connect_to_table(dsn, name, "id", extra_columns=COLS)
    t2 = reladiff.connect_to_table(f"duckdb://{path}", ("public", name), "id", extra_columns=COLS)
    keys = {str(row[0]) for _sign, row in reladiff.diff_tables(t1, t2)}
    elapsed = time.perf_counter() - started
    for t in (t1, t2):
        t.database.close()  # DuckDB allows one process on the file
    import psycopg2.extensions

    psycopg2.extensions.set_wait_callback(None)  # reladiff installs one; our COPY path is synchronous
    return elapsed, keys


class _PeakRss:
    """Peak resident memory of this process above its level at the start (both tools run in-process)."""

    def __enter__(self) -> _PeakRss:
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _both(dsn: str, path: str, name: str, rounds: int = 2) -> tuple[float, set[str], float, set[str], float, float]:
    """Each tool ``rounds`` times, alternating (so neither always meets colder caches); the best time of each,
    and the largest memory growth each caused."""
    ours: list[float] = []
    theirs: list[float] = []
    ours_keys: set[str] = set()
    rd_keys: set[str] = set()
    ours_mb = theirs_mb = 0.0
    for _ in range(rounds):
        with _PeakRss() as mem:
            t, ours_keys = _ours(dsn, path, name)
        ours.append(t)
        ours_mb = max(ours_mb, mem.mb)
        with _PeakRss() as mem:
            t, rd_keys = _reladiff(dsn, path, name)
        theirs.append(t)
        theirs_mb = max(theirs_mb, mem.mb)
    return min(ours), ours_keys, min(theirs), rd_keys, ours_mb, theirs_mb


def _inject(path: str, name: str, rows: int) -> set[str]:
    rnd = random.Random(100)
    ids = rnd.sample(range(1, rows + 1), 70)
    altered, deleted = ids[:40], ids[40:]
    extra = [rows + 1_000_000 + i for i in range(30)]
    con = duckdb.connect(path)
    con.execute(f"UPDATE public.{name} SET i = i + 1 WHERE id IN ({', '.join(map(str, altered))})")
    con.execute(f"DELETE FROM public.{name} WHERE id IN ({', '.join(map(str, deleted))})")
    con.execute(f"INSERT INTO public.{name} SELECT id + 1000000 + {rows} - min(id) OVER (), i, s, j, n, ts, b, t "
                f"FROM public.{name} ORDER BY id LIMIT 30")
    con.close()
    return {str(k) for k in altered + deleted + extra}


def run(dsn: str, work: str, sizes: list[int], console: object) -> Table:
    out = Table(title="Consistency check vs reladiff (2 cores)")
    for col in ("rows", "case", "datasync s", "reladiff s", "speed-up", "datasync rows/s", "RSS growth MB (ours / reladiff)",
                "datasync found", "reladiff found"):
        out.add_column(col)
    for rows in sizes:
        name = f"chk_{rows // 1_000_000}m"
        console.print(f"[bold]check: generating {name}…")  # type: ignore[attr-defined]
        common.create_mixed(dsn, name, rows)
        path = os.path.join(work, f"{name}.duckdb")
        syncing.run(syncing.Options(source=dsn, target=path, tables=[name], slot=f"bench_{name}"))
        ours_s, ours_keys, rd_s, rd_keys, ours_mb, rd_mb = _both(dsn, path, name)
        assert not ours_keys and not rd_keys, (ours_keys, rd_keys)
        out.add_row(f"{rows / 1e6:.0f}M", "identical", f"{ours_s:.1f}", f"{rd_s:.1f}", f"{rd_s / ours_s:.1f}×",
                    f"{rows / ours_s / 1e6:.2f}M", f"{ours_mb:.0f} / {rd_mb:.0f}", "0", "0")
        injected = _inject(path, name, rows)
        ours_s, ours_keys, rd_s, rd_keys, ours_mb, rd_mb = _both(dsn, path, name)
        out.add_row(
            f"{rows / 1e6:.0f}M", "100 differences", f"{ours_s:.1f}", f"{rd_s:.1f}", f"{rd_s / ours_s:.1f}×",
            f"{rows / ours_s / 1e6:.2f}M", f"{ours_mb:.0f} / {rd_mb:.0f}",
            f"{len(ours_keys & injected)}/100" + ("" if ours_keys == injected else f" (+{len(ours_keys - injected)} wrong)"),
            f"{len(rd_keys & injected)}/100" + ("" if rd_keys == injected else f" (+{len(rd_keys - injected)} wrong)"),
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"SELECT pg_drop_replication_slot('bench_{name}')")
            conn.execute(f"DROP PUBLICATION bench_{name}")
            conn.execute(f"DROP TABLE {name}")
        os.remove(path)
    return out
