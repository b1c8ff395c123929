"""CDC: every kind of change arrives exactly once, value by value."""

from __future__ import annotations

from typing import Any

import duckdb
import psycopg
import pytest

from datasync import identifiers
from datasync.engine import pgoutput
from datasync.sources import receiving
from tests import helpers


def _setup(pg: helpers.Source, duck: str) -> None:
    pg.execute(
        """CREATE TABLE items (id bigint PRIMARY KEY, name text, qty int, price numeric(10,2), tags text[],
                               meta jsonb, at timestamptz DEFAULT now());
           CREATE TABLE orders (id int PRIMARY KEY, item_id bigint, note text);
           INSERT INTO items SELECT g, 'item ' || g, g % 7, g * 0.25, ARRAY['a', NULL], '{"x": 1}'
             FROM generate_series(1, 2000) g;
           INSERT INTO orders SELECT g, g, 'n' FROM generate_series(1, 100) g;"""
    )
    helpers.sync_once(pg, duck, "items", "orders")


def test_inserts_updates_deletes_and_key_changes(pg: helpers.Source, duck_path: str) -> None:
    _setup(pg, duck_path)
    pg.execute(
        """INSERT INTO items SELECT g, 'new ' || g, 1, 9.99, NULL, NULL FROM generate_series(2001, 2500) g;
           UPDATE items SET qty = qty + 100, meta = '{"y": [1,2]}' WHERE id % 3 = 0;
           DELETE FROM items WHERE id % 11 = 0;
           UPDATE items SET id = id + 100000 WHERE id BETWEEN 10 AND 20;  -- primary-key changes
           UPDATE items SET id = -1 WHERE id = 1; UPDATE items SET id = 1 WHERE id = 2; UPDATE items SET id = 2 WHERE id = -1;
           INSERT INTO items VALUES (7777, 'x', 1, 1, NULL, NULL); DELETE FROM items WHERE id = 7777;
           INSERT INTO items VALUES (7777, 'again', 2, 2, '{}', '[]');"""
    )
    res = helpers.sync_once(pg, duck_path, "items", "orders")
    assert res.stats.changes > 1000
    assert helpers.assert_same(pg, duck_path, "items") > 2000
    assert helpers.assert_same(pg, duck_path, "orders") == 100


def test_transactions_spanning_tables_and_rollbacks(pg: helpers.Source, duck_path: str) -> None:
    _setup(pg, duck_path)
    with psycopg.connect(pg.dsn) as conn:
        conn.execute("INSERT INTO orders VALUES (1001, 5, 'multi')")
        conn.execute("UPDATE items SET name = 'ordered' WHERE id = 5")
        conn.commit()
        conn.execute("INSERT INTO orders VALUES (1002, 6, 'rolled back')")
        conn.execute("DELETE FROM items")
        conn.rollback()
        conn.execute("INSERT INTO orders VALUES (1003, 7, 'sp')")
        conn.execute("SAVEPOINT s")
        conn.execute("DELETE FROM orders WHERE id < 50")
        conn.execute("ROLLBACK TO SAVEPOINT s")
        conn.commit()
    helpers.sync_once(pg, duck_path, "items", "orders")
    assert helpers.assert_same(pg, duck_path, "items") == 2000
    assert helpers.assert_same(pg, duck_path, "orders") == 102


def test_truncate(pg: helpers.Source, duck_path: str) -> None:
    _setup(pg, duck_path)
    pg.execute("INSERT INTO orders VALUES (500, 1, 'before'); TRUNCATE orders; INSERT INTO orders VALUES (501, 1, 'after')")
    pg.execute("UPDATE items SET qty = 0 WHERE id = 1")
    helpers.sync_once(pg, duck_path, "items", "orders")
    assert helpers.assert_same(pg, duck_path, "orders") == 1
    assert helpers.assert_same(pg, duck_path, "items") == 2000


