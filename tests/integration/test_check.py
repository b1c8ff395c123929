"""`datasync check`: exact on identical copies, finds every injected divergence by key."""

from __future__ import annotations

import json

import duckdb
import pytest

from datasync.engine import pgoutput
from datasync.validation import hashing, running
from tests import helpers
from tests.integration.test_snapshot import ROWS, TYPES_DDL


def _check(pg: helpers.Source, path: str, *tables: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    args = ["check", "--source", pg.dsn, "--target", path, "--json"]
    for t in tables:
        args += ["--table", t]
    res = helpers.cli(*args)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode, json.loads(res.stdout)


def test_identical_copies_score_100_for_every_type(pg: helpers.Source, duck_path: str) -> None:
    pg.execute(TYPES_DDL)
    pg.execute(ROWS)
    pg.execute("CREATE TABLE big (id bigint PRIMARY KEY, f float8, r real, t text);"
               "INSERT INTO big SELECT g, g / 3.0 * 1e13, g / 7.0, md5(g::text) FROM generate_series(1, 20000) g")
    helpers.sync_once(pg, duck_path, "alltypes", "big")
    code, report = _check(pg, duck_path)
    assert code == 0, report
    assert report["consistency_score"] == 100.0
    assert {t["table"]: t["ok"] for t in report["tables"]} == {"public.alltypes": True, "public.big": True}


def test_divergences_are_found_with_their_keys(pg: helpers.Source, duck_path: str) -> None:
    pg.execute(
        """CREATE TABLE ints (id bigint PRIMARY KEY, v text);
           INSERT INTO ints SELECT g * 1000, 'v' || g FROM generate_series(1, 30000) g;  -- sparse keys
           CREATE TABLE uuids (id uuid PRIMARY KEY, n numeric(10,2));
           INSERT INTO uuids SELECT md5(g::text)::uuid, g FROM generate_series(1, 5000) g;
           CREATE TABLE comp (a text, b int, c jsonb, PRIMARY KEY (a, b));
           INSERT INTO comp SELECT 'k' || (g % 100), g, jsonb_build_object('g', g) FROM generate_series(1, 5000) g;"""
    )
    helpers.sync_once(pg, duck_path, "ints", "uuids", "comp")
    con = duckdb.connect(duck_path)
    con.execute("DELETE FROM public.ints WHERE id IN (5000, 17000000)")
    con.execute("UPDATE public.ints SET v = 'changed' WHERE id = 29000000")
    con.execute("INSERT INTO public.ints VALUES (1, 'extra')")
    con.execute("UPDATE public.uuids SET n = n + 0.01 WHERE id = md5('42')::UUID")
    con.execute("""UPDATE public.comp SET c = '{"g": 0}' WHERE a = 'k7' AND b = 7""")
    con.close()
    code, report = _check(pg, duck_path)
    assert code == 1
    by = {t["table"]: t for t in report["tables"]}
    ints = by["public.ints"]
    assert (ints["missing"], ints["extra"], ints["differing"]) == (2, 1, 1)
    assert sorted(ints["mismatched_keys"]) == sorted(["5000", "17000000", "29000000", "1"])
    assert by["public.uuids"]["mismatched_keys"] == [helpers.md5_uuid(42)]
    assert by["public.comp"]["mismatched_keys"] == [["k7", "7"]]
    assert 99 < report["consistency_score"] < 100
    assert not ints["ok"] and ints["checks"] == {"row_count": False, "data_hash": False}  # 30000 vs 29999
    assert by["public.uuids"]["checks"] == {"row_count": True, "data_hash": False}


def test_check_errors_and_readable_output(pg: helpers.Source, duck_path: str, tmp_path: object) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)")
    helpers.sync_once(pg, duck_path, "t")
    bad = helpers.cli("check", "--source", pg.dsn, "--target", duck_path, "--checks", "row_count,nope")
    assert bad.returncode != 0 and "unknown check(s) nope" in bad.stderr
    other = str(tmp_path) + "/plain.duckdb"
    duckdb.connect(other).close()
    res = helpers.cli("check", "--source", pg.dsn, "--target", other)
    assert res.returncode == 3 and "not a DataSync target" in res.stderr
    ok = helpers.cli("check", "--source", pg.dsn, "--target", duck_path, "--table", "t", "--checks", "row_count")
    assert ok.returncode == 0 and "consistency score 100" in ok.stdout and "public.t" in ok.stdout


