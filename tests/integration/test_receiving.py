"""The replication stream read from libpq in C: the same messages as psycopg2's reader,
confirmations reach the slot, and keepalive requests are answered."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from datasync.engine import applying, pgoutput, pinning, streaming, syncing
from datasync.sources import receiving, replication
from datasync.targets import duckfile
from tests import helpers


def _drain(stream: receiving.Stream, upto: int) -> list[bytes]:
    out: list[bytes] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        msgs = stream.read(1000, 0.1)
        out += msgs
        if not msgs:
            if stream.wal_end >= upto:
                return out
            stream.request_status()
    raise AssertionError("the stream did not reach the flushed WAL position")


def _prepare(pg: helpers.Source, *slots: str) -> int:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR TABLE t")
    for slot in slots:
        pg.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    pg.execute("INSERT INTO t SELECT g, repeat('é', g % 50) FROM generate_series(1, 3000) g")
    pg.execute("UPDATE t SET v = NULL WHERE id % 3 = 0; DELETE FROM t WHERE id % 7 = 0")
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        return replication.wait_flushed(conn)


def test_native_reader_equals_psycopg2_reader(pg: helpers.Source) -> None:
    upto = _prepare(pg, "s_native", "s_py")
    native = receiving.Stream(pg.dsn, "s_native", "pub")
    assert native._speedups is not None
    plain = receiving.Stream(pg.dsn, "s_py", "pub", native=False)
    try:
        a, b = _drain(native, upto), _drain(plain, upto)
    finally:
        native.close()
        plain.close()
    assert a == b
    changes = [m for m in a if m[:1] in (b"I", b"U", b"D")]
    assert len(changes) == 3000 + 1000 + 428
    assert sum(1 for m in a if m[:1] == b"C") == 2  # the UPDATE and DELETE ran as one transaction


def test_confirm_moves_the_slot(pg: helpers.Source) -> None:
    upto = _prepare(pg, "s_confirm")
    stream = receiving.Stream(pg.dsn, "s_confirm", "pub")
    try:
        msgs = _drain(stream, upto)
        end = max(pgoutput.decode(m).end_lsn for m in msgs if m[:1] == b"C")  # type: ignore[union-attr]
        stream.confirm(end, force=True)
        deadline = time.monotonic() + 10
        while True:
            (flushed,) = pg.query("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 's_confirm'")[0]
            if pgoutput.parse_lsn(flushed) == end:
                break
            assert time.monotonic() < deadline, f"slot at {flushed}, confirmed {pgoutput.format_lsn(end)}"
            stream.read(10, 0.1)
    finally:
        stream.close()


def test_keepalive_requests_are_answered(pg: helpers.Source) -> None:
    """With a 1 s wal_sender_timeout the walsender asks for a reply every 0.5 s and hangs up without one."""
    upto = _prepare(pg, "s_alive")
    pg.execute(f'ALTER DATABASE "{pg.dbname}" SET wal_sender_timeout = 1000')
    stream = receiving.Stream(pg.dsn, "s_alive", "pub")
    try:
        _drain(stream, upto)
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            assert stream.read(100, 0.2) == []
        pg.execute("INSERT INTO t VALUES (-1, 'still here')")
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while not any(m[:1] == b"I" for m in got):
            assert time.monotonic() < deadline
            got += stream.read(100, 0.2)
    finally:
        stream.close()


def test_a_confirmation_still_owed_is_sent_on_close(pg: helpers.Source) -> None:
    upto = _prepare(pg, "s_owed")
    stream = receiving.Stream(pg.dsn, "s_owed", "pub")
    msgs = _drain(stream, upto)
    ends = sorted(pgoutput.decode(m).end_lsn for m in msgs if m[:1] == b"C")  # type: ignore[union-attr]
    stream.confirm(ends[0], force=True)
    stream.confirm(ends[-1])  # within CONFIRM_INTERVAL of the last update: held back
    stream.close()
    (flushed,) = pg.query("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 's_owed'")[0]
    assert pgoutput.parse_lsn(flushed) == ends[-1]


def _table(t: str, rows: int, value: str = "'v'") -> str:
    """A table (id, v) of ``rows`` rows."""
    return f"CREATE TABLE {t} (id int PRIMARY KEY, v text); INSERT INTO {t} SELECT g, {value} FROM generate_series(1, {rows}) g"


# one transaction: changes, a schema change (a partial commit when replayed), more changes
_SCHEMA_CHANGE_MID_TXN = ("BEGIN; UPDATE {t} SET v = 'a' WHERE id <= 10; ALTER TABLE {t} ADD COLUMN w int;"
                          "UPDATE {t} SET w = 1 WHERE id <= 20; COMMIT")


def _hundreds(table: str, n: int) -> list[str]:
    """``n`` transactions updating 100 rows each."""
    return [f"UPDATE {table} SET v = 'u{k}' WHERE id BETWEEN {k * 100 + 1} AND {k * 100 + 100}" for k in range(n)]


def _record(pg: helpers.Source, slot: str, publication: str, per_read: int) -> tuple[list[tuple[list[bytes], int]], int]:
    """The slot's stream up to the flushed WAL, as (messages, wal_end) reads for ``receiving.Recorded``."""
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        upto = replication.wait_flushed(conn)
    stream = receiving.Stream(pg.dsn, slot, publication)
    reads: list[tuple[list[bytes], int]] = []
    try:
        while not reads or reads[-1][0] or reads[-1][1] < upto:
            reads.append((stream.read(per_read, 0.1), stream.wal_end))
            stream.request_status()
    finally:
        stream.close()
    # the last read with changes already shows the end: a --once run must see it then, not
    # after an empty poll
    while not reads[-1][0]:
        reads.pop()
    reads[-1] = (reads[-1][0], max(upto, reads[-1][1]))
    return reads, upto