def test_large_transaction(pg: helpers.Source, duck_path: str) -> None:
    pg.execute("CREATE TABLE big (id int PRIMARY KEY, v text, n int)")
    helpers.sync_once(pg, duck_path, "big")
    pg.execute("INSERT INTO big SELECT g, md5(g::text), g FROM generate_series(1, 500000) g")
    pg.execute("BEGIN; UPDATE big SET n = -n WHERE id % 2 = 0; DELETE FROM big WHERE id % 5 = 0; COMMIT")
    res = helpers.sync_once(pg, duck_path, "big", batch_changes=100_000)
    assert res.stats.changes >= 500_000 + 200_000
    assert helpers.assert_same(pg, duck_path, "big") == 400_000


def test_unchanged_toast_keeps_target_value(pg: helpers.Source, duck_path: str) -> None:
    pg.execute(
        """CREATE TABLE docs (id int PRIMARY KEY, title text, body text, extra jsonb);
           ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
           ALTER TABLE docs ALTER COLUMN extra SET STORAGE EXTERNAL;
           INSERT INTO docs SELECT g, 't' || g, repeat(md5(g::text), 400),
                  jsonb_build_object('blob', repeat('z', 5000), 'g', g) FROM generate_series(1, 50) g;"""
    )
    assert pg.query("SELECT relreplident FROM pg_class WHERE relname = 'docs'") == [("d",)]
    helpers.sync_once(pg, duck_path, "docs")
    # updates that leave the TOASTed columns untouched: pgoutput sends the unchanged marker
    pg.execute("UPDATE docs SET title = 'changed ' || id WHERE id <= 30")
    helpers.sync_once(pg, duck_path, "docs")
    assert helpers.assert_same(pg, duck_path, "docs") == 50
    # in one batch: insert then untouched-TOAST update of the same row; key change with unchanged TOAST
    pg.execute(
        """INSERT INTO docs VALUES (100, 'n', repeat('q', 9000), '{"a": 1}');
           UPDATE docs SET title = 'n2' WHERE id = 100;
           UPDATE docs SET id = 1000 + id WHERE id IN (31, 32);
           UPDATE docs SET title = 'after key change' WHERE id = 1031;"""
    )
    helpers.sync_once(pg, duck_path, "docs")
    assert helpers.assert_same(pg, duck_path, "docs") == 51
    con = duckdb.connect(duck_path, read_only=True)
    assert con.execute("SELECT count(*) FROM public.docs WHERE body IS NULL OR extra IS NULL").fetchone() == (0,)
    con.close()


def test_replica_identity_full_without_primary_key(pg: helpers.Source, duck_path: str) -> None:
    pg.execute(
        """CREATE TABLE logs (a int, b text); ALTER TABLE logs REPLICA IDENTITY FULL;
           INSERT INTO logs SELECT g, 'x' || g FROM generate_series(1, 100) g;"""
    )
    helpers.sync_once(pg, duck_path, "logs")
    pg.execute("UPDATE logs SET b = 'upd' WHERE a < 10; DELETE FROM logs WHERE a > 90; INSERT INTO logs VALUES (NULL, NULL)")
    helpers.sync_once(pg, duck_path, "logs")
    assert helpers.assert_same(pg, duck_path, "logs") == 91
    # rows whose identity holds NULLs are still found: the key match is NULL-safe for FULL
    pg.execute("UPDATE logs SET b = 'was null' WHERE a IS NULL; INSERT INTO logs VALUES (NULL, 'gone');"
               "DELETE FROM logs WHERE b = 'gone'; UPDATE logs SET a = NULL WHERE a = 5")
    helpers.sync_once(pg, duck_path, "logs")
    assert helpers.assert_same(pg, duck_path, "logs") == 91


def test_all_types_through_cdc(pg: helpers.Source, duck_path: str) -> None:
    from tests.integration.test_snapshot import ROWS, TYPES_DDL

    pg.execute(TYPES_DDL)
    helpers.sync_once(pg, duck_path, "alltypes")
    pg.execute(ROWS)
    pg.execute("UPDATE alltypes SET t = 'changed', iv = iv * 2 WHERE id = 1; DELETE FROM alltypes WHERE id = 4")
    res = helpers.sync_once(pg, duck_path, "alltypes")
    assert res.stats.changes == 6
    assert helpers.assert_same(pg, duck_path, "alltypes") == 3


