"""``make bench``: our snapshot and CDC against the strongest baselines, in one run.

Snapshot (1M and 5M rows of mixed types): ``datasync sync --once`` vs DuckDB's
own postgres_scanner (from its wheel) copying the same table, and the source
limit (binary COPY read and discarded over 2 connections).  CDC (200k updates,
50k inserts, 20k deletes in transactions of 1k row changes on a 1M-row table):
our apply rate vs receiving the same changes from a slot and discarding them
(our C reader; five alternating rounds of each, from copies of our slot, the
best of each counts, the medians are printed too; and psycopg2's reader), vs one DuckDB statement per change, and our apply alone
(the changes recorded, then replayed from memory: no walsender sharing the
CPU); then end-to-end lag at 5k changes/s.  Rates are timed as the issue defines
them, from the first change read to the target holding the last one (for the raw
receivers: to the last commit read); the whole ``--once`` run (start-up and the
final checkpoint included) is printed beside ours.
Every copy is verified against the source with a row fingerprint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import psycopg
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
from datasync.engine import pgoutput, streaming, syncing
from datasync.sources import embedded, receiving, replication
from datasync.targets import duckfile

console = Console(width=150)

ROUNDS = 5  # snapshot runs of each tool, alternating (this machine drifts by ±15% between runs: best of five)
CDC_ROUNDS = 5  # CDC: raw receive and our apply, alternating, each from a slot of its own (best of five)

SCANNER = """
import sys, duckdb, duckdb_extension_postgres, os, glob
ext = glob.glob(os.path.join(os.path.dirname(duckdb_extension_postgres.__file__), "extensions", "*", "*.duckdb_extension"))[0]
con = duckdb.connect(sys.argv[1])
con.execute(f"INSTALL '{ext}'")
con.execute("LOAD postgres")
con.execute("SET memory_limit = '256MB'")
con.execute(f"ATTACH '{sys.argv[2]}' AS pg (TYPE postgres, READ_ONLY)")
con.execute(f"CREATE TABLE {sys.argv[3]} AS SELECT * FROM pg.public.{sys.argv[3]}")
con.close()
"""

COPY_LIMIT = """
import sys, threading, psycopg
dsn, table = sys.argv[1], sys.argv[2]
with psycopg.connect(dsn) as c:
    pages = c.execute(f"SELECT pg_relation_size('{table}') / 8192").fetchone()[0]
half = pages // 2
def read(cond):
    with psycopg.connect(dsn) as c:
        with c.cursor().copy(f"COPY (SELECT * FROM {table} WHERE {cond}) TO STDOUT (FORMAT binary)") as cp:
            for _ in cp:
                pass
