"""Checks while changes stream: no false alarms, every real divergence found, repair in flight."""

from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from datasync import identifiers
from datasync.engine import pinning, syncing
from datasync.targets import duckfile
from datasync.validation import aligning, running
from tests import helpers

DDL = """
CREATE TABLE acc (id bigint PRIMARY KEY, v int NOT NULL, t text, ts timestamptz);
INSERT INTO acc SELECT g, g, md5(g::text), '2024-01-01'::timestamptz + g * interval '1 minute'
FROM generate_series(1, 20000) g;
CREATE TABLE tags (owner text, n int, note jsonb, PRIMARY KEY (owner, n));
INSERT INTO tags SELECT 'o' || (g % 50), g, jsonb_build_object('g', g) FROM generate_series(1, 5000) g;
CREATE TABLE child (id uuid PRIMARY KEY, acc_id bigint REFERENCES acc (id) ON DELETE CASCADE, w numeric(10,2));
INSERT INTO child SELECT md5(g::text)::uuid, g, g / 4.0 FROM generate_series(1, 3000) g;
"""
TABLES = ("acc", "tags", "child")
HOT = 10_000  # the live writer touches acc ids 1..HOT and tags n 1..2000 only


class Live:
    """The engine following the source in a thread, a writer producing ≥1k changes/s."""

    def __init__(self, pg: helpers.Source, path: str) -> None:
        self.pg, self.path = pg, path
        self.pins = pinning.Pins()
        self.stop_sync, self.stop_writer = threading.Event(), threading.Event()
        self.changes = 0
        self.errors: list[BaseException] = []
        opts = syncing.Options(source=pg.dsn, target=path, tables=list(TABLES), follow=True, pins=self.pins,
                               max_batch_seconds=0.1, memory_limit="512MB")
        self.syncer = threading.Thread(target=self._guard, args=(lambda: syncing.run(opts, None, self.stop_sync),))
        self.writer = threading.Thread(target=self._guard, args=(self._write,))

    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except BaseException as exc:
            self.errors.append(exc)

    def _write(self) -> None:
        rnd = random.Random(7)
        next_id = 1_000_000
        with psycopg.connect(self.pg.dsn, autocommit=False) as conn:
            while not self.stop_writer.is_set():
                for _ in range(10):
                    a = rnd.randint(1, HOT)
                    conn.execute("UPDATE acc SET v = v + 1, ts = now() WHERE id = %s", (a,))
                    conn.execute("UPDATE tags SET note = jsonb_set(note, '{x}', to_jsonb(%s::int)) "
                                 "WHERE owner = %s AND n = %s", (a, f"o{a % 50}", a % 2000 + 1))
                    next_id += 1
                    conn.execute("INSERT INTO acc VALUES (%s, 0, 'live', now())", (next_id,))
                    conn.execute("INSERT INTO child VALUES (gen_random_uuid(), %s, 1.5)", (next_id,))
                    if next_id % 3 == 0:
                        conn.execute("DELETE FROM acc WHERE id = %s", (next_id - 1,))  # cascades to child
                    self.changes += 5
                conn.commit()
                time.sleep(0.005)

    def __enter__(self) -> Live:
        self.syncer.start()
        assert self.pins.wait_serving(120), self.errors
        self.writer.start()
        return self

    def rate(self, seconds: float = 1.0) -> float:
        before = self.changes
        time.sleep(seconds)
        return (self.changes - before) / seconds

    def check(self, **kw: Any) -> Any:
        request = running.Request([identifiers.TableName.parse(t) for t in TABLES],
                                  ["row_count", "data_hash", "referential_integrity"], **kw)
        return running.run_aligned(self.pg.dsn, self.pins, request)

    def __exit__(self, *exc: object) -> None:
        self.stop_writer.set()
        self.writer.join()
        # a pin at a fresh snapshot is reached once the copy holds everything written before it
        if self.pins.serving:
            aligning.write_pinned(self.pg.dsn, self.pins, lambda pg: None, lambda target, _: None)
        self.stop_sync.set()
        self.syncer.join()


@pytest.fixture
def live(pg: helpers.Source, duck_path: str) -> Iterator[Live]:
    pg.execute(DDL)
    with Live(pg, duck_path) as lv:
        yield lv
    assert not lv.errors, lv.errors


def _inject(target: duckfile.DuckTarget) -> None:
    con = target.con
    con.execute("BEGIN TRANSACTION")
    con.execute("DELETE FROM public.acc WHERE id IN (15001, 15002)")
    con.execute("UPDATE public.acc SET t = 'corrupt' WHERE id = 16000")
    con.execute("INSERT INTO public.acc VALUES (5000000, 1, 'extra', NULL)")
    con.execute("""UPDATE public.tags SET note = '{"g": -1}' WHERE owner = 'o1' AND n = 4001""")
    con.execute("DELETE FROM public.tags WHERE owner = 'o2' AND n = 4002")
    con.execute("UPDATE public.child SET w = 0 WHERE id = md5('2500')::UUID")
    con.execute("DELETE FROM public.acc WHERE id = 12999")  # no child rows; the writer never touches it
    con.execute("INSERT INTO public.child VALUES (md5('orphan')::UUID, 7000000, 1)")
    con.execute("COMMIT")


def test_no_false_alarms_and_every_divergence_found_under_traffic(live: Live) -> None:
    assert live.rate() >= 1000, "the live writer must produce at least 1k changes/s"
    for _ in range(3):  # a clean copy scores 100 while rows change on both sides
        run = live.check()
        assert run.score == 100.0 and run.ok, run.as_json()
        assert run.lsn is not None
    aligning.write_pinned(live.pg.dsn, live.pins, lambda pg: None, lambda target, _: _inject(target))
    assert live.rate() >= 1000
    run = live.check()
    by = {t.table: t for t in run.tables}
    acc, tags, child = by["public.acc"], by["public.tags"], by["public.child"]
    assert (acc.missing, acc.extra, acc.differing) == (3, 1, 1), acc.as_json()
    assert sorted(acc.mismatched_keys) == sorted(["15001", "15002", "16000", "5000000", "12999"])
    assert sorted(tags.mismatched_keys) == [["o1", "4001"], ["o2", "4002"]]
    assert (tags.missing, tags.differing) == (1, 1)
    assert sorted(child.mismatched_keys) == sorted([helpers.md5_uuid(2500), str(uuid.UUID(hashlib.md5(b'orphan').hexdigest()))])
    assert child.orphans == 1 and child.foreign_keys[0]["sample_keys"] == [str(uuid.UUID(hashlib.md5(b'orphan').hexdigest()))]
    assert not run.ok and 99 < run.score < 100

    # repair while the writer goes on: only the differing rows are re-copied, then the re-check is clean
    repaired = live.check(repair=True)
    assert repaired.score == 100.0 and repaired.ok, repaired.as_json()
    assert {t.table: t.repaired for t in repaired.tables} == {"public.acc": 5, "public.tags": 2, "public.child": 2}
    assert live.check().ok


def test_copy_equals_source_after_repair_and_traffic(pg: helpers.Source, duck_path: str) -> None:
    pg.execute(DDL)
    with Live(pg, duck_path) as lv:
        aligning.write_pinned(pg.dsn, lv.pins, lambda c: None, lambda target, _: _inject(target))
        assert not lv.check().ok
        assert lv.check(repair=True).ok
    assert not lv.errors, lv.errors
    for t in TABLES:
        helpers.assert_same(pg, duck_path, t)