def test_partitioned_composite_key_and_quoted_names(pg: helpers.Source, duck_path: str) -> None:
    pg.execute(
        """CREATE SCHEMA "Sales Dept";
           CREATE TABLE "Sales Dept"."Order Items" ("Order Id" int, "Line" int, "Qty" int, PRIMARY KEY ("Order Id", "Line"));
           CREATE TABLE ev (id bigint, day date, v text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
           CREATE TABLE ev_a PARTITION OF ev FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
           CREATE TABLE ev_b PARTITION OF ev FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
           INSERT INTO ev SELECT g, DATE '2024-12-01' + g % 60, 'x' FROM generate_series(1, 1000) g;
           INSERT INTO "Sales Dept"."Order Items" SELECT g / 3, g % 3, g FROM generate_series(0, 299) g;"""
    )
    helpers.sync_once(pg, duck_path, "ev", '"Sales Dept"."Order Items"')
    pg.execute(
        """UPDATE ev SET v = 'moved', day = DATE '2025-06-01' WHERE id <= 10;  -- crosses partitions
           DELETE FROM ev WHERE id BETWEEN 11 AND 20; INSERT INTO ev VALUES (5000, '2025-02-02', 'new');
           UPDATE "Sales Dept"."Order Items" SET "Qty" = -1 WHERE "Line" = 1;
           UPDATE "Sales Dept"."Order Items" SET "Line" = 9 WHERE "Order Id" = 5 AND "Line" = 2;
           DELETE FROM "Sales Dept"."Order Items" WHERE "Order Id" = 7;"""
    )
    helpers.sync_once(pg, duck_path, "ev", '"Sales Dept"."Order Items"')
    assert helpers.assert_same(pg, duck_path, "ev") == 991
    assert helpers.assert_same(pg, duck_path, '"Sales Dept"."Order Items"') == 297


def test_slot_and_publication_names(pg: helpers.Source, tmp_path: object) -> None:
    import pathlib

    base = pathlib.Path(str(tmp_path))
    pg.execute("CREATE TABLE n (id int PRIMARY KEY)")
    res = helpers.sync_once(pg, str(base / "My Copy.duckdb"), "n")
    assert res.slot.startswith("datasync_my_copy_") and res.publication == res.slot
    custom = helpers.sync_once(pg, str(base / "other.duckdb"), "n", slot="custom_slot", publication="custom_pub")
    assert (custom.slot, custom.publication) == ("custom_slot", "custom_pub")
    assert set(pg.slots()) == {res.slot, "custom_slot"}
    assert set(pg.publications()) == {res.slot, "custom_pub"}


