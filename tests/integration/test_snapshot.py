"""Snapshot: every common type round-trips exactly; parallel chunks; partitions; quoting."""

from __future__ import annotations

import threading
import time
from typing import Any

import duckdb
import pytest

from tests import helpers

TYPES_DDL = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE alltypes (
    id bigint PRIMARY KEY,
    i2 smallint, i4 integer, i8 bigint,
    n_any numeric, n_fix numeric(12,2), n_big numeric(38,10),
    r real, d double precision, b boolean,
    t text, vc varchar(20), ch char(5), by bytea,
    dt date, tm time, ttz timetz, ts timestamp, tstz timestamptz, iv interval,
    u uuid, js json, jb jsonb, ip inet, cid cidr, mac macaddr,
    arr_i int[], arr_t text[], m mood, dom posint
);
"""

ROWS = """
INSERT INTO alltypes VALUES
 (1, -32768, -2147483648, -9223372036854775808,
  123456789012345678901234567890.123456789012345678901, 1234567890.12, 1234567890123456789012345678.0123456789,
  3.4028235e38, 1.7976931348623157e308, true,
  'plain', 'vc', 'ab', '\\x00ff10',
  '2024-02-29', '23:59:59.999999', '12:34:56.789+05:30', '2024-01-02 03:04:05.678901', '2024-01-02 03:04:05.678901+02',
  '1 year 2 mons 3 days 04:05:06.789',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"b": 1,   "a": [1, 2]}', '{"b": 1, "a": [1, 2, {"c": null}]}',
  '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03',
  '{1,NULL,3}', '{"a b",NULL,"c\\"d"}', 'happy', 7),
 (2, 32767, 2147483647, 9223372036854775807,
  'NaN', -0.01, 0, 'NaN', 'Infinity', false,
  E'multi\\nline, "quoted", with comma', '', '', '\\x',
  'infinity', '00:00:00', '00:00:00-08', '-infinity', '1970-01-01 00:00:00+00', '-1 days +02:03:00',
  '00000000-0000-0000-0000-000000000000', '[]', '{}', '::1', '::/0', 'ff:ff:ff:ff:ff:ff',
  '{}', '{}', 'sad', 1),
 (3, 0, 0, 0, '-Infinity', NULL, 1e-10, '-Infinity', '-0', NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '-178000000 years',
  NULL, 'null', '"str"', NULL, NULL, NULL, '{{1,2},{3,4}}', NULL, NULL, NULL),
 (4, 1, 1, 1, 1e100, 99.99, -1, 1.1, 0.1, true, 'ünïcödé ✓ 😀', 'x', 'y', '\\xdeadbeef',
  '0044-03-15 BC', '12:00', '12:00+00', '0001-12-31 23:59:59 BC', '0100-01-01 00:00:00.000001+00 BC',
  '-1 mons -2 days -03:04:05', NULL, '{"nested": {"deep": [true, false]}}', '{"k": 1.50}', '2001:db8::1', NULL, NULL,
  NULL, '{""}', 'ok', 2)