ts = [threading.Thread(target=read, args=(c,)) for c in (f"ctid < '({half},0)'", f"ctid >= '({half},0)'")]
[t.start() for t in ts]; [t.join() for t in ts]
"""


def snapshot_bench(dsn: str, work: str, rows: int, results: Table) -> None:
    name = f"mixed_{rows // 1_000_000}m"
    console.print(f"[bold]generating {name} ({rows:,} rows)…")
    common.create_mixed(dsn, name, rows)
    expected = common.fingerprint_pg(dsn, name)
    ours_path = os.path.join(work, f"ours_{name}.duckdb")
    scan_path = os.path.join(work, f"scanner_{name}.duckdb")
    env = {**os.environ, "DATASYNC_SOURCE_DSN": dsn}
    # alternate the two tools (the page cache and the machine drift): best time of each
    ours_runs, scan_runs = [], []
    for _ in range(ROUNDS):
        for p in (ours_path, scan_path, ours_path + ".wal", scan_path + ".wal"):
            if os.path.exists(p):
                os.remove(p)
        run = common.measure(
            [sys.executable, "-m", "datasync", "sync", "--target", ours_path, "--table", name, "--once", "--quiet",
             "--slot", f"bench_{name}"], env=env,
        )
        assert run.returncode == 0, run.stderr
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"SELECT pg_drop_replication_slot('bench_{name}')")
            conn.execute(f"DROP PUBLICATION bench_{name}")
        ours_runs.append(run)
        run = common.measure(common.python(SCANNER, scan_path, dsn, name))
        assert run.returncode == 0, run.stderr
        scan_runs.append(run)
    assert common.fingerprint_duck(ours_path, f"public.{name}") == expected, "our copy differs from the source"
    ours_types = common.types_duck(ours_path, "public", name)
    scan_types = common.types_duck(scan_path, "main", name)
    scan_ok = common.fingerprint_duck(scan_path, name) == expected
    ours = min(ours_runs, key=lambda r: r.seconds)
    scan = min(scan_runs, key=lambda r: r.seconds)
    ours.peak_rss_mb = max(r.peak_rss_mb for r in ours_runs)
    scan.peak_rss_mb = max(r.peak_rss_mb for r in scan_runs)
    ratios = sorted(s.seconds / o.seconds for o, s in zip(ours_runs, scan_runs, strict=True))
    console.print(f"{name}: ours {[round(r.seconds, 2) for r in ours_runs]} s, scanner "
                  f"{[round(r.seconds, 2) for r in scan_runs]} s, per-round ratios {[round(r, 2) for r in ratios]}")
    limit = common.measure(common.python(COPY_LIMIT, dsn, name))
    assert limit.returncode == 0, limit.stderr
    for label, run, types, ok in (
        ("datasync snapshot", ours, ours_types, True),
        ("postgres_scanner", scan, scan_types, scan_ok),
        ("binary COPY, discarded (source limit)", limit, None, None),
    ):
        results.add_row(
            f"{rows / 1e6:.0f}M", label, f"{run.seconds:.1f}", f"{rows / run.seconds:,.0f}", f"{run.peak_rss_mb:,.0f}",
            f"{scan.seconds / run.seconds:.2f}" if run is not limit else f"{limit.seconds / ours.seconds:.2f} (ours/limit)",
            "-" if types is None else f"n={types['n']}, j={types['j']}",
            "-" if ok is None else ("✓" if ok else "✗ (differs)"),
        )
    # the machine drifts between runs: each round's two runs are seconds apart, so their ratio is the steadier one
    results.add_row(f"{rows / 1e6:.0f}M", f"  (per round, median of {ROUNDS})", "-", "-", "-",
                    f"{statistics.median(ratios):.2f}", "-", "-")
    for p in (ours_path, scan_path):
        os.remove(p)


def generate_changes(dsn: str, name: str) -> int:
    """200k updates, 50k inserts, 20k deletes, in transactions of 1k row changes."""
    with psycopg.connect(dsn, autocommit=False) as conn:
        for lo in range(1, 200_001, 1000):
            conn.execute(f"UPDATE {name} SET i = i + 1, s = s || 'u', n = n + 1 WHERE id BETWEEN %s AND %s",
                         (lo, lo + 999))
            conn.commit()
        for lo in range(2_000_001, 2_050_001, 1000):
            conn.execute(common.MIXED_FILL.format(name=name, lo=lo, hi=lo + 999))
            conn.commit()
        for lo in range(500_001, 520_001, 1000):
            conn.execute(f"DELETE FROM {name} WHERE id BETWEEN %s AND %s", (lo, lo + 999))
            conn.commit()
    return 270_000


def raw_receive(dsn: str, slot: str, publication: str, upto: int, native: bool = True) -> tuple[int, float]:
    """The source limit: the same stream, received and discarded (confirmed as we go).

    Timed as our apply is: from the first message read to the last commit read.
    ``native``: read with our C reader (the strongest receiver); otherwise with
    psycopg2's ``read_message`` (what a plain Python consumer gets).
    """
    stream = receiving.Stream(dsn, slot, publication, native=native)
    started = last_at = 0.0
    n = 0
    last_end = 0
    while True:
        msgs = stream.read(10_000, 0.05)
        if msgs and not started:
            started = time.perf_counter()
        for data in msgs:
            tag = data[0]
            if tag in (0x49, 0x55, 0x44):
                n += 1
            elif tag == 0x43:
                last_end = pgoutput.decode(data).end_lsn  # type: ignore[union-attr]
                last_at = time.perf_counter()
        if msgs:
            stream.confirm(last_end)
            continue
        if stream.wal_end >= upto:
            break
        stream.request_status()
    stream.close()
    assert n and last_at > started, f"the raw receiver from {slot} got no changes"
    return n, last_at - started


def apply_alone(dsn: str, before: str, name: str, slot: str, upto: int) -> float:
    """Our apply without a source sharing the CPU: the same changes, recorded from a
    slot, replayed from memory into the copy as snapshotted (then verified)."""
    stream = receiving.Stream(dsn, "bench_record", slot)
    reads: list[tuple[list[bytes], int]] = []
    while True:
        msgs = stream.read(10_000, 0.05)
        reads.append((msgs, stream.wal_end))
        if not msgs and stream.wal_end >= upto:
            break
        if not msgs:
            stream.request_status()
    stream.close()
    target = duckfile.DuckTarget(before)
    with psycopg.connect(dsn, autocommit=True) as control:
        changes = streaming.ChangeStream(
            dsn=dsn, control=control, target=target, slot=slot, publication=slot, states=target.table_states(),
            batch_changes=syncing.Options.batch_changes, open_stream=lambda: receiving.Recorded(reads, upto),
        )
        stats = changes.run(upto, threading.Event())
        target.close()
    assert stats.first_read_at is not None and stats.last_applied_at is not None
    elapsed = stats.last_applied_at - stats.first_read_at  # timed as the live apply is
    assert common.fingerprint_duck(before, f"public.{name}") == common.fingerprint_pg(dsn, name), "replayed copy differs"
    return stats.changes / elapsed


def naive_rate(path: str, name: str, dsn: str, sample: int = 5000) -> float:
    """One DuckDB statement per change, on a sample of updates."""
    import duckdb

    con = duckdb.connect(path)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"SELECT id, i, s, n FROM {name} WHERE id > 300000 ORDER BY id LIMIT %s", (sample,)).fetchall()
    started = time.perf_counter()
    for rid, i, s, n in rows:
        con.execute("BEGIN")
        con.execute(f"UPDATE public.{name} SET i = ?, s = ?, n = ? WHERE id = ?", [i, s, n, rid])
        con.execute("COMMIT")
    elapsed = time.perf_counter() - started
    con.close()
    return sample / elapsed


def cdc_bench(dsn: str, work: str, results: Table) -> None:
    name = "cdc_1m"
    console.print("[bold]CDC: generating the 1M-row table…")
    common.create_mixed(dsn, name, 1_000_000)
    path = os.path.join(work, "cdc.duckdb")
    slot = "bench_cdc"
    syncing.run(syncing.Options(source=dsn, target=path, tables=[name], slot=slot))
    before = os.path.join(work, "cdc_before.duckdb")
    shutil.copy(path, before)  # the copy as snapshotted: each round and the apply-alone replay start from it
    # every round reads the same changes from a slot of its own, copied from ours at the snapshot
    raw_slots = [f"bench_raw_{r}" for r in range(CDC_ROUNDS)]
    our_slots = [slot] + [f"bench_ours_{r}" for r in range(1, CDC_ROUNDS)]
    extra = raw_slots + our_slots[1:] + ["bench_raw_py", "bench_record"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for copy in extra:
            conn.execute("SELECT pg_copy_logical_replication_slot(%s, %s)", (slot, copy))
    console.print("[bold]CDC: writing 270k changes (the slots hold them)…")
    generate_changes(dsn, name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        upto = replication.wait_flushed(conn)
        # after the changes' WAL (the slots decode up to upto only): no autovacuum of the
        # 270k dead rows and no checkpointer writing them while the receivers are timed
        conn.execute(f"VACUUM ANALYZE {name}")
        conn.execute("CHECKPOINT")
    raw_rates: list[float] = []
    ours_rates: list[float] = []
    whole_rates: list[float] = []
    changes = 0
    # alternating rounds: this VM's speed drifts between runs (the same raw receive: 115k-225k/s,
    # whichever vCPU the walsender gets); the best of each is compared, the medians shown
    for r in range(CDC_ROUNDS):
        n_raw, raw_s = raw_receive(dsn, raw_slots[r], slot, upto)
        raw_rates.append(n_raw / raw_s)
        target = path if r == 0 else os.path.join(work, f"cdc_round{r}.duckdb")
        if r:
            shutil.copy(before, target)
        started = time.perf_counter()
        # the default batch size, as users run it (100k batches measured ~20% slower: a longer
        # last MERGE after the stream ends, and more CPU taken from the walsender meanwhile)
        res = syncing.run(syncing.Options(source=dsn, target=target, tables=[name], slot=our_slots[r],
                                          publication=slot))
        whole_s = time.perf_counter() - started
        # as the issue defines it: from the first change read to the target holding the last one
        assert res.stats.first_read_at is not None and res.stats.last_applied_at is not None
        changes = res.stats.changes
        ours_rates.append(changes / (res.stats.last_applied_at - res.stats.first_read_at))
        whole_rates.append(changes / whole_s)
        assert common.fingerprint_duck(target, f"public.{name}") == common.fingerprint_pg(dsn, name), "CDC copy differs"
        if r:
            os.remove(target)
        console.print(f"CDC round {r + 1}: raw receive {raw_rates[-1]:,.0f}/s, ours {ours_rates[-1]:,.0f}/s")
    n_py, py_s = raw_receive(dsn, "bench_raw_py", slot, upto, native=False)
    alone = apply_alone(dsn, before, name, slot, upto)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for copy in extra:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (copy,))
    naive = naive_rate(path, name, dsn)
    ours, raw = max(ours_rates), max(raw_rates)
    results.add_row(f"apply 270k changes (best of {CDC_ROUNDS})", f"{ours:,.0f}", f"{raw:,.0f}", f"{ours / raw:.2f}",
                    f"{naive:,.0f}", f"{ours / naive:,.0f}×", "✓")
    results.add_row(f"  (median of {CDC_ROUNDS})", f"{statistics.median(ours_rates):,.0f}",
                    f"{statistics.median(raw_rates):,.0f}",
                    f"{statistics.median(ours_rates) / statistics.median(raw_rates):.2f}", "-", "-", "✓")
    results.add_row("  (each round: ours / raw)", " ".join(f"{x / 1000:.0f}k" for x in ours_rates),
                    " ".join(f"{x / 1000:.0f}k" for x in raw_rates),
                    " ".join(f"{o / w:.2f}" for o, w in zip(ours_rates, raw_rates, strict=True)), "-", "-", "✓")
    results.add_row("  (whole run: start-up, stream, final checkpoint)", f"{max(whole_rates):,.0f}", f"{raw:,.0f}",
                    f"{max(whole_rates) / raw:.2f}", "-", "-", "-")
    results.add_row("  (raw via psycopg2 read_message)", "-", f"{n_py / py_s:,.0f}",
                    f"{ours / (n_py / py_s):.2f}", "-", "-", "-")
    results.add_row("  (apply alone: recorded stream)", f"{alone:,.0f}", "-", "-", "-", "-", "✓")
    # lag at 5k changes/s offered load
    stop, done = threading.Event(), threading.Event()
    stats_box: list[streaming.Stats] = []

    def follow() -> None:
        r = syncing.run(syncing.Options(source=dsn, target=path, tables=[name], slot=slot, follow=True,
                                        max_batch_seconds=0.05, poll_seconds=0.02), stop=stop)
        stats_box.append(r.stats)
        done.set()

    th = threading.Thread(target=follow)
    th.start()
    time.sleep(2)
    offered = 0
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=False) as conn:
        k = 0
        while time.perf_counter() - t0 < 20:
            tick = time.perf_counter()
            conn.execute(f"UPDATE {name} SET i = i + 1 WHERE id BETWEEN %s AND %s", (k * 100 + 1, k * 100 + 100))
            conn.commit()
            k = (k + 1) % 9000
            offered += 100
            time.sleep(max(0.0, 0.02 - (time.perf_counter() - tick)))  # 50 txns/s x 100 rows = 5k/s
    rate = offered / (time.perf_counter() - t0)
    time.sleep(2)
    stop.set()
    th.join()
    lags = sorted(stats_box[0].lag_samples)
    p50, p99 = lags[len(lags) // 2], lags[max(0, int(len(lags) * 0.99) - 1)]
    assert common.fingerprint_duck(path, f"public.{name}") == common.fingerprint_pg(dsn, name), "CDC copy differs"
    results.add_row(f"lag at {rate:,.0f} changes/s", f"p50 {p50 * 1000:.0f} ms", f"p99 {p99 * 1000:.0f} ms", "-",
                    "-", "-", "✓")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000000,5000000")
    ap.add_argument("--skip-cdc", action="store_true")
    ap.add_argument("--check-sizes", default="1000000,5000000")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="datasync-bench-")
    pg = embedded.EmbeddedPostgres(settings={"max_wal_size": "4GB", "checkpoint_timeout": "30min"}).start()
    try:
        dsn = pg.dsn()
        snap = Table(title="Snapshot: PostgreSQL → DuckDB (2 cores)")
        for col in ("rows", "path", "seconds", "rows/s", "peak RSS MB", "scanner time / this", "types", "verified"):
            snap.add_column(col)
        for size in [int(s) for s in args.sizes.split(",") if s]:
            snapshot_bench(dsn, work, size, snap)
        if args.sizes:
            console.print(snap)
        if not args.skip_cdc:
            cdc = Table(title="CDC apply (2 cores)")
            for col in ("case", "datasync changes/s", "raw slot receive/s", "ratio to raw", "naive per-change/s",
                        "vs naive", "verified"):
                cdc.add_column(col)
            cdc_bench(dsn, work, cdc)
            console.print(cdc)
        if not args.skip_check:
            import checking

            console.print(checking.run(dsn, work, [int(s) for s in args.check_sizes.split(",")], console))
    finally:
        pg.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
