"""Both sides at one LSN, while changes keep streaming.

A check that reads PostgreSQL now and the copy as the writer left it a moment ago reports
every row changed in between as a divergence.  Instead both sides are *aligned*:

1. a temporary logical slot exports a PostgreSQL snapshot with an exact consistent LSN ``C``
   (it holds every transaction committed before ``C`` and none after); a reader imports it
   and the exporting connection is closed again;
2. the writer is *pinned* at ``C`` (``engine.pinning``): right before the first transaction
   committed at or after ``C`` it opens a DuckDB read transaction — a snapshot of the copy
   holding exactly the same transactions — and goes on streaming;
3. the check reads both snapshots at leisure: no row changed after ``C`` is visible on either
   side, so nothing in flight is mistaken for a divergence, and the stream is held up only
   for the moment it takes to open the DuckDB transaction.

Repairs use the same mechanism: rows are read from PostgreSQL at a fresh ``C`` and written
by the writer pinned at that ``C``, so a repaired row is exactly the source's row at the
copy's position and later changes apply on top of it as usual.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import duckdb
import psycopg

from datasync import errors
from datasync.engine import pinning
from datasync.sources import connecting, replication
from datasync.targets import duckfile

log = logging.getLogger(__name__)

ATTEMPTS = 5
_counter = itertools.count()
T = TypeVar("T")


@dataclasses.dataclass
class Aligned:
    pg: psycopg.Connection[Any]  # a REPEATABLE READ, READ ONLY transaction at the snapshot
    duck: duckdb.DuckDBPyConnection  # a DuckDB read transaction at the same position
    lsn: int


@contextlib.contextmanager
def source_snapshot(dsn: str) -> Iterator[tuple[psycopg.Connection[Any], int]]:
    """A reader inside a fresh exported snapshot and the snapshot's consistent LSN."""
    name = f"datasync_check_{os.getpid()}_{next(_counter)}"
    with replication.exported_snapshot(dsn, name) as snap:
        pg = connecting.connect(dsn, autocommit=False)
        try:
            pg.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            pg.execute(f"SET TRANSACTION SNAPSHOT '{snap.snapshot_id}'")
        except BaseException:
            pg.close()
            raise
    # the exporting connection (and its temporary slot) is gone; the imported snapshot stays
    try:
        yield pg, snap.consistent_lsn
    finally:
        pg.close()


def _open_reader(target: duckfile.DuckTarget) -> duckdb.DuckDBPyConnection:
    cur = target.con.cursor()
    cur.execute("SET enable_progress_bar = false")
    cur.execute("BEGIN TRANSACTION")
    cur.execute(f"SELECT count(*) FROM {duckfile.META}.checkpoint").fetchall()  # the snapshot is taken here
    return cur


def retrying(pins: pinning.Pins, attempt: Callable[[], T]) -> T:
    """Run ``attempt`` until the writer does not miss its pin (a few times at most)."""
    for n in range(ATTEMPTS):
        try:
            return attempt()
        except pinning.Missed as exc:
            log.info("pin missed (%s), attempt %d of %d", exc.message, n + 1, ATTEMPTS)
    raise errors.DataSyncError(
        f"could not align the copy with the source in {ATTEMPTS} attempts",
        "the writer keeps running ahead of fresh snapshots; try again",
    )


@contextlib.contextmanager
def aligned(dsn: str, pins: pinning.Pins) -> Iterator[Aligned]:
    """Both sides at one LSN (see the module docstring)."""
    stack = contextlib.ExitStack()

    def attempt() -> Aligned:
        inner = contextlib.ExitStack()
        pg, lsn = inner.enter_context(source_snapshot(dsn))
        try:
            duck = pins.request(lsn, _open_reader)
        except BaseException:
            inner.close()
            raise
        inner.callback(duck.close)
        stack.push(inner)
        return Aligned(pg, duck, lsn)

    with stack:
        yield retrying(pins, attempt)


def write_pinned(dsn: str, pins: pinning.Pins, read: Callable[[psycopg.Connection[Any]], T],
                 write: Callable[[duckfile.DuckTarget, T], Any]) -> Any:
    """``read`` from a fresh source snapshot, then ``write`` it in the writer pinned at that snapshot."""

    def attempt() -> Any:
        with source_snapshot(dsn) as (pg, lsn):
            data = read(pg)
        return pins.request(lsn, lambda target: write(target, data))

    return retrying(pins, attempt)
