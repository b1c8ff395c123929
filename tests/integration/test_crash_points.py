"""The CDC loop crashed at every kind of commit, then restarted: the copy still equals the source.

Complements the SIGKILL test (test_crash_safety): here the crash is placed exactly, at the Nth
DuckDB commit of a replayed stream, in whichever thread makes it (the committing thread's batch
commits, the loop's partial commits at schema changes), before or after the commit took effect.
The stream mixes what the loop handles differently: small transactions, a transaction applied in
pieces, unchanged TOAST values, key changes, TRUNCATE, schema changes mid-transaction, two tables.
"""

from __future__ import annotations

import random
import shutil
import threading
from pathlib import Path

import psycopg
import pytest

from datasync.targets import duckfile
from tests import helpers
from tests.integration.test_receiving import _replay


class Crash(Exception):
    pass


class _CrashingCommits:
    """The Nth DuckDB commit (counted over the restarts) crashes, before or after it took effect."""

    def __init__(self, crash_at: int, after: bool) -> None:
        self.crash_at, self.after = crash_at, after
        self.seen = 0
        self.crashed = False

    def install(self, target: duckfile.DuckTarget) -> None:
        real_commit = target.commit

        def commit() -> None:
            self.seen += 1
            if not self.crashed and self.seen == self.crash_at:
                self.crashed = True
                if self.after:
                    real_commit()
                else:
                    target.rollback()  # as a failed COMMIT: nothing of it remains
                raise Crash(f"at commit {self.seen} in {threading.current_thread().name}")
            real_commit()

        target.commit = commit  # type: ignore[method-assign]


_SETUP = ("CREATE TABLE a (id int PRIMARY KEY, v text, t text); ALTER TABLE a ALTER COLUMN t SET STORAGE EXTERNAL;"
          "INSERT INTO a SELECT g, 'v', repeat(md5(g::text), 200) FROM generate_series(1, 300) g;"
          "CREATE TABLE b (id int, k int, v text, PRIMARY KEY (id, k));"
          "INSERT INTO b SELECT g, 0, 'b' FROM generate_series(1, 50) g")
_CHANGES = [  # one transaction each
    *(f"UPDATE a SET v = 's{k}' WHERE id % 12 = {k}; INSERT INTO b VALUES ({k}, 1, 'n{k}') ON CONFLICT DO NOTHING"
      for k in range(12)),  # small transactions over both tables
    "UPDATE a SET v = 'big' WHERE id <= 250",  # applied in pieces at small batch sizes
    "UPDATE a SET v = 'toast' WHERE id % 7 = 0",  # unchanged TOAST values
    "UPDATE a SET id = id + 10000 WHERE id % 10 = 3",  # key changes, unchanged TOAST
    "BEGIN; UPDATE a SET v = 'x' WHERE id <= 20; TRUNCATE b;"
    "INSERT INTO b SELECT g, 2, 'after' FROM generate_series(1, 40) g; UPDATE a SET v = 'y' WHERE id <= 30; COMMIT",
    "BEGIN; UPDATE a SET v = 'pre' WHERE id BETWEEN 50 AND 150; ALTER TABLE a ADD COLUMN w int DEFAULT 7;"
    "UPDATE a SET w = id WHERE id BETWEEN 100 AND 200; UPDATE b SET v = 'bb' WHERE id < 10;"
    "ALTER TABLE b DROP COLUMN v; INSERT INTO b VALUES (100, 3); UPDATE a SET v = 'post' WHERE id > 200; COMMIT",
    *(f"UPDATE a SET v = 't{k}', t = t || 'z' WHERE id % 6 = {k}; DELETE FROM b WHERE id = {k}" for k in range(6)),
    "BEGIN; DELETE FROM a WHERE id % 11 = 0; ALTER TABLE a RENAME COLUMN v TO vv;"
    "UPDATE a SET vv = 'ren' WHERE id % 5 = 1; COMMIT",
]


@pytest.mark.parametrize("seed", range(4))
def test_a_crash_at_any_commit_loses_and_repeats_nothing(pg: helpers.Source, tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    rec = _replay(pg, tmp_path, _SETUP, ("a", "b"), _CHANGES, rnd.choice([1, 7, 50, 1000]))
    crashes = 0
    for trial in range(5):
        path = str(tmp_path / f"trial{trial}.duckdb")
        shutil.copy(rec.live, path)
        batch = rnd.choice([1, 2, 3, 7, 20, 60, 200])
        crash_at = rnd.randint(1, 12)
        after = rnd.random() < 0.5  # the commit took effect, then the process died
        crashing = _CrashingCommits(crash_at, after)
        for _ in range(2):  # the crashed run, then the restart
            target = duckfile.DuckTarget(path)
            crashing.install(target)
            try:
                with psycopg.connect(pg.dsn, autocommit=True) as control:
                    rec.stream(
                        target, control, poll_seconds=0.01, batch_changes=batch, max_batch_seconds=rnd.choice([0.0, 5.0]),
                    ).run(rec.upto, threading.Event())
                break
            except Crash:
                continue
            finally:
                target.close()
        crashes += crashing.crashed
        where = f"trial {trial}: batch {batch}, crash at commit {crash_at} ({'after' if after else 'before'} it)"
        try:
            assert helpers.assert_same(pg, path, "a") > 0
            assert helpers.assert_same(pg, path, "b") > 0
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from None
    assert crashes  # at least one trial crashed (each run makes more than a few commits)
