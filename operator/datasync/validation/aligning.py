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
import threading
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
    #: more read transactions at exactly the same position (opened together in the pinned writer,
    #: before it writes again): DuckDB converts to Arrow on one thread per transaction
    extra: list[duckdb.DuckDBPyConnection] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def source_snapshot(
    dsn: str, on_lsn: Callable[[int], None] | None = None
) -> Iterator[tuple[psycopg.Connection[Any], int]]:
    """A reader inside a fresh exported snapshot and the snapshot's consistent LSN.

    ``on_lsn`` is called with the LSN the moment the slot exists, before the (slower)
    reader connection is made: that is when a pin for it must be posted.
    """
    name = f"datasync_check_{os.getpid()}_{next(_counter)}"
    with replication.exported_snapshot(dsn, name) as snap:
        if on_lsn is not None:
            on_lsn(snap.consistent_lsn)
        pg = connecting.connect_psycopg3(dsn, autocommit=False)
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


def pinned_snapshot(
    dsn: str, pins: pinning.Pins, fn: pinning.PinFunction
) -> tuple[contextlib.ExitStack, psycopg.Connection[Any], int, pinning.Pin]:
    """A source snapshot and a pin for ``fn`` at its LSN, the writer held while the slot is made.

    Returns the stack that closes the snapshot's reader, the reader, the LSN and the pin.
    """
    posted: list[pinning.Pin] = []
    stack = contextlib.ExitStack()
    try:
        with pins.holding():
            pg, lsn = stack.enter_context(source_snapshot(dsn, lambda lsn: posted.append(pins.post(lsn, fn))))
    except BaseException:
        for pin in posted:
            pins.cancel(pin)
        raise
    return stack, pg, lsn, posted[0]


READERS = 2


class _Readers(list[duckdb.DuckDBPyConnection]):
    def close(self) -> None:
        for cur in self:
            cur.close()


def _open_readers(target: duckfile.DuckTarget) -> _Readers:
    readers = _Readers()
    for _ in range(READERS):  # all opened here, in the pinned writer: every one sees the same state
        cur = target.con.cursor()
        cur.execute("SET enable_progress_bar = false")
        cur.execute("BEGIN TRANSACTION")
        cur.execute(f"SELECT count(*) FROM {duckfile.META}.checkpoint").fetchall()  # the snapshot is taken here
        readers.append(cur)
    return readers


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
def aligned(dsn: str, pins: pinning.Pins, timeout: float = 600.0) -> Iterator[Aligned]:
    """Both sides at one LSN (see the module docstring); ``timeout`` bounds the wait for the writer."""
    stack = contextlib.ExitStack()

    def attempt() -> Aligned:
        inner, pg, lsn, pin = pinned_snapshot(dsn, pins, _open_readers)
        try:
            readers = pins.wait(pin, timeout)
        except BaseException:
            pins.cancel(pin)
            inner.close()
            raise
        inner.callback(readers.close)
        stack.push(inner)
        return Aligned(pg, readers[0], lsn, list(readers[1:]))

    with stack:
        yield retrying(pins, attempt)


def write_pinned(dsn: str, pins: pinning.Pins, read: Callable[[psycopg.Connection[Any]], T],
                 write: Callable[[duckfile.DuckTarget, T], Any], read_timeout: float = 300.0) -> Any:
    """``read`` from a fresh source snapshot, then ``write`` it in the writer pinned at that snapshot.

    The pin is posted as soon as the snapshot exists; if the writer gets there before the
    read is done, it waits for the data (repairs read a few keys: milliseconds).
    """

    def attempt() -> Any:
        box: list[T] = []
        ready = threading.Event()

        def pinned(target: duckfile.DuckTarget) -> Any:
            if not ready.wait(read_timeout) or not box:
                raise errors.DataSyncError("the rows to write were not read in time", "try again")
            return write(target, box[0])

        snapshot, pg, _lsn, pin = pinned_snapshot(dsn, pins, pinned)
        try:
            with snapshot:
                box.append(read(pg))
        finally:
            ready.set()  # never leave the writer waiting, even when the read failed
        return pins.wait(pin)

    return retrying(pins, attempt)