@dataclasses.dataclass
class _Replay:
    """Tables synced into a copy (``live``; ``path`` is a copy of it to replay into), then
    changes recorded from a slot of their own, up to ``upto``."""

    pg: helpers.Source
    res: syncing.Result
    live: str
    path: str
    reads: list[tuple[list[bytes], int]]
    upto: int

    def stream(
        self, target: duckfile.DuckTarget, control: psycopg.Connection, *,  # type: ignore[type-arg]
        open_stream: Callable[[], receiving.Source] | None = None, **kw: Any,
    ) -> streaming.ChangeStream:
        """A ChangeStream over the recorded changes (or ``open_stream``) into ``target``."""
        return streaming.ChangeStream(
            dsn=self.pg.dsn, control=control, target=target, slot=self.res.slot, publication=self.res.publication,
            states=target.table_states(), open_stream=open_stream or (lambda: receiving.Recorded(self.reads, self.upto)),
            **kw,
        )


def _replay(pg: helpers.Source, tmp_path: Path, setup: str, tables: tuple[str, ...], changes: Iterable[str],
            per_read: int) -> _Replay:
    """Run ``setup``, sync ``tables``, then record ``changes`` (one transaction each)."""
    pg.execute(setup)
    live, path = str(tmp_path / "live.duckdb"), str(tmp_path / "replayed.duckdb")
    res = helpers.sync_once(pg, live, *tables)
    shutil.copy(live, path)
    slot = f"s_rec_{tables[0]}"
    pg.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    for sql in changes:
        pg.execute(sql)
    reads, upto = _record(pg, slot, res.publication, per_read)
    return _Replay(pg, res, live, path, reads, upto)


def test_a_recorded_stream_replays_into_the_copy(pg: helpers.Source, tmp_path: Path) -> None:
    """The apply takes its stream injected: changes recorded from a slot and played back land exactly."""
    rec = _replay(
        pg, tmp_path, _table("r", 500, "'v' || g"),
        ("r",), ["UPDATE r SET v = v || '!' WHERE id % 2 = 0; DELETE FROM r WHERE id % 5 = 0; "
                 "INSERT INTO r SELECT g, 'n' FROM generate_series(501, 700) g"], 1000,
    )
    target = duckfile.DuckTarget(rec.path)
    started = time.monotonic()
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as control:
            stats = rec.stream(target, control, poll_seconds=30).run(rec.upto, threading.Event())
    finally:
        target.close()
    assert time.monotonic() - started < 10
    assert stats.changes == 250 + 100 + 200
    assert stats.first_read_at is not None and stats.last_applied_at is not None
    assert started < stats.first_read_at <= stats.last_applied_at
    assert helpers.assert_same(pg, rec.path, "r") == 600


