"""The copy's row hashes equal PostgreSQL's hash_record_extended, column kind by column kind."""

from __future__ import annotations

import json
import random

import duckdb
import psycopg
import pytest

from datasync import identifiers
from datasync.targets import duckfile
from datasync.validation import hashing
from tests import helpers
from tests.integration.test_snapshot import ROWS, TYPES_DDL

pytestmark = pytest.mark.skipif(not hashing.AVAILABLE, reason="the _pghash extension is not built")

EXTRA = """
CREATE TABLE edge (id int PRIMARY KEY, n numeric, n4 numeric(20,4), n0 numeric(18,0), f8 float8, f4 real,
                   d date, ts timestamptz, t text, bp char(6), u uuid, jb jsonb, by bytea, tm time);
INSERT INTO edge VALUES
 (1, 0, 0, 0, 0, 0, '2000-01-01', '2000-01-01 00:00:00+00', '', '', '00000000-0000-0000-0000-000000000001',
  '{}', '\\x', '00:00'),
 (2, 0.0001, 0.0001, 1, -0.0, -0.0, '1999-12-31', '1999-12-31 23:59:59.999999+00', 'a', 'a',
  'ffffffff-ffff-ffff-ffff-ffffffffffff', '[1, "x", null, true, 2.50]', '\\x01', '24:00'),
 (3, 10000, 10000.0000, 10000, 1e-300, 1e-30, '5874897-12-31', '200000-12-31 23:59:59.999999+00',
  repeat('x', 12), 'abcdef', md5('u')::uuid, '{"a": {"b": [1e3, -0.5]}}', '\\x000102030405060708090a0b0c', '13:14:15.161718'),
 (4, -123456789.987654321, -1234567890123456.7891, 999999999999999999, 'NaN', 'NaN', '4713-01-01 BC',
  '4713-01-01 00:00:00+00 BC', repeat('é', 13), 'é', md5('v')::uuid, '"just a string"', '\\xff', '23:59:59.999999'),
 (5, 1e-20, 0.1, -999999999999999999, 'Infinity', '-Infinity', 'infinity', 'infinity', 'a b', ' a', NULL,
  '123', NULL, NULL),
 (6, 12345678901234567890.000000000000000000001, -0.0001, -1, 123456.789, 3.25, '-infinity', '-infinity',
  repeat('abc', 100), NULL, NULL, '[]', NULL, NULL),
 (7, 'NaN', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (8, 'Infinity', 100, 100, 1e15, 1e16, '2024-02-29', '2024-02-29 12:00:00.5+00', 'tab\there', 'x     ',
  NULL, '{"b": 1, "a": 2}', NULL, NULL)
"""


def _compare(pg: helpers.Source, path: str, table: str) -> int:
    con = duckdb.connect(path, read_only=True)
    try:
        state = duckfile.DuckTarget.read_states(con)[identifiers.TableName.parse(table)]
        checked = 0
        key = next(c for c in state.columns if c.name == "id")
        for col in state.columns:
            plan = hashing.Plan([hashing.column(col), hashing.column(key)], [], False)
            theirs = dict(pg.query(f"SELECT id, hash_record_extended(ROW({plan.columns[0].pg}), 0) FROM {table}"))
            batch = con.execute(f"SELECT {plan.duck_select()} FROM public.{table} ORDER BY id").to_arrow_table()
            ids = batch.column(1).to_pylist()
            mine = hashing.record_hashes(batch.combine_chunks().to_batches()[0], [plan.columns[0]])
            got = {i: h for i, h in zip(ids, mine, strict=True)}
            want = {i: hashing.unsigned(h) for i, h in theirs.items()}
            bad = {i: (want[i], got[i]) for i in want if want[i] != got[i]}
            assert not bad, f"{table}.{col.name} ({col.duck_type}, kind {plan.columns[0].kind}): {bad}"
            checked += len(want)
        # and whole rows, every column at once
        plan = hashing.Plan.of(state)
        theirs = dict(pg.query(f"SELECT id, {plan.pg_row_hash()} FROM {table}"))
        id_pos = next(i for i, c in enumerate(state.columns) if c.name == "id")
        batch = con.execute(f"SELECT {plan.duck_select()} FROM public.{table}").to_arrow_table()
        batch1 = batch.combine_chunks().to_batches()[0]
        mine = dict(zip(batch1.column(id_pos).to_pylist(), hashing.record_hashes(batch1, plan.columns), strict=True))
        assert {i: hashing.unsigned(h) for i, h in theirs.items()} == mine
        return checked
    finally:
        con.close()


def test_every_type_hashes_like_postgresql(pg: helpers.Source, duck_path: str) -> None:
    pg.execute(TYPES_DDL)
    pg.execute(ROWS)
    pg.execute(EXTRA)
    helpers.sync_once(pg, duck_path, "alltypes", "edge")
    assert _compare(pg, duck_path, "alltypes") > 0
    assert _compare(pg, duck_path, "edge") > 0


def _random_json(rnd: random.Random, depth: int = 0) -> object:
    pick = rnd.randrange(9 if depth < 4 else 6)
    if pick == 0:
        return None
    if pick == 1:
        return rnd.random() < 0.5
    if pick == 2:
        return rnd.choice([0, -1, 10**rnd.randrange(30), -(10**rnd.randrange(20)) + 7, rnd.randrange(-10**6, 10**6)])
    if pick == 3:
        return round(rnd.uniform(-1e6, 1e6), rnd.randrange(8))
    if pick in (4, 5):
        alphabet = 'ab "\\/\n\t\u00e9\u2713\U0001f600\x01\x1f{}[],:'
        return "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(0, 30)))
    if pick == 6:
        return [_random_json(rnd, depth + 1) for _ in range(rnd.randrange(0, 5))]
    keys = ["", "a", "b", "aa", "B", "é", "key with space", "zz" * rnd.randrange(1, 4), "\"q\""]
    return {rnd.choice(keys): _random_json(rnd, depth + 1) for _ in range(rnd.randrange(0, 6))}


def test_random_jsonb_documents_hash_like_postgresql(pg: helpers.Source, duck_path: str) -> None:
    rnd = random.Random(20261129)
    pg.execute("CREATE TABLE docs (id int PRIMARY KEY, doc jsonb)")
    docs = [json.dumps(_random_json(rnd)) for _ in range(3000)]
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        with conn.cursor().copy("COPY docs (id, doc) FROM STDIN") as cp:
            for i, d in enumerate(docs):
                cp.write_row((i, d))
    helpers.sync_once(pg, duck_path, "docs")
    assert _compare(pg, duck_path, "docs") == 6000