def test_repair_recopies_only_the_mismatching_rows(pg: helpers.Source, duck_path: str) -> None:
    pg.execute(TYPES_DDL)
    pg.execute(ROWS)
    pg.execute("CREATE TABLE comp (a text, b int, v text, PRIMARY KEY (a, b));"
               "INSERT INTO comp SELECT 'k' || (g % 10), g, md5(g::text) FROM generate_series(1, 3000) g")
    helpers.sync_once(pg, duck_path, "alltypes", "comp")
    con = duckdb.connect(duck_path)
    con.execute("DELETE FROM public.alltypes WHERE id = 2")
    con.execute("UPDATE public.alltypes SET t = 'corrupt', iv = INTERVAL 1 DAY WHERE id = 4")
    con.execute("DELETE FROM public.comp WHERE b % 500 = 0")
    con.execute("INSERT INTO public.comp VALUES ('zz', -1, 'extra')")
    untouched = con.execute("SELECT count(*) FROM public.comp WHERE b = 1").fetchone()
    con.close()
    res = helpers.cli("check", "--source", pg.dsn, "--target", duck_path, "--repair", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["consistency_score"] == 100.0
    assert {t["table"]: t["repaired"] for t in report["tables"]} == {"public.alltypes": 2, "public.comp": 7}
    assert helpers.assert_same(pg, duck_path, "public.alltypes") == 4
    assert helpers.assert_same(pg, duck_path, "public.comp") == 3000
    assert untouched == (1,)


def test_check_catches_the_copy_up_before_comparing(pg: helpers.Source, duck_path: str) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'a' FROM generate_series(1, 100) g")
    helpers.sync_once(pg, duck_path, "t")
    pg.execute("UPDATE t SET v = 'b' WHERE id <= 10; DELETE FROM t WHERE id = 100; INSERT INTO t VALUES (101, 'new')")
    code, report = _check(pg, duck_path)
    assert code == 0 and report["consistency_score"] == 100.0 and report["aligned"], report
    lsn = pg.query("SELECT confirmed_flush_lsn::text FROM pg_replication_slots")[0][0]
    assert pgoutput.parse_lsn(report["lsn"]) <= pgoutput.parse_lsn(lsn)  # compared at a position the slot passed
    assert helpers.assert_same(pg, duck_path, "t") == 100  # the check applied the pending changes


def test_without_the_slot_the_copy_is_compared_as_it_stands(pg: helpers.Source, duck_path: str) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'a' FROM generate_series(1, 100) g")
    helpers.sync_once(pg, duck_path, "t")
    for slot in pg.slots():
        pg.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    pg.execute("UPDATE t SET v = 'b' WHERE id = 7")
    code, report = _check(pg, duck_path)
    assert code == 1 and not report["aligned"] and "compared as it stands" in report["note"]
    assert report["tables"][0]["mismatched_keys"] == ["7"]


def test_referential_integrity_and_business_rules(pg: helpers.Source, duck_path: str) -> None:
    pg.execute(
        """CREATE TABLE owners (id int PRIMARY KEY, name text NOT NULL);
           INSERT INTO owners SELECT g, 'o' || g FROM generate_series(1, 50) g;
           CREATE TABLE "Projects" (id int PRIMARY KEY, owner_id int REFERENCES owners, amount numeric(10,2),
                                    day date, parent int REFERENCES "Projects");
           INSERT INTO "Projects" SELECT g, 1 + g % 50, g * 1.25, date '2024-01-01' + g % 7,
                                         CASE WHEN g > 1 THEN 1 END FROM generate_series(1, 500) g;"""
    )
    helpers.sync_once(pg, duck_path, "owners", '"Projects"')
    rules = [
        "--rule", 'no_orphan_owner=SELECT p.id FROM public."Projects" p LEFT JOIN public.owners o '
                  "ON o.id = p.owner_id WHERE o.id IS NULL",
        "--rule", 'daily_sums~=SELECT day, sum(amount) AS total FROM public."Projects" GROUP BY day',
    ]
    args = ["check", "--source", pg.dsn, "--target", duck_path, "--json",
            "--checks", "row_count,referential_integrity,business_rules", *rules]
    res = helpers.cli(*args)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert [r["ok"] for r in report["rules"]] == [True, True]
    fks = {fk["name"]: fk for t in report["tables"] for fk in t["foreign_keys"]}
    assert set(fks) == {"Projects_owner_id_fkey", "Projects_parent_fkey"}
    assert all(fk["orphans"] == 0 for fk in fks.values())

    # break the copy's integrity and a daily sum (slot dropped: the check must not re-sync the rows)
    for slot in pg.slots():
        pg.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    con = duckdb.connect(duck_path)
    con.execute("DELETE FROM public.owners WHERE id = 3")
    con.execute('UPDATE public."Projects" SET amount = amount + 1 WHERE id = 14')
    con.close()
    res = helpers.cli(*args)
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads(res.stdout)
    by = {t["table"]: t for t in report["tables"]}
    projects = by['public."Projects"']
    assert projects["orphans"] == 10 and projects["checks"]["referential_integrity"] is False
    owner_fk = next(fk for fk in projects["foreign_keys"] if fk["name"] == "Projects_owner_id_fkey")
    assert owner_fk["sample_keys"] == [str(g) for g in range(2, 501, 50)]
    rules_by = {r["name"]: r for r in report["rules"]}
    assert rules_by["no_orphan_owner"]["violations"] == 10 and not rules_by["no_orphan_owner"]["ok"]
    daily = rules_by["daily_sums"]
    assert not daily["ok"] and daily["violations"] == 2  # the day's sum differs: one row each side
    assert {s["side"] for s in daily["sample"]} == {"copy", "source"}
    # score (row_count only, so the altered amount counts through the rule alone): owners 1 row short,
    # Projects 10 orphans, rules 10 + 2 rows; out of 550 rows
    assert report["consistency_score"] == round(100 * (1 - 23 / 550), 4)


def test_rules_may_only_read(pg: helpers.Source, duck_path: str) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)")
    helpers.sync_once(pg, duck_path, "t")
    res = helpers.cli("check", "--source", pg.dsn, "--target", duck_path, "--rule", "evil=DELETE FROM public.t")
    assert res.returncode != 0 and "rule evil is not a single SELECT" in res.stderr
    res = helpers.cli("check", "--source", pg.dsn, "--target", duck_path, "--rule", "two=SELECT 1; DROP TABLE public.t")
    assert res.returncode != 0 and "not a single SELECT" in res.stderr
    res = helpers.cli("check", "--source", pg.dsn, "--target", duck_path, "--rule", "nonsense")
    assert res.returncode != 0 and "NAME=SELECT" in res.stderr
    assert helpers.assert_same(pg, duck_path, "t") == 10