def test_cli_summary_and_quiet(pg: helpers.Source, duck_path: str) -> None:
    """The CLI's closing line says how far the copy is in sync; --quiet prints nothing at all."""
    pg.execute("CREATE TABLE said (id int PRIMARY KEY, v text); INSERT INTO said SELECT g, 'x' FROM generate_series(1, 50) g")
    args = ("sync", "--source", pg.dsn, "--target", duck_path, "--table", "said", "--once")
    first = helpers.cli(*args)
    assert first.returncode == 0, first.stderr
    said = " ".join(first.stderr.split())
    assert "public.said 50 rows; 0 changes in 0 transactions applied, in sync up to " in said
    position = pgoutput.parse_lsn(said.split("in sync up to ")[1].split()[0])
    (current,) = pg.query("SELECT pg_current_wal_lsn()::text")[0]
    assert 0 < position <= pgoutput.parse_lsn(current)  # the slot's position, not 0/0, before any change applied
    pg.execute("UPDATE said SET v = 'y' WHERE id <= 10")
    quiet = helpers.cli(*args, "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == "", quiet.stderr
    assert helpers.assert_same(pg, duck_path, "public.said") == 50


def test_a_following_stream_checkpoints_in_its_pauses(pg: helpers.Source, duck_path: str, monkeypatch: object) -> None:
    """DuckDB's checkpoint inside a commit is pushed far out (it stalled the stream for ~1 s):
    the stream checkpoints when idle instead, so the target's WAL still gets written back."""
    import threading
    import time

    from datasync.engine import streaming, syncing
    from datasync.targets import duckfile

    monkeypatch.setattr(streaming, "IDLE_CHECKPOINT_BYTES", 1)  # type: ignore[attr-defined]
    pg.execute("CREATE TABLE pauses (id int PRIMARY KEY, v text);"
               "INSERT INTO pauses SELECT g, 'x' FROM generate_series(1, 1000) g")
    helpers.sync_once(pg, duck_path, "pauses")
    pg.execute("UPDATE pauses SET v = 'y' WHERE id % 2 = 0")
    seen: list[int] = []
    real = duckfile.DuckTarget.flush_wal
    monkeypatch.setattr(duckfile.DuckTarget, "flush_wal",  # type: ignore[attr-defined]
                        lambda self: (seen.append(self.wal_bytes()), real(self))[1])
    stop = threading.Event()
    opts = syncing.Options(source=pg.dsn, target=duck_path, tables=["pauses"], follow=True, poll_seconds=0.05)
    syncer = threading.Thread(target=syncing.run, args=(opts, None, stop))
    syncer.start()
    deadline = time.monotonic() + 30
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    syncer.join()
    assert seen and seen[0] > 0, seen  # checkpointed while idle, with WAL to write back
    assert helpers.assert_same(pg, duck_path, "public.pauses") == 1000
    con = duckdb.connect(duck_path, read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM public.pauses WHERE v = 'y'").fetchone() == (500,)
    finally:
        con.close()


def test_the_checkpoint_threshold_keeps_updates_within_the_memory_limit(tmp_path: object) -> None:
    """DuckDB holds updated values in memory until it checkpoints: the WAL threshold follows the
    memory limit, so a long run of updates checkpoints instead of running out of memory."""
    import time

    from datasync.targets import duckfile

    def threshold(limit: str | None) -> str:
        target = duckfile.DuckTarget(f"{tmp_path}/t{time.monotonic_ns()}.duckdb", memory_limit=limit)
        try:
            return str(target.con.execute("SELECT current_setting('checkpoint_threshold')").fetchone()[0])  # type: ignore[index]
        finally:
            target.close()

    assert threshold("256MB") == "61.0 MiB"  # a quarter of 244.1 MiB
    assert threshold("32MB") == "16.0 MiB"  # never below DuckDB's default
    assert threshold(None) == "256.0 MiB"  # DuckDB's default limit is most of the RAM: capped
    target = duckfile.DuckTarget(f"{tmp_path}/updates.duckdb", memory_limit="128MB")
    try:
        con = target.con
        con.execute("CREATE TABLE t AS SELECT g AS id, repeat('x', 200) AS j, md5(g::varchar) AS m "
                    "FROM range(300000) r(g)")
        con.execute("CHECKPOINT")
        for k in range(12):  # ~18 MB of WAL each: past the memory limit without checkpoints
            con.execute(f"UPDATE t SET j = repeat('{'yz'[k % 2]}', 200), m = md5((id + {k})::varchar) "
                        f"WHERE hash(id + {k}) % 4 = 0")
        assert con.execute("SELECT count(*) FROM t WHERE m = md5((id + 11)::varchar)").fetchone()[0] > 50_000  # type: ignore[index]
    finally:
        target.close()


def test_replica_identity_index_beside_a_primary_key(pg: helpers.Source, duck_path: str) -> None:
    """Deletes and key changes identify rows by the replica identity index, not the primary key:
    PostgreSQL's old-key tuple then holds only the index columns."""
    pg.execute(
        """CREATE TABLE ri (id int PRIMARY KEY, u int NOT NULL, v text);
           CREATE UNIQUE INDEX ri_u ON ri (u); ALTER TABLE ri REPLICA IDENTITY USING INDEX ri_u;
           INSERT INTO ri SELECT g, g + 1000, 'v' FROM generate_series(1, 100) g;"""
    )
    helpers.sync_once(pg, duck_path, "ri")
    pg.execute("DELETE FROM ri WHERE id <= 10; UPDATE ri SET u = u + 5000 WHERE id BETWEEN 11 AND 20;"
               "UPDATE ri SET id = id + 1000 WHERE id BETWEEN 21 AND 25")
    helpers.sync_once(pg, duck_path, "ri")
    assert helpers.assert_same(pg, duck_path, "ri") == 90


def test_replica_identity_changed_while_streaming(pg: helpers.Source, duck_path: str) -> None:
    """The copy follows a new replica identity: rows are keyed on what PostgreSQL sends from then on."""
    pg.execute(
        """CREATE TABLE idc (id int PRIMARY KEY, u int NOT NULL, v text);
           CREATE UNIQUE INDEX idc_u ON idc (u);
           INSERT INTO idc SELECT g, g + 1000, 'v' FROM generate_series(1, 100) g;
           CREATE TABLE fk (a int, b text); ALTER TABLE fk REPLICA IDENTITY FULL;
           INSERT INTO fk SELECT g, 'b' || g FROM generate_series(1, 50) g; INSERT INTO fk VALUES (NULL, NULL);"""
    )
    helpers.sync_once(pg, duck_path, "idc", "fk")
    pg.execute(
        """UPDATE idc SET v = 'before' WHERE id = 1; DELETE FROM fk WHERE a = 1;
           ALTER TABLE idc REPLICA IDENTITY USING INDEX idc_u;
           DELETE FROM idc WHERE id BETWEEN 2 AND 10; UPDATE idc SET u = u + 5000 WHERE id BETWEEN 11 AND 20;
           DELETE FROM fk WHERE a IS NULL;
           ALTER TABLE fk ADD PRIMARY KEY (a); ALTER TABLE fk REPLICA IDENTITY DEFAULT;
           DELETE FROM fk WHERE a BETWEEN 2 AND 5; UPDATE fk SET a = a + 100 WHERE a BETWEEN 6 AND 8;"""
    )
    helpers.sync_once(pg, duck_path, "idc", "fk")
    assert helpers.assert_same(pg, duck_path, "idc") == 91
    assert helpers.assert_same(pg, duck_path, "fk") == 45
    # and a later run keys them the same way (the new key was saved with the copy)
    pg.execute("DELETE FROM idc WHERE id BETWEEN 30 AND 39; DELETE FROM fk WHERE a > 100")
    helpers.sync_once(pg, duck_path, "idc", "fk")
    assert helpers.assert_same(pg, duck_path, "idc") == 81
    assert helpers.assert_same(pg, duck_path, "fk") == 42


def test_a_source_database_in_another_encoding(pg: helpers.Source, duck_path: str) -> None:
    """A LATIN1 database: the snapshot's COPY and the stream's text both arrive as UTF-8."""
    name = f"{pg.dbname}_latin1"
    with psycopg.connect(pg.server.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" ENCODING \'LATIN1\' TEMPLATE template0 LC_COLLATE \'C\' LC_CTYPE \'C\'')
    src = helpers.Source(pg.server, name)
    try:
        src.execute("CREATE TABLE l (id int PRIMARY KEY, t text, c char(3)); INSERT INTO l VALUES (1, 'é à', 'ü')")
        helpers.sync_once(src, duck_path, "l")
        src.execute("INSERT INTO l VALUES (2, 'ñ ÿ', 'ß'); UPDATE l SET t = t || ' ç' WHERE id = 1")
        helpers.sync_once(src, duck_path, "l")
        assert helpers.assert_same(src, duck_path, "l") == 2
        con = duckdb.connect(duck_path, read_only=True)
        assert con.execute("SELECT t FROM public.l ORDER BY id").fetchall() == [("é à ç",), ("ñ ÿ",)]
        con.close()
    finally:
        with psycopg.connect(pg.server.dsn(), autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s",
                         (name,))
            conn.execute(f'DROP DATABASE "{name}"')


def test_options_in_the_dsn_are_kept(pg: helpers.Source) -> None:
    from datasync.sources import connecting

    conn = connecting.connect(pg.dsn + "?options=-csearch_path%3Dmine")
    try:
        cur = conn.cursor()
        cur.execute("SHOW search_path")
        assert cur.fetchone() == ("mine",)
        cur.execute("SHOW TimeZone")  # ours still apply
        assert cur.fetchone() == ("UTC",)
    finally:
        conn.close()


def test_replica_identity_full_with_unchanged_toast(pg: helpers.Source, duck_path: str) -> None:
    """Under FULL the key is every column: an update that leaves a TOASTed value out of the new row
    takes it from the old row (logged whole), with and without a primary key."""
    pg.execute(
        """CREATE TABLE ft (a int, body text, n text); ALTER TABLE ft REPLICA IDENTITY FULL;
           ALTER TABLE ft ALTER COLUMN body SET STORAGE EXTERNAL;
           INSERT INTO ft VALUES (1, repeat(md5('x'), 400), NULL), (2, repeat(md5('y'), 400), 'n');
           CREATE TABLE fp (id int PRIMARY KEY, body text, v int); ALTER TABLE fp REPLICA IDENTITY FULL;
           ALTER TABLE fp ALTER COLUMN body SET STORAGE EXTERNAL;
           INSERT INTO fp SELECT g, repeat(md5(g::text), 400), g FROM generate_series(1, 5) g;"""
    )
    helpers.sync_once(pg, duck_path, "ft", "fp")
    pg.execute("UPDATE ft SET a = a + 10; UPDATE fp SET v = -v WHERE id <= 3; UPDATE fp SET id = id + 100 WHERE id = 5")
    helpers.sync_once(pg, duck_path, "ft", "fp")
    assert helpers.assert_same(pg, duck_path, "ft") == 2
    assert helpers.assert_same(pg, duck_path, "fp") == 5


def test_an_inheritance_parent_is_published_alone(pg: helpers.Source, duck_path: str) -> None:
    """The copy of an inheritance parent holds its own rows (read ONLY), and its child tables stay
    out of the publication: a child without a replica identity keeps taking UPDATE and DELETE."""
    pg.execute(
        """CREATE TABLE parent (id int PRIMARY KEY, v text); CREATE TABLE child (extra int) INHERITS (parent);
           INSERT INTO parent VALUES (1, 'p'); INSERT INTO child VALUES (2, 'c', 1);"""
    )
    res = helpers.sync_once(pg, duck_path, "parent")
    assert pg.query("SELECT tablename FROM pg_publication_tables WHERE pubname = %s", (res.publication,)) == [("parent",)]
    pg.execute("UPDATE child SET v = 'changed'; DELETE FROM child; INSERT INTO parent VALUES (3, 'p3')")
    helpers.sync_once(pg, duck_path, "parent")
    con = duckdb.connect(duck_path, read_only=True)
    assert con.execute("SELECT id, v FROM public.parent ORDER BY id").fetchall() == [(1, "p"), (3, "p3")]
    con.close()


def test_a_once_run_opens_no_stream_when_its_slot_is_past_the_end(
    pg: helpers.Source, duck_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot made by the run itself starts past the run's end (its tables' snapshots hold
    everything before): no walsender is started only to say so.  The next run receives what
    was committed meanwhile."""
    pg.execute("CREATE TABLE quiet (id int PRIMARY KEY, v text); "
               "INSERT INTO quiet SELECT g, 'v' FROM generate_series(1, 50) g")
    opened: list[tuple[Any, ...]] = []
    real = receiving.Stream

    def counting(*args: Any) -> receiving.Stream:
        opened.append(args)
        return real(*args)

    monkeypatch.setattr(receiving, "Stream", counting)
    first = helpers.sync_once(pg, duck_path, "quiet")
    assert opened == []
    slot_lsn = pgoutput.parse_lsn(pg.query("SELECT confirmed_flush_lsn::text FROM pg_replication_slots")[0][0])
    assert first.stats.confirmed_lsn == slot_lsn
    assert first.stats.changes == 0
    assert helpers.assert_same(pg, duck_path, "quiet") == 50

    pg.execute("UPDATE quiet SET v = 'w' WHERE id <= 10; DELETE FROM quiet WHERE id > 45")
    second = helpers.sync_once(pg, duck_path, "quiet")
    assert len(opened) == 1
    assert second.stats.changes == 15
    assert helpers.assert_same(pg, duck_path, "quiet") == 45


def test_a_slot_gone_between_runs_makes_the_next_run_copy_its_tables_anew(
    pg: helpers.Source, duck_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Changes committed while the slot did not exist (a DBA dropped it, or a run used another
    --slot) are in no slot: the next run copies the streamed tables again, and says so, instead
    of streaming on from a new slot with the gap silently missing."""
    pg.execute("CREATE TABLE kept (id int PRIMARY KEY, v text); CREATE TABLE other (id int PRIMARY KEY);"
               "INSERT INTO kept SELECT g, 'v' FROM generate_series(1, 100) g; INSERT INTO other VALUES (1)")
    first = helpers.sync_once(pg, duck_path, "kept", "other")
    pg.execute("SELECT pg_drop_replication_slot(%s)", (first.slot,))
    pg.execute("UPDATE kept SET v = 'gap' WHERE id <= 10; DELETE FROM kept WHERE id > 90; INSERT INTO other VALUES (2)")
    with caplog.at_level("WARNING", logger="datasync"):
        second = helpers.sync_once(pg, duck_path, "kept", "other")
    assert set(second.snapshotted) == {identifiers.TableName("public", "kept"), identifiers.TableName("public", "other")}
    assert helpers.assert_same(pg, duck_path, "kept") == 90
    assert helpers.assert_same(pg, duck_path, "other") == 2
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"replication slot {first.slot} does not exist" in said and "copying 2 table(s) anew" in said, said
    # and streaming goes on from the new slot
    pg.execute("UPDATE kept SET v = 'after' WHERE id = 1")
    helpers.sync_once(pg, duck_path, "kept", "other")
    assert helpers.assert_same(pg, duck_path, "kept") == 90


class _Following:
    """``sync --follow`` of ``table`` in a thread (the engine's own loop), with waits on the source."""

    def __init__(self, pg: helpers.Source, duck_path: str, table: str) -> None:
        import threading

        from datasync.engine import syncing

        self.pg, self.stop = pg, threading.Event()
        self.failed: list[BaseException] = []
        opts = syncing.Options(source=pg.dsn, target=duck_path, tables=[table], follow=True, max_batch_seconds=0.1)
        self.runner = threading.Thread(target=self._follow, args=(syncing, opts))

    def _follow(self, syncing: Any, opts: Any) -> None:
        try:
            syncing.run(opts, None, self.stop)
        except BaseException as exc:
            self.failed.append(exc)

    def __enter__(self) -> _Following:
        self.runner.start()
        self.wait("streaming", self.active)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.runner.join(60)
        assert not self.failed, self.failed

    def active(self) -> bool:
        return self.pg.query("SELECT count(*) FROM pg_replication_slots WHERE active AND NOT temporary")[0][0] == 1

    def wait(self, what: str, cond: Any, timeout: float = 60) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not cond():
            assert not self.failed, self.failed
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    def drop_slot(self) -> str:
        """Terminate the walsender and drop the slot (as a DBA would); returns its name."""
        slot = self.pg.query("SELECT slot_name FROM pg_replication_slots WHERE NOT temporary")[0][0]

        def drop() -> bool:
            self.pg.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                            "WHERE slot_name = %s AND active", (slot,))
            try:
                self.pg.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            except psycopg.errors.ObjectInUse:
                return False  # the walsender is still on its way out
            return True

        self.wait("slot dropped", drop)
        return str(slot)


def test_a_following_run_whose_slot_is_dropped_copies_anew_and_streams_on(
    pg: helpers.Source, duck_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The walsender is terminated and the slot dropped while --follow streams: the changes
    committed before a new slot exists are in no slot, so the run copies the table anew, makes
    a new slot and streams on; the copy ends equal to the source."""
    import time

    pg.execute("CREATE TABLE dropped (id int PRIMARY KEY, v text);"
               "INSERT INTO dropped SELECT g, 'v' FROM generate_series(1, 200) g")
    with caplog.at_level("WARNING", logger="datasync"), _Following(pg, duck_path, "dropped") as run:
        pg.execute("UPDATE dropped SET v = 'before' WHERE id <= 10")
        slot = run.drop_slot()
        pg.execute("DELETE FROM dropped WHERE id > 150; UPDATE dropped SET v = 'gap' WHERE id <= 5")
        run.wait("streaming again, from a new slot", run.active)
        pg.execute("INSERT INTO dropped VALUES (1000, 'after')")
        time.sleep(1.0)
    assert helpers.assert_same(pg, duck_path, "dropped") == 151
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"replication slot {slot} was dropped while this run streamed it" in said, said
    assert "copying 1 table(s) anew" in said, said


def test_a_slot_made_again_under_a_following_run_is_told_apart(
    pg: helpers.Source, duck_path: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slot is dropped and made again (as the operator's controller heals a missing slot)
    before the run reconnects: a slot of the right name, past every position the run confirmed,
    that missed the changes in between. The run copies the table anew instead of streaming on."""
    import threading
    import time

    from datasync.engine import syncing

    pg.execute("CREATE TABLE remade (id int PRIMARY KEY, v text);"
               "INSERT INTO remade SELECT g, 'v' FROM generate_series(1, 200) g")
    gate, real = threading.Event(), syncing._reconnect

    def held(*args: Any) -> Any:
        gate.wait(30)  # the slot is made again before the run looks
        return real(*args)

    monkeypatch.setattr(syncing, "_reconnect", held)
    with caplog.at_level("WARNING", logger="datasync"), _Following(pg, duck_path, "remade") as run:
        pg.execute("UPDATE remade SET v = 'before' WHERE id <= 10")
        time.sleep(0.5)  # applied and confirmed
        slot = run.drop_slot()
        pg.execute("DELETE FROM remade WHERE id > 150")  # in no slot
        pg.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        pg.execute("UPDATE remade SET v = 'new slot' WHERE id <= 5")
        gate.set()
        run.wait("streaming again", run.active)
        time.sleep(1.0)
    assert helpers.assert_same(pg, duck_path, "remade") == 150
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"replication slot {slot} was dropped while this run streamed it" in said, said


def test_a_target_moved_to_another_slot_is_copied_anew_and_the_old_slot_named(
    pg: helpers.Source, duck_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Run with another --slot: the new slot lacks what the old one kept, so the tables are copied
    anew; the old slot, still retaining WAL for nobody, is named with the statement that drops it."""
    pg.execute("CREATE TABLE moved (id int PRIMARY KEY); INSERT INTO moved SELECT generate_series(1, 20)")
    first = helpers.sync_once(pg, duck_path, "moved")
    pg.execute("DELETE FROM moved WHERE id > 15")
    with caplog.at_level("WARNING", logger="datasync"):
        second = helpers.sync_once(pg, duck_path, "moved", slot="moved_elsewhere")
    assert second.snapshotted == {identifiers.TableName("public", "moved"): 15}
    assert helpers.assert_same(pg, duck_path, "moved") == 15
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "replication slot moved_elsewhere does not exist" in said, said
    assert (f"replication slot {first.slot}, which this target was streamed through before, still exists" in said
            and f"SELECT pg_drop_replication_slot('{first.slot}')" in said), said