"""


def test_all_types_round_trip(pg: helpers.Source, duck_path: str) -> None:
    pg.execute(TYPES_DDL)
    pg.execute(ROWS)
    res = helpers.sync_once(pg, duck_path, "public.alltypes")
    assert res.snapshotted
    assert helpers.assert_same(pg, duck_path, "public.alltypes") == 4
    con = duckdb.connect(duck_path, read_only=True)
    types = dict(
        con.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'alltypes'"
        ).fetchall()
    )
    assert types["n_fix"] == "DECIMAL(12,2)"
    assert types["n_any"] == "VARCHAR"
    assert types["jb"] == "JSON" and types["js"] == "JSON"
    assert types["tstz"] == "TIMESTAMP WITH TIME ZONE"
    assert types["iv"] == "INTERVAL"
    assert types["by"] == "BLOB"
    assert types["dom"] == "INTEGER"
    assert types["u"] == "UUID"
    # exact text where DuckDB has no native type; exact values where it does
    row = con.execute(
        "SELECT n_any, arr_i, arr_t, js, ip, m, CAST(iv AS VARCHAR), hex(\"by\"), CAST(d AS VARCHAR) "
        "FROM public.alltypes WHERE id = 1"
    ).fetchone()
    assert row == (
        "123456789012345678901234567890.123456789012345678901", "{1,NULL,3}", '{"a b",NULL,"c\\"d"}',
        '{"b": 1,   "a": [1, 2]}', "192.168.0.1/24", "happy", "1 year 2 months 3 days 04:05:06.789", "00FF10",
        "1.7976931348623157e+308",
    )
    row2 = con.execute("SELECT n_any, d, CAST(iv AS VARCHAR), t, ch FROM public.alltypes WHERE id = 2").fetchone()
    assert row2 == ("NaN", float("inf"), "-1 day 02:03:00", 'multi\nline, "quoted", with comma', "     ")
    con.close()


def test_parallel_chunks_partitions_and_quoting(pg: helpers.Source, duck_path: str, monkeypatch: object) -> None:
    from datasync.engine import reading

    monkeypatch.setattr(reading, "PAGES_PER_CHUNK", 16)  # type: ignore[attr-defined]
    pg.execute(
        """
        CREATE SCHEMA "Sales Dept";
        CREATE TABLE "Sales Dept"."Order Items" ("Order Id" int, "Line" int, "Note ""x"" y" text,
            PRIMARY KEY ("Order Id", "Line"));
        INSERT INTO "Sales Dept"."Order Items" SELECT g / 10, g % 10, md5(g::text) FROM generate_series(0, 19999) g;
        CREATE TABLE events (id bigint, day date, payload text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
        CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
        CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
        INSERT INTO events SELECT g, DATE '2024-06-01' + (g % 400), repeat('x', g % 50) FROM generate_series(1, 30000) g;
        """
    )
    helpers.sync_once(pg, duck_path, '"Sales Dept"."Order Items"', "public.events")
    assert helpers.assert_same(pg, duck_path, '"Sales Dept"."Order Items"') == 20000
    assert helpers.assert_same(pg, duck_path, "public.events") == 30000
    con = duckdb.connect(duck_path, read_only=True)
    tables = {
        r[0]
        for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema <> '_datasync'"
        ).fetchall()
    }
    con.close()
    assert tables == {"Order Items", "events"}  # partitions land in their root; no bookkeeping tables


def test_rerun_without_changes_changes_nothing(pg: helpers.Source, duck_path: str) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' FROM generate_series(1, 1000) g")
    first = helpers.sync_once(pg, duck_path, "t")
    assert first.snapshotted
    again = helpers.sync_once(pg, duck_path, "t")
    assert again.snapshotted == {}
    assert again.stats.changes == 0
    assert helpers.assert_same(pg, duck_path, "public.t") == 1000


def test_adding_a_table_snapshots_only_that_table(pg: helpers.Source, duck_path: str) -> None:
    pg.execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);"
               "INSERT INTO a SELECT generate_series(1, 100); INSERT INTO b SELECT generate_series(1, 50)")
    helpers.sync_once(pg, duck_path, "a")
    pg.execute("INSERT INTO a VALUES (101); INSERT INTO b VALUES (51)")
    res = helpers.sync_once(pg, duck_path, "a", "b")
    assert set(map(str, res.snapshotted)) == {"public.b"}
    assert helpers.assert_same(pg, duck_path, "public.a") == 101
    assert helpers.assert_same(pg, duck_path, "public.b") == 51
    pg.execute("INSERT INTO b VALUES (52); DELETE FROM a WHERE id = 1")
    helpers.sync_once(pg, duck_path, "a")  # b stays part of the sync
    assert helpers.assert_same(pg, duck_path, "public.a") == 100
    assert helpers.assert_same(pg, duck_path, "public.b") == 52


def test_all_types_binary_copy_path(pg: helpers.Source, duck_path: str, monkeypatch: object) -> None:
    """Without ±infinity every chunk takes binary COPY; the text path is never used."""
    from datasync.engine import pgoutput, snapshotting

    assert pgoutput.SPEEDUPS
    pg.execute(TYPES_DDL)
    pg.execute(ROWS)
    pg.execute("DELETE FROM alltypes WHERE id = 2")  # the row with ±infinity dates/timestamps
    pg.execute("INSERT INTO alltypes (id, n_fix, n_any, iv, d, ts) SELECT g, g / 7.0, g * 1e30, g * interval '1.5 sec', "
               "g / 3.0, TIMESTAMP '1999-12-31 23:59:59.999999' + g * interval '1 day' FROM generate_series(10, 5000) g")

    def no_text(*args: object) -> None:
        raise AssertionError("the text path was used")

    monkeypatch.setattr(snapshotting, "read_csv", no_text)  # type: ignore[attr-defined]
    helpers.sync_once(pg, duck_path, "alltypes")
    assert helpers.assert_same(pg, duck_path, "public.alltypes") == 3 + 4991


def test_infinity_travels_binary(pg: helpers.Source, duck_path: str, monkeypatch: object) -> None:
    """±infinity dates and timestamps (open-ended validity columns) stay on the binary path:
    they travel as the values DuckDB itself reads as ±infinity."""
    from datasync.engine import snapshotting

    def no_text(*args: object) -> None:
        raise AssertionError("the text path was used")

    monkeypatch.setattr(snapshotting, "read_csv", no_text)  # type: ignore[attr-defined]
    pg.execute("CREATE TABLE inf (id int PRIMARY KEY, d date, ts timestamp, tz timestamptz);"
               "INSERT INTO inf VALUES (1, 'infinity', '-infinity', 'infinity'), (2, '-infinity', 'infinity', '-infinity'),"
               " (3, '2020-01-01', '2020-01-01 00:00:00', '2020-01-01 00:00:00+00'), (4, NULL, NULL, NULL);"
               "INSERT INTO inf SELECT g, 'infinity', '-infinity', 'infinity' FROM generate_series(5, 20000) g")
    helpers.sync_once(pg, duck_path, "inf")
    assert helpers.assert_same(pg, duck_path, "public.inf") == 20_000
    con = duckdb.connect(duck_path, read_only=True)
    rows = con.execute(
        "SELECT id, d = 'infinity'::date, d = '-infinity'::date, ts = 'infinity'::timestamp, "
        "ts = '-infinity'::timestamp, tz = 'infinity'::timestamptz, tz = '-infinity'::timestamptz, "
        "d::varchar, ts::varchar FROM public.inf WHERE id <= 4 ORDER BY id").fetchall()
    con.close()
    assert rows == [
        (1, True, False, False, True, True, False, "infinity", "-infinity"),
        (2, False, True, True, False, False, True, "-infinity", "infinity"),
        (3, False, False, False, False, False, False, "2020-01-01", "2020-01-01 00:00:00"),
        (4, None, None, None, None, None, None, None, None),
    ]


def test_values_past_duckdb_fall_back_to_text(pg: helpers.Source, duck_path: str) -> None:
    """An interval beyond Arrow's nanoseconds sends its chunk through the text path; DuckDB holds it."""
    pg.execute("CREATE TABLE longiv (id int PRIMARY KEY, iv interval);"
               "INSERT INTO longiv VALUES (1, '3000000 hours'), (2, '1 day 02:03:04.5')")
    helpers.sync_once(pg, duck_path, "longiv")
    assert helpers.assert_same(pg, duck_path, "public.longiv") == 2
    con = duckdb.connect(duck_path, read_only=True)
    assert con.execute("SELECT iv::varchar FROM public.longiv WHERE id = 1").fetchone() == ("3000000:00:00",)
    con.close()


def test_snapshot_writes_whole_row_groups(pg: helpers.Source, duck_path: str, monkeypatch: object) -> None:
    """DuckDB's threads write whole row groups; the partial ones under half a row group are gathered
    at the end (the table's last group may be small, no other)."""
    from datasync.engine import reading

    monkeypatch.setattr(reading, "PAGES_PER_CHUNK", 64)  # type: ignore[attr-defined]
    pg.execute("CREATE TABLE wide (id bigint PRIMARY KEY, v text, j jsonb);"
               "INSERT INTO wide SELECT g, md5(g::text), jsonb_build_object('g', g) FROM generate_series(1, 400000) g")
    helpers.sync_once(pg, duck_path, "wide")
    assert helpers.assert_same(pg, duck_path, "public.wide") == 400_000
    con = duckdb.connect(duck_path, read_only=True)
    groups = [n for _, n in con.execute(
        "SELECT row_group_id, max(count) FROM pragma_storage_info('public.wide') GROUP BY ALL ORDER BY 1").fetchall()]
    con.close()
    assert sum(groups) == 400_000
    assert all(n >= 122_880 // 2 for n in groups[:-1]), groups  # DuckDB's row group size: 122,880
    assert sum(n < 122_880 for n in groups) >= 1, groups


def test_a_failing_copy_names_the_error_and_keeps_the_connection(pg: helpers.Source) -> None:
    from datasync import errors
    from datasync.engine import snapshotting
    from datasync.sources import connecting

    conn = connecting.connect_libpq2(pg.dsn)
    try:
        plan = snapshotting.BinaryPlan(b"i", (0,), (snapshotting.pa.int32(),), ("x",), ("c0",))
        try:
            snapshotting.read_binary(conn, "COPY (SELECT 1 / (g - 3) FROM generate_series(1, 5) g) TO STDOUT (FORMAT binary)",
                                     plan)
            raise AssertionError("no error")
        except errors.SourceError as exc:
            assert "division by zero" in str(exc)
        conn.rollback()
        rows = snapshotting.read_binary(conn, "COPY (SELECT g FROM generate_series(1, 5) g) TO STDOUT (FORMAT binary)", plan)
        assert rows.column(0).to_pylist() == [1, 2, 3, 4, 5]
    finally:
        conn.close()


def test_a_value_of_the_wrong_size_is_refused_not_misread(pg: helpers.Source) -> None:
    """A plan that disagrees with what PostgreSQL sends (int4 read as int8) fails loudly: the decoder
    checks each fixed-size value's length instead of reading past it."""
    import pytest

    from datasync.engine import pgoutput, snapshotting
    from datasync.sources import connecting

    conn = connecting.connect_libpq2(pg.dsn)
    try:
        plan = snapshotting.BinaryPlan(b"l", (0,), (snapshotting.pa.int64(),), ("x",), ("c0",))
        with pytest.raises(pgoutput.DecodeError, match="size"):
            snapshotting.read_binary(conn, "COPY (SELECT g FROM generate_series(1, 5) g) TO STDOUT (FORMAT binary)",
                                     plan)
        conn.rollback()
        rows = snapshotting.read_binary(
            conn, "COPY (SELECT g::bigint FROM generate_series(1, 5) g) TO STDOUT (FORMAT binary)", plan)
        assert rows.column(0).to_pylist() == [1, 2, 3, 4, 5]
    finally:
        conn.close()


def test_a_reader_failing_mid_copy_stops_it_with_its_error(pg: helpers.Source, duck_path: str,
                                                           monkeypatch: object) -> None:
    """A reader's error ends the streaming INSERT (no hang) and nothing half-copied is swapped in."""
    import pytest

    from datasync import errors
    from datasync.engine import reading

    monkeypatch.setattr(reading, "PAGES_PER_CHUNK", 16)  # type: ignore[attr-defined]
    pg.execute("CREATE TABLE half (id bigint PRIMARY KEY, v text);"
               "INSERT INTO half SELECT g, md5(g::text) FROM generate_series(1, 50000) g")
    real, calls = reading.read_binary, []

    def failing(*args: object) -> object:
        calls.append(1)
        if len(calls) == 5:
            raise errors.SourceError("reading the snapshot failed: the network went away")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(reading, "read_binary", failing)  # type: ignore[attr-defined]
    with pytest.raises(errors.SourceError, match="the network went away"):
        helpers.sync_once(pg, duck_path, "half")
    con = duckdb.connect(duck_path, read_only=True)
    try:
        tables = {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'public'").fetchall()}
    finally:
        con.close()
    assert tables == set(), tables  # neither the copy nor its half-loaded table (_datasync_load_half)
    monkeypatch.setattr(reading, "read_binary", real)  # type: ignore[attr-defined]
    helpers.sync_once(pg, duck_path, "half")  # a later run starts over and completes
    assert helpers.assert_same(pg, duck_path, "public.half") == 50_000


def test_decoder_reuses_released_column_buffers(pg: helpers.Source) -> None:
    """Chunk buffers go back to a pool when Arrow lets go; the next chunk of that size takes them."""
    from datasync import identifiers
    from datasync.engine import _speedups, reading, snapshotting  # type: ignore[attr-defined]
    from datasync.sources import catalog, connecting

    pg.execute("CREATE TABLE pooled (id bigint PRIMARY KEY, v text);"
               "INSERT INTO pooled SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 40000) g")
    with connecting.connect(pg.dsn) as ctl:
        table = catalog.describe(ctl, identifiers.TableName("public", "pooled"))
    plan = snapshotting.binary_plan(table)
    assert plan is not None
    conn = connecting.connect_libpq2(pg.dsn)
    try:
        sql = reading.binary_sql(plan, reading.Chunk(table.leaves[0], 0, None))
        sizes = reading.new_sizes(plan)
        first = snapshotting.read_binary(conn, sql, plan, sizes)
        assert sizes[3 * 1 + 1] == sum(len(v) for v in first.column(1).to_pylist())  # v's bytes, as decoded
        del first
        taken = _speedups.pool_stats()[0]
        again = snapshotting.read_binary(conn, sql, plan, sizes)
        assert _speedups.pool_stats()[0] > taken  # the released buffers were taken again
        assert again.column(0).to_pylist() == list(range(1, 40001))
        del again
        _speedups.pool_trim()
        assert _speedups.pool_stats()[4] == 0
    finally:
        conn.close()


def test_stream_waits_for_room_and_lets_every_buffer_go(pg: helpers.Source, duck_path: str,
                                                        monkeypatch: object) -> None:
    """Over its in-flight budget the stream holds batches back (bounded waits, no deadlock);
    after the copy no decoded buffer is left alive."""
    from datasync.engine import _speedups, reading, snapshotting  # type: ignore[attr-defined]

    monkeypatch.setattr(reading, "PAGES_PER_CHUNK", 32)  # type: ignore[attr-defined]
    monkeypatch.setattr(snapshotting, "IN_FLIGHT_BYTES", 0)  # type: ignore[attr-defined]
    monkeypatch.setattr(snapshotting, "ROW_GROUP_ROWS", 0)  # type: ignore[attr-defined]  # always over budget
    monkeypatch.setattr(snapshotting, "ROOM_WAIT", 0.01)  # type: ignore[attr-defined]
    waits: list[int] = []
    real = snapshotting._wait_for_room
    monkeypatch.setattr(snapshotting, "_wait_for_room",  # type: ignore[attr-defined]
                        lambda failed, room: (waits.append(1), real(failed, room))[1])
    pg.execute("CREATE TABLE roomy (id bigint PRIMARY KEY, v text);"
               "INSERT INTO roomy SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 60000) g")
    helpers.sync_once(pg, duck_path, "roomy")
    assert helpers.assert_same(pg, duck_path, "public.roomy") == 60_000
    assert len(waits) > 5
    assert _speedups.pool_stats()[5] == 0  # every column buffer was let go


def test_room_never_starves_duckdb_of_a_row_group_per_thread() -> None:
    """DuckDB holds each thread's unfinished row group: the in-flight budget grows with the row width."""
    from datasync.engine import snapshotting

    assert snapshotting.room_bytes(2, 100.0) == snapshotting.IN_FLIGHT_BYTES  # narrow rows: the fixed budget
    wide = snapshotting.room_bytes(2, 10_000.0)  # 10 kB rows
    assert wide == 3 * snapshotting.ROW_GROUP_ROWS * 10_000.0 > snapshotting.IN_FLIGHT_BYTES
    assert snapshotting.room_bytes(4, 10_000.0) > wide


def test_text_chunks_load_beside_the_binary_stream(pg: helpers.Source, duck_path: str, monkeypatch: object) -> None:
    """A chunk that needs the text path among binary ones goes through its own connection; the copy is still whole."""
    from datasync.engine import reading, snapshotting

    monkeypatch.setattr(reading, "PAGES_PER_CHUNK", 8)  # type: ignore[attr-defined]
    pg.execute("CREATE TABLE mixedinf (id bigint PRIMARY KEY, ts timestamptz, iv interval, v text);"
               "INSERT INTO mixedinf SELECT g, timestamptz '2024-01-01' + g * interval '1 min', g * interval '1 s', "
               "md5(g::text) FROM generate_series(1, 20000) g;"
               "UPDATE mixedinf SET iv = interval '3000000 hours' WHERE id IN (5000, 15000)")
    real, texts = snapshotting.read_csv, []
    monkeypatch.setattr(snapshotting, "read_csv",  # type: ignore[attr-defined]
                        lambda data, ncols: (texts.append(1), real(data, ncols))[1])
    helpers.sync_once(pg, duck_path, "mixedinf")
    assert helpers.assert_same(pg, duck_path, "public.mixedinf") == 20_000
    assert 1 <= len(texts) <= 2  # the chunk(s) holding the updated rows, and only those


def test_sync_never_imports_pyarrow_dataset(pg: helpers.Source, tmp_path: object) -> None:
    """The snapshot stream and the CDC stage reach DuckDB as bare Arrow C streams: DuckDB then
    scans them without importing pyarrow.dataset (with numpy and pyarrow.compute: ~0.1 s of CPU)."""
    import subprocess
    import sys

    pg.execute("CREATE TABLE lean (id bigint PRIMARY KEY, v text);"
               "INSERT INTO lean SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
    target = f"{tmp_path}/lean.duckdb"
    helpers.sync_once(pg, target, "lean")
    pg.execute("UPDATE lean SET v = 'x' WHERE id % 10 = 0; DELETE FROM lean WHERE id % 7 = 0")
    script = (
        "import sys\n"
        "from datasync.engine import syncing\n"
        f"syncing.run(syncing.Options(source={pg.dsn!r}, target={target!r}, tables=['lean', 'lean_new']))\n"
        "print('pyarrow.dataset' in sys.modules)\n"
    )
    pg.execute("CREATE TABLE lean_new (id bigint PRIMARY KEY, v text);"
               "INSERT INTO lean_new SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
    assert helpers.assert_same(pg, target, "public.lean") == 5000 - 714
    assert helpers.assert_same(pg, target, "public.lean_new") == 5000


def test_a_new_targets_readers_start_before_duckdb_is_imported(pg: helpers.Source, tmp_path: object) -> None:
    """On a new target the first snapshot's COPY runs while DuckDB and pyarrow are imported
    (~0.2 s of start-up), not after: the CLI itself imports neither."""
    import subprocess
    import sys

    pg.execute("CREATE TABLE early (id bigint PRIMARY KEY, v text);"
               "INSERT INTO early SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    target = f"{tmp_path}/early.duckdb"
    script = (
        "import sys\n"
        "import datasync.cli\n"
        "print('cli imports:', sorted(m for m in ('duckdb', 'pyarrow') if m in sys.modules))\n"
        "from datasync.engine import reading\n"
        "start = reading.Readers.start\n"
        "def starting(self):\n"
        "    print('readers start:', sorted(m for m in ('duckdb', 'pyarrow') if m in sys.modules), flush=True)\n"
        "    return start(self)\n"
        "reading.Readers.start = starting\n"
        f"sys.argv = ['datasync', 'sync', '--source', {pg.dsn!r}, '--target', {target!r}, '--table', 'early', "
        "'--once', '--quiet']\n"
        "datasync.cli.main()\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[:2] == ["cli imports: []", "readers start: []"], run.stdout
    assert helpers.assert_same(pg, target, "public.early") == 20_000


def test_a_load_failing_before_it_streams_stops_the_readers(pg: helpers.Source, duck_path: str,
                                                            monkeypatch: object) -> None:
    """The readers run ahead of the load: when the load fails before it takes a chunk, they are
    stopped (no thread left holding a snapshot transaction, the collector back on)."""
    import gc
    import threading

    import pytest

    from datasync.engine import reading, snapshotting

    pg.execute("CREATE TABLE ahead (id bigint PRIMARY KEY, v text);"
               "INSERT INTO ahead SELECT g, md5(g::text) FROM generate_series(1, 50000) g")
    monkeypatch.setattr(reading, "PAGES_PER_CHUNK", 8)  # type: ignore[attr-defined]  # more chunks than the queue holds

    def broken(*args: object) -> object:
        raise RuntimeError("the load could not start")

    before = set(threading.enumerate())
    monkeypatch.setattr(snapshotting, "binary_plan", broken)  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="could not start"):
        helpers.sync_once(pg, duck_path, "ahead")
    assert [t for t in threading.enumerate() if t not in before and t.is_alive()] == []
    assert gc.isenabled()
    assert pg.query("SELECT count(*) FROM pg_stat_activity WHERE backend_xmin IS NOT NULL "
                    "AND backend_type = 'client backend' AND pid <> pg_backend_pid()") == [(0,)]


def test_a_double_quote_in_schema_and_table_names(pg: helpers.Source, duck_path: str) -> None:
    """Names holding a double quote: several DuckDB threads leave partial row groups, whose gathering
    must not fail on the name (it did, and every rerun failed the same way)."""
    pg.execute(
        """CREATE SCHEMA "we""ird"; CREATE TABLE "we""ird"."t""q" (id int PRIMARY KEY, v text);
           INSERT INTO "we""ird"."t""q" SELECT g, md5(g::text) FROM generate_series(1, 300000) g;"""
    )
    helpers.sync_once(pg, duck_path, '"we""ird"."t""q"', snapshot_workers=4)
    pg.execute("""UPDATE "we""ird"."t""q" SET v = 'u' WHERE id <= 10""")
    helpers.sync_once(pg, duck_path, '"we""ird"."t""q"', snapshot_workers=4)
    assert helpers.assert_same(pg, duck_path, '"we""ird"."t""q"') == 300000


def test_a_table_rewritten_during_its_snapshot_fails_and_the_rerun_is_exact(
    pg: helpers.Source, duck_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VACUUM FULL between the planning of page ranges and a reader's first read gives that
    reader another file: the snapshot stops with a clear error (it copied rows of the wrong pages
    before), and the next run copies the table anew."""
    from datasync import errors
    from datasync.engine import reading
    from datasync.sources import connecting

    monkeypatch.setattr(reading, "PAGES_PER_CHUNK", 50)
    pg.execute("CREATE TABLE rw (id int PRIMARY KEY, p text);"
               "INSERT INTO rw SELECT g, repeat('x', 100) FROM generate_series(1, 100000) g;"
               "DELETE FROM rw WHERE id % 2 = 0")  # VACUUM FULL then moves rows to earlier pages
    real_connect, connects = connecting.connect_libpq2, []

    def slow_second_reader(dsn: str, **kw: Any) -> Any:
        connects.append(1)
        if len(connects) == 2:
            time.sleep(1.0)  # while the first reader reads, a rewrite queues up
        return real_connect(dsn, **kw)

    real_read, rewrites = reading.read_binary, []

    def read(*args: Any) -> Any:
        out = real_read(*args)
        if not rewrites:
            rewrites.append(threading.Thread(target=lambda: pg.execute("VACUUM FULL rw")))
            rewrites[0].start()
        time.sleep(0.02)
        return out

    monkeypatch.setattr(connecting, "connect_libpq2", slow_second_reader)
    monkeypatch.setattr(reading, "read_binary", read)
    with pytest.raises(errors.SourceError, match="rewritten while its snapshot was being read"):
        helpers.sync_once(pg, duck_path, "rw")
    rewrites[0].join()
    monkeypatch.undo()
    helpers.sync_once(pg, duck_path, "rw")
    assert helpers.assert_same(pg, duck_path, "rw") == 50000


def test_a_leading_byte_order_mark_is_kept_on_the_text_paths(pg: helpers.Source, duck_path: str) -> None:
    """U+FEFF opening the first value of a CSV chunk is data: kept by the text snapshot path (an
    interval beyond Arrow's range sends the chunk there) and by the back-fill of an added column."""
    pg.execute("CREATE TABLE bom (t text PRIMARY KEY, iv interval);"
               "INSERT INTO bom VALUES (E'\\uFEFFa', '3000000 hours'), ('b', '1 hour')")
    helpers.sync_once(pg, duck_path, "bom")
    pg.execute("ALTER TABLE bom ADD COLUMN d int DEFAULT 5; UPDATE bom SET iv = '2 hours' WHERE t = 'b'")
    helpers.sync_once(pg, duck_path, "bom")
    assert helpers.assert_same(pg, duck_path, "bom") == 2
    con = duckdb.connect(duck_path, read_only=True)
    assert con.execute("SELECT length(t), d FROM public.bom ORDER BY t DESC").fetchall() == [(2, 5), (1, 5)]
    con.close()
