"""Schema changes while streaming reach the target without a resync."""

from __future__ import annotations

import duckdb

from tests import helpers


def _cols(path: str, table: str) -> dict[str, str]:
    con = duckdb.connect(path, read_only=True)
    try:
        return dict(
            con.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
                "ORDER BY ordinal_position",
                [table],
            ).fetchall()
        )
    finally:
        con.close()


def test_add_drop_rename_and_retype_columns(pg: helpers.Source, duck_path: str) -> None:
    pg.execute(
        """CREATE TABLE evo (id int PRIMARY KEY, a text, b int, c numeric(8,2), d text);
           INSERT INTO evo SELECT g, 'a' || g, g, g / 4.0, 'd' || g FROM generate_series(1, 300) g;"""
    )
    helpers.sync_once(pg, duck_path, "evo")
    res = helpers.sync_once(pg, duck_path, "evo")
    assert not res.snapshotted
    pg.execute(
        """INSERT INTO evo VALUES (1000, 'before', 1, 1, 'x');
           ALTER TABLE evo ADD COLUMN with_default int DEFAULT 42;
           ALTER TABLE evo ADD COLUMN no_default text;
           UPDATE evo SET no_default = 'set', with_default = 7 WHERE id <= 10;
           ALTER TABLE evo DROP COLUMN d;
           INSERT INTO evo (id, a, b, c) VALUES (1001, 'after drop', 2, 2);
           ALTER TABLE evo RENAME COLUMN a TO a_renamed;
           UPDATE evo SET a_renamed = 'renamed' WHERE id BETWEEN 11 AND 20;
           ALTER TABLE evo ALTER COLUMN b TYPE bigint;
           ALTER TABLE evo ALTER COLUMN c TYPE numeric(12,4);
           UPDATE evo SET b = 5000000000 WHERE id = 21;
           INSERT INTO evo VALUES (1002, 'last', 3, 3.1234, 1, 'z');"""
    )
    helpers.sync_once(pg, duck_path, "evo")
    cols = _cols(duck_path, "evo")
    assert list(cols) == ["id", "a_renamed", "b", "c", "with_default", "no_default"]
    assert cols["b"] == "BIGINT" and cols["c"] == "DECIMAL(12,4)"
    assert helpers.assert_same(pg, duck_path, "evo") == 303
    con = duckdb.connect(duck_path, read_only=True)
    # rows that existed before ADD COLUMN ... DEFAULT show the default, as in PostgreSQL
    assert con.execute("SELECT count(*) FROM public.evo WHERE with_default = 42").fetchone() == (303 - 10 - 1,)
    con.close()


def test_schema_change_while_other_changes_stream(pg: helpers.Source, duck_path: str) -> None:
    pg.execute("CREATE TABLE s (id int PRIMARY KEY, v text); INSERT INTO s SELECT g, 'v' FROM generate_series(1, 50) g")
    helpers.sync_once(pg, duck_path, "s")
    for i in range(5):
        pg.execute(f"ALTER TABLE s ADD COLUMN c{i} int DEFAULT {i}; UPDATE s SET c{i} = id WHERE id % 5 = {i}")
    # schema changes travel with the table's next change (the Relation message that precedes it)
    pg.execute("ALTER TABLE s DROP COLUMN c0; ALTER TABLE s RENAME COLUMN c1 TO one; UPDATE s SET v = 'w' WHERE id = 1")
    helpers.sync_once(pg, duck_path, "s")
    assert list(_cols(duck_path, "s")) == ["id", "v", "one", "c2", "c3", "c4"]
    assert helpers.assert_same(pg, duck_path, "s") == 50


def test_a_crash_after_a_mid_transaction_commit_replays_nothing_twice(pg: helpers.Source, duck_path: str,
                                                                      monkeypatch: object) -> None:
    """A schema change mid-transaction commits the batch so far (the transactions before it, and the
    changes of this one before the DDL). After a crash right then, the restart must skip the
    transactions before it: replayed, they would overwrite what the partly applied one changed."""
    import pytest

    from datasync.engine import applying

    pg.execute("CREATE TABLE evo (id int PRIMARY KEY, v text); INSERT INTO evo SELECT g, 'v' FROM generate_series(1, 3) g")
    helpers.sync_once(pg, duck_path, "evo")
    pg.execute("UPDATE evo SET v = 'a' WHERE id = 1")  # T1
    pg.execute("BEGIN; UPDATE evo SET v = 'b' WHERE id = 1; ALTER TABLE evo ADD COLUMN w int; "
               "UPDATE evo SET w = 5 WHERE id = 2; COMMIT")  # F: the DDL between its changes
    real = applying.TableApplier._evolve

    def crash(self: applying.TableApplier, rel: object) -> None:
        raise RuntimeError("killed after the partial commit")

    monkeypatch.setattr(applying.TableApplier, "_evolve", crash)  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="killed"):
        helpers.sync_once(pg, duck_path, "evo")
    monkeypatch.setattr(applying.TableApplier, "_evolve", real)  # type: ignore[attr-defined]
    helpers.sync_once(pg, duck_path, "evo")
    assert helpers.assert_same(pg, duck_path, "public.evo") == 3


def test_renamed_key_column(pg: helpers.Source, duck_path: str) -> None:
    """A renamed primary key column keeps identifying rows (deletes and key changes after it)."""
    pg.execute("CREATE TABLE rk (id int PRIMARY KEY, v text); INSERT INTO rk SELECT g, 'v' FROM generate_series(1, 50) g")
    helpers.sync_once(pg, duck_path, "rk")
    pg.execute("ALTER TABLE rk RENAME COLUMN id TO ident; DELETE FROM rk WHERE ident <= 5;"
               "UPDATE rk SET ident = ident + 100 WHERE ident BETWEEN 6 AND 8; UPDATE rk SET v = 'u' WHERE ident = 9")
    helpers.sync_once(pg, duck_path, "rk")
    assert list(_cols(duck_path, "rk")) == ["ident", "v"]
    assert helpers.assert_same(pg, duck_path, "rk") == 45