@pytest.mark.parametrize("native", [True, False], ids=["pg-hashes", "portable-md5"])
def test_both_hash_paths_find_the_same_rows(pg: helpers.Source, duck_path: str, native: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the C extension the canonical-text md5 path runs; it finds exactly the same rows."""
    pg.execute(TYPES_DDL)
    pg.execute(ROWS)
    pg.execute("CREATE TABLE comp (a text, b uuid, v jsonb, PRIMARY KEY (a, b));"
               "INSERT INTO comp SELECT 'k' || (g % 10), md5(g::text)::uuid, jsonb_build_object('g', g) "
               "FROM generate_series(1, 2000) g")
    helpers.sync_once(pg, duck_path, "alltypes", "comp")
    con = duckdb.connect(duck_path)
    con.execute("UPDATE public.alltypes SET jb = '{\"k\": 1.5}', n_any = '2' WHERE id = 4")
    con.execute("DELETE FROM public.comp WHERE b = md5('7')::UUID")
    con.execute("""UPDATE public.comp SET v = '{"g": 9}' WHERE b = md5('8')::UUID""")
    con.close()
    monkeypatch.setattr(hashing, "AVAILABLE", native and hashing.AVAILABLE)
    run = running.check_file(pg.dsn, duck_path, running.Request([], ["row_count", "data_hash"]))
    by = {t.table: t for t in run.tables}
    assert by["public.alltypes"].mismatched_keys == ["4"]
    assert sorted(by["public.comp"].mismatched_keys) == [["k7", helpers.md5_uuid(7)], ["k8", helpers.md5_uuid(8)]]
    assert (by["public.comp"].missing, by["public.comp"].differing) == (1, 1)


def test_declared_foreign_keys_are_checked_too(pg: helpers.Source, duck_path: str) -> None:
    pg.execute("CREATE TABLE a (id int PRIMARY KEY); INSERT INTO a SELECT generate_series(1, 10);"
               "CREATE TABLE b (id int PRIMARY KEY, a_ref int);"  # no foreign key in the catalog
               "INSERT INTO b SELECT g, g FROM generate_series(1, 10) g; INSERT INTO b VALUES (11, 99), (12, NULL)")
    helpers.sync_once(pg, duck_path, "a", "b")
    res = helpers.cli("check", "--source", pg.dsn, "--target", duck_path, "--json", "--checks", "row_count",
                      "--foreign-key", "b_to_a: public.b(a_ref) -> public.a(id)")
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads(res.stdout)
    b = next(t for t in report["tables"] if t["table"] == "public.b")
    assert b["orphans"] == 1 and b["foreign_keys"][0]["name"] == "b_to_a"
    assert b["foreign_keys"][0]["sample_keys"] == ["11"]  # 12 is exempt: its reference is NULL
    bad = helpers.cli("check", "--source", pg.dsn, "--target", duck_path, "--foreign-key", "public.b(a_ref) -> public.zz(id)")
    assert bad.returncode != 0 and "public.zz, not synced" in bad.stderr


def test_a_check_that_runs_too_long_is_stopped(pg: helpers.Source, duck_path: str) -> None:
    pg.execute("CREATE TABLE big (id bigint PRIMARY KEY, t text);"
               "INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 400000) g")
    helpers.sync_once(pg, duck_path, "big")
    res = helpers.cli("check", "--source", pg.dsn, "--target", duck_path, "--timeout", "0.05")
    assert res.returncode != 0 and "the check did not finish within 0.05s" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    ok = helpers.cli("check", "--source", pg.dsn, "--target", duck_path, "--timeout", "120", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["consistency_score"] == 100.0
