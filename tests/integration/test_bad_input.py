"""Every source problem: clear message on stderr, non-zero exit, nothing left behind."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from datasync import errors
from datasync.sources.embedded import EmbeddedPostgres, free_port
from tests import helpers


def _sync(dsn: str, target: str, *tables: str) -> tuple[int, str]:
    args = ["sync", "--source", dsn, "--target", target, "--once", "--quiet"]
    for t in tables:
        args += ["--table", t]
    res = helpers.cli(*args)
    return res.returncode, res.stderr


def _nothing_left(src: helpers.Source) -> None:
    assert src.slots() == []
    assert src.publications() == []


@pytest.fixture(scope="module")
def replica_server() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(settings={"wal_level": "replica"}) as server:
        yield server


@pytest.fixture(scope="module")
def tight_server() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(settings={"max_replication_slots": "2"}) as server:
        yield server


def test_unreachable_source(duck_path: str) -> None:
    code, err = _sync(f"postgresql://postgres:secret@127.0.0.1:{free_port()}/postgres", duck_path, "t")
    assert code == 2
    assert "cannot reach the source PostgreSQL" in err and "hint:" in err
    assert "secret" not in err


def test_invalid_dsn(duck_path: str) -> None:
    code, err = _sync("host=127.0.0.1 port=notaport password=secret", duck_path, "t")
    assert code == 2
    assert "invalid source DSN" in err or "cannot" in err
    assert "secret" not in err


def test_authentication_failure(pg: helpers.Source, duck_path: str) -> None:
    dsn = pg.server.dsn(pg.dbname, user="postgres", password="wrong-password")
    code, err = _sync(dsn, duck_path, "t")
    assert code == 2
    assert "authentication failed" in err and "password" in err
    assert "wrong-password" not in err


def test_wal_level_not_logical(replica_server: EmbeddedPostgres, duck_path: str) -> None:
    src = helpers.Source(replica_server, "postgres")
    src.execute("CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY)")
    code, err = _sync(src.dsn, duck_path, "t")
    assert code == 2
    assert "wal_level = replica" in err and "ALTER SYSTEM SET wal_level = logical" in err and "restart" in err
    _nothing_left(src)


def test_missing_table(pg: helpers.Source, duck_path: str) -> None:
    code, err = _sync(pg.dsn, duck_path, "public.nope")
    assert code == 2
    assert "source table public.nope does not exist" in err
    _nothing_left(pg)


def test_table_without_primary_key(pg: helpers.Source, duck_path: str) -> None:
    pg.execute("CREATE TABLE ok (id int PRIMARY KEY); CREATE TABLE nokey (a int, b text)")
    code, err = _sync(pg.dsn, duck_path, "ok", "nokey")
    assert code == 2
    assert "no primary key" in err and "REPLICA IDENTITY FULL" in err
    _nothing_left(pg)


def test_missing_replication_privilege(pg: helpers.Source, duck_path: str) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pg.execute("DROP ROLE IF EXISTS plain; CREATE ROLE plain LOGIN PASSWORD 'pw-plain'; GRANT SELECT ON t TO plain")
    code, err = _sync(pg.server.dsn(pg.dbname, user="plain", password="pw-plain"), duck_path, "t")
    assert code == 2
    assert "lacks the REPLICATION privilege" in err and "ALTER ROLE" in err
    _nothing_left(pg)


def test_too_few_free_slots(tight_server: EmbeddedPostgres, duck_path: str) -> None:
    src = helpers.Source(tight_server, "postgres")
    src.execute("CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY)")
    src.execute("SELECT pg_create_logical_replication_slot('occupied', 'pgoutput')")
    try:
        code, err = _sync(src.dsn, duck_path, "t")
        assert code == 2
        assert "1 free replication slot(s), this sync needs 2" in err and "max_replication_slots" in err
        assert src.slots() == ["occupied"] and src.publications() == []
    finally:
        src.execute("SELECT pg_drop_replication_slot('occupied')")


def test_no_target_file_created_on_source_error(pg: helpers.Source, duck_path: str) -> None:
    import os

    code, _ = _sync(pg.dsn, duck_path, "missing_table")
    assert code == 2
    assert not os.path.exists(duck_path)


def test_a_new_target_in_a_missing_directory_fails_before_any_slot(pg: helpers.Source, tmp_path: object) -> None:
    """A new target is opened only once the snapshot's readers run: its directory is checked up front."""
    pg.execute("CREATE TABLE IF NOT EXISTS homeless (id int PRIMARY KEY)")
    code, err = _sync(pg.dsn, f"{tmp_path}/no/such/dir/copy.duckdb", "homeless")
    assert code == 3, err  # a target error
    said = " ".join(err.split())  # the console wraps long lines
    assert "no/such/dir is not a writable directory" in said and "hint:" in said, err
    _nothing_left(pg)