class _Confirming(receiving.Recorded):
    """A recorded stream that notes what is confirmed to it, and when."""

    def __init__(self, reads: list[tuple[list[bytes], int]], end: int, log: list[tuple[str, int]]) -> None:
        super().__init__(reads, end)
        self.log = log

    def confirm(self, lsn: int, *, force: bool = False) -> None:
        self.log.append(("confirm", lsn))


def test_batches_commit_while_the_next_is_folded_and_are_confirmed_after(
    pg: helpers.Source, tmp_path: Path, monkeypatch: object
) -> None:
    """A batch commits in a thread of its own while the loop reads on; its LSN reaches the slot
    only after its commit (a crash in between resends it, never loses it)."""
    rec = _replay(
        pg, tmp_path, _table("piped", 3000),
        ("piped",), _hundreds("piped", 30), 50,  # 30 transactions of 100 changes
    )
    log: list[tuple[str, int]] = []
    target = duckfile.DuckTarget(rec.path)
    real_write, real_commit = target.write_checkpoint, target.commit
    written: list[int] = []

    def write_checkpoint(slot: str, lsn: int, *args: object) -> None:
        log.append(("checkpoint", 0))  # the batch is applied: its checkpoint, then its commit
        time.sleep(0.05)  # a slow commit: the loop folds on meanwhile
        written.append(lsn)
        real_write(slot, lsn, *args)  # type: ignore[arg-type]

    def commit() -> None:
        real_commit()
        log.append(("committed", written[-1] if written else 0))

    real_fold = applying.fold_changes

    def fold(*args: object) -> tuple[int, int]:
        out = real_fold(*args)  # type: ignore[arg-type]
        if out[1]:
            log.append(("fold", out[1]))
        return out

    real_commit_batch = streaming.ChangeStream._commit

    def commit_batch(self: streaming.ChangeStream, *args: object) -> None:
        real_commit_batch(self, *args)  # type: ignore[arg-type]
        log.append(("in flight", 0))  # handed to the committing thread (or done, if it were inline)

    monkeypatch.setattr(applying, "fold_changes", fold)  # type: ignore[attr-defined]
    monkeypatch.setattr(streaming.ChangeStream, "_commit", commit_batch)  # type: ignore[attr-defined]
    target.write_checkpoint = write_checkpoint  # type: ignore[method-assign]
    target.commit = commit  # type: ignore[method-assign]
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as control:
            stats = rec.stream(
                target, control, open_stream=lambda: _Confirming(rec.reads, rec.upto, log), poll_seconds=0.05,
                batch_changes=300, max_batch_seconds=5,
            ).run(rec.upto, threading.Event())
    finally:
        target.close()
    assert stats.changes == 3000 and stats.batches > 3
    last = max(lsn for what, lsn in log if what == "committed")
    durable = 0
    for what, lsn in log:
        if what == "committed":
            durable = max(durable, lsn)
        elif what == "confirm":
            # never past a batch not yet committed (past the last change, once all is committed:
            # WAL with nothing for us, which the slot may skip)
            assert lsn <= durable or durable == last, (lsn, durable)
    folded_while_committing = False
    handed = committed = 0
    for what, _ in log:
        handed += what == "in flight"
        committed += what == "committed"
        folded_while_committing |= what == "fold" and committed < handed
    assert folded_while_committing, log
    assert helpers.assert_same(pg, rec.path, "piped") == 3000


def test_small_transactions_are_applied_in_the_commit_thread_large_ones_in_pieces(
    pg: helpers.Source, tmp_path: Path, monkeypatch: object
) -> None:
    """A batch of small transactions that reaches batch_changes is applied by the committing thread
    (not in the loop just before its last Commit); a transaction of more than twice that is applied
    in pieces inside its still-open DuckDB transaction, and commits whole."""
    rec = _replay(
        pg, tmp_path, _table("pieces", 3000),
        ("pieces",),
        # 9 transactions of 100 changes (three batches of 300), then one transaction of 2000 changes
        [*_hundreds("pieces", 9), "UPDATE pieces SET v = 'big' WHERE id > 1000"], 50,
    )
    applied: list[tuple[str, int]] = []
    real_apply = applying.TableApplier.apply

    def apply(self: applying.TableApplier, pending: dict[object, object], has_unchanged: bool) -> int:
        applied.append((threading.current_thread().name, len(pending)))
        return real_apply(self, pending, has_unchanged)  # type: ignore[arg-type]

    monkeypatch.setattr(applying.TableApplier, "apply", apply)  # type: ignore[attr-defined]
    target = duckfile.DuckTarget(rec.path)
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as control:
            stats = rec.stream(target, control, poll_seconds=0.05, batch_changes=300, max_batch_seconds=5).run(
                rec.upto, threading.Event())
    finally:
        target.close()
    assert stats.changes == 2900
    in_loop = [n for name, n in applied if not name.startswith("datasync-commit")]
    assert in_loop and all(n == 600 for n in in_loop), applied  # only the large transaction, in pieces of 2 x 300
    assert sum(in_loop) < 2000
    assert sum(n for _, n in applied) == 2900 == stats.applied_rows
    assert helpers.assert_same(pg, rec.path, "pieces") == 3000


def test_a_failed_partial_commit_reports_its_own_error(pg: helpers.Source, tmp_path: Path) -> None:
    """A commit that fails mid-transaction (at a schema change) surfaces as itself, not as the
    rollback of a transaction that DuckDB already rolled back; a rerun applies everything."""
    rec = _replay(pg, tmp_path, _table("pc", 100), ("pc",), [_SCHEMA_CHANGE_MID_TXN.format(t="pc")], 50)
    target = duckfile.DuckTarget(rec.path)
    real_commit = target.commit

    def failing_commit() -> None:  # as DuckDB's own failed COMMIT: the transaction is gone
        target.rollback()
        raise RuntimeError("commit refused")

    target.commit = failing_commit  # type: ignore[method-assign]
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as control:
            with pytest.raises(RuntimeError, match="commit refused"):
                rec.stream(target, control, poll_seconds=0.05).run(rec.upto, threading.Event())
            target.commit = real_commit  # type: ignore[method-assign]
            rec.stream(target, control, poll_seconds=0.05).run(rec.upto, threading.Event())
    finally:
        target.close()
    assert helpers.assert_same(pg, rec.path, "pc") == 100


def test_a_pin_before_a_partly_applied_transaction_is_missed_after_a_restart(
    pg: helpers.Source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop in the middle of a transaction leaves its changes before a schema change committed
    (a partial checkpoint).  After the restart, the copy holds part of that transaction, so a pin
    at or before its commit cannot be served: it is missed (and asked again), never served on a
    copy that is past it."""
    rec = _replay(pg, tmp_path, _table("pp", 100), ("pp",), [_SCHEMA_CHANGE_MID_TXN.format(t="pp")], 50)
    msgs = [m for batch, _ in rec.reads for m in batch]
    begin = next(pgoutput.decode(m) for m in msgs if m[:1] == b"B")
    assert isinstance(begin, pgoutput.Begin)
    final = begin.final_lsn
    without_commit = [(msgs[:-1], 0)]  # the transaction stops arriving before its Commit
    target = duckfile.DuckTarget(rec.path)
    monkeypatch.setattr(streaming, "STOP_GRACE_SECONDS", 0.2)
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as control:
            stopped = threading.Event()
            stopped.set()  # stop at once: the open transaction is left after the grace period
            cut = receiving.Recorded(without_commit, 0)
            rec.stream(target, control, open_stream=lambda: cut, poll_seconds=0.05).run(None, stopped)
            assert target.checkpoint(rec.res.slot)[1] == final  # its first part is committed
            pins = pinning.Pins()
            outcome: list[object] = []
            with pins.holding(5):  # the restarted writer waits before the transaction starts again
                restarted = rec.stream(target, control, poll_seconds=0.05, pins=pins)
                t = threading.Thread(target=lambda: restarted.run(rec.upto, threading.Event()))
                t.start()
                assert pins.wait_serving(10)
                pin = pins.post(final, lambda tgt: "served")
            try:
                outcome.append(pins.wait(pin, 10))
            except pinning.Missed as exc:
                outcome.append(exc)
            t.join()
    finally:
        target.close()
    assert isinstance(outcome[0], pinning.Missed), outcome
    assert helpers.assert_same(pg, rec.path, "pp") == 100