def test_a_new_target_duckdb_cannot_create_leaves_nothing(pg: helpers.Source, tmp_path: object) -> None:
    """A new target DuckDB fails to create (here: a file name too long) is found out after the slot
    is made (the snapshot's readers run first): the slot and publication made by this run are dropped."""
    pg.execute("CREATE TABLE IF NOT EXISTS homeless (id int PRIMARY KEY)")
    code, err = _sync(pg.dsn, f"{tmp_path}/{'x' * 300}.duckdb", "homeless")
    assert code == 3, err
    assert "cannot open DuckDB target" in " ".join(err.split()), err
    _nothing_left(pg)


def test_values_beyond_duckdb_range_stop_with_a_clear_error(pg: helpers.Source, duck_path: str) -> None:
    """PostgreSQL timestamps reach 294276 AD, DuckDB's 294247 AD: never wrap silently, say so."""
    import duckdb

    pg.execute("CREATE TABLE far (id int PRIMARY KEY, ts timestamptz);"
               "INSERT INTO far VALUES (1, '2024-01-01+00'), (2, '294270-01-01 00:00:00+00')")
    code, err = _sync(pg.dsn, duck_path, "far")
    assert code != 0 and "public.far: a value does not fit its DuckDB type" in err and "294247-01-10" in err, err
    assert "Traceback" not in err
    with duckdb.connect(duck_path, read_only=True) as con:  # the partial snapshot was never swapped in
        assert con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'far'").fetchone() == (0,)

    # through CDC: the copy stays as it was, the stream stops before the transaction
    pg.execute("CREATE TABLE near (id int PRIMARY KEY, ts timestamptz); INSERT INTO near VALUES (1, '2024-01-01+00')")
    target = duck_path.replace(".duckdb", "-near.duckdb")
    assert _sync(pg.dsn, target, "near")[0] == 0
    pg.execute("INSERT INTO near VALUES (2, '294270-01-01 00:00:00+00')")
    code, err = _sync(pg.dsn, target, "near")
    assert code != 0 and "public.near: a changed value does not fit its DuckDB type" in err and "Traceback" not in err
    with duckdb.connect(target, read_only=True) as con:
        assert con.execute("SELECT id, ts FROM public.near").fetchall()[0][0] == 1
        assert con.execute("SELECT count(*) FROM public.near").fetchone() == (1,)


def test_a_slot_another_sync_streams_is_refused_before_anything_changes(
    pg: helpers.Source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datasync.sources import checking, receiving

    pg.execute("CREATE TABLE h1 (id int PRIMARY KEY); CREATE TABLE h2 (id int PRIMARY KEY); INSERT INTO h2 VALUES (1)")
    first, second = str(tmp_path / "first.duckdb"), str(tmp_path / "second.duckdb")
    res = helpers.sync_once(pg, first, "h1")
    monkeypatch.setattr(checking, "ACTIVE_SLOT_WAIT_SECONDS", 0.3)
    holder = receiving.Stream(pg.dsn, res.slot, res.publication)  # the other sync, streaming
    try:
        with pytest.raises(errors.SourceError, match="in use by another process"):
            helpers.sync_once(pg, second, "h2", slot=res.slot, publication=res.publication)
    finally:
        holder.close()
    assert pg.query("SELECT tablename FROM pg_publication_tables WHERE pubname = %s", (res.publication,)) == [("h1",)]
    assert not os.path.exists(second)


def test_every_snapshot_slot_has_a_name_of_its_own(
    pg: helpers.Source, duck_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datasync.sources import replication

    names: list[str] = []
    real = replication.exported_snapshot

    def recording(dsn: str, name: str) -> object:
        names.append(name)
        return real(dsn, name)

    monkeypatch.setattr(replication, "exported_snapshot", recording)
    pg.execute("CREATE TABLE s1 (id int PRIMARY KEY); CREATE TABLE s2 (id int PRIMARY KEY); CREATE TABLE s3 (id int PRIMARY KEY)")
    helpers.sync_once(pg, duck_path, "s1", "s2", "s3", slot="s" * 63)
    assert len(names) == 3 and len(set(names)) == 3
    assert all(len(n) <= 63 for n in names)


@pytest.mark.parametrize("ddl, value", [
    ("iv interval", "'infinity'"),
    ("iv interval", "'1000000000:00:00'"),
    ("j json", """'"\\ud800"'"""),
])
def test_other_values_duckdb_cannot_hold_stop_with_a_clear_error(
    pg: helpers.Source, duck_path: str, ddl: str, value: str
) -> None:
    pg.execute(f"CREATE TABLE odd (id int PRIMARY KEY, {ddl}); INSERT INTO odd VALUES (1, {value})")
    code, err = _sync(pg.dsn, duck_path, "odd")
    assert code != 0 and "public.odd: a value does not fit its DuckDB type" in err, err
    assert "DuckDB cannot hold some values PostgreSQL accepts" in err and "Traceback" not in err, err


def test_a_source_schema_named_like_datasyncs_own_is_refused(pg: helpers.Source, duck_path: str) -> None:
    from datasync import identifiers
    from datasync.targets import duckfile

    assert identifiers.META_SCHEMA == duckfile.META  # the name the checks refuse is the target's own
    pg.execute('CREATE SCHEMA "_DataSync"; CREATE TABLE "_DataSync".tables (id int PRIMARY KEY)')
    code, err = _sync(pg.dsn, duck_path, '"_DataSync".tables')
    err = " ".join(err.split())  # (the CLI wraps its lines)
    assert code == 2 and "where DataSync keeps its own state" in err and "rename the source schema" in err, err
    _nothing_left(pg)


def test_an_invalidated_slot_says_what_to_do_and_doing_it_recovers(tmp_path: Path) -> None:
    """max_slot_wal_keep_size let PostgreSQL remove WAL the slot still needed: the run stops with
    the slot named and the fix; after dropping the slot as told, the next run copies the table
    anew and the copy is exact (the changes in the removed WAL included)."""
    with EmbeddedPostgres(settings={"max_slot_wal_keep_size": "1MB"}) as server:
        src = helpers.Source(server, "postgres")
        target = str(tmp_path / "kept.duckdb")
        src.execute("CREATE TABLE kept (id int PRIMARY KEY, v text);"
                    "INSERT INTO kept SELECT g, 'v' FROM generate_series(1, 100) g")
        slot = helpers.sync_once(src, target, "kept").slot
        for i in range(4):  # WAL past the slot's limit, in segments of their own; the checkpoint removes it
            src.execute("UPDATE kept SET v = %s WHERE id = 1", (f"w{i}",))
            src.execute("SELECT pg_switch_wal()")
        src.execute("DELETE FROM kept WHERE id > 90; CHECKPOINT")
        assert src.query("SELECT wal_status FROM pg_replication_slots") == [("lost",)]
        code, err = _sync(src.dsn, target, "kept")
        said = " ".join(err.split())
        assert code == 2, err
        assert f"replication slot {slot} was invalidated" in said, err
        assert f"SELECT pg_drop_replication_slot('{slot}')" in said and "copies its tables anew" in said, err
        src.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        code, err = _sync(src.dsn, target, "kept")
        assert code == 0, err
        assert helpers.assert_same(src, target, "kept") == 90
