"""The CDC loop: receive committed transactions, apply, checkpoint, confirm.

Exactly-once in effect (DESIGN.md §3): a batch of whole transactions is applied
in one DuckDB transaction that also stores the batch's end LSN; only after that
commit is the LSN confirmed to the walsender (which then may drop the WAL).
After a crash or reconnect the walsender resends from the confirmed position
and transactions whose commit LSN is below the stored LSN are skipped, so
nothing is lost or applied twice.  A table snapshotted at LSN S skips changes
committed before S: its snapshot already holds them.

Runs of ordinary row changes are folded by one C call (``applying.fold_changes``)
instead of a Python call per change; everything else (transaction boundaries,
Relation, Truncate, key changes, unchanged TOAST) goes through the loop below.

A batch is applied and committed by a thread of its own while the loop folds
the next one (the MERGE is most of the apply, and DuckDB runs it without the
GIL): the walsender, the fold and DuckDB then work at once.  One batch is in
flight at a time, committed in order, its LSN confirmed only after its commit.
Anything else the loop does with the target first waits for that commit.

Large transactions are applied in pieces inside the still-open DuckDB
transaction, so memory stays bounded while the commit stays atomic.  A schema
change mid-transaction commits a *partial* checkpoint (commit LSN + number of
the transaction's changes applied), which a restart honours exactly.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from datasync import identifiers
from datasync.engine import applying, pgoutput, pinning
from datasync.sources import connecting, receiving, replication
from datasync.targets import duckfile

log = logging.getLogger(__name__)

decode_change = pgoutput.decode_change
READ_MESSAGES = 10_000  # messages taken from the read-ahead at a time
STOP_GRACE_SECONDS = 5.0  # on SIGTERM, how long to wait for a transaction still arriving
# Folded changes are hundreds of thousands of young lists: Python's cyclic
# collector rescans them over and over while a batch grows (~15% of CDC time).
# The loop turns it off and collects between batches: the young generations at
# most once a second (milliseconds), everything at most once a minute.
GC_INTERVAL_SECONDS = 1.0
GC_FULL_INTERVAL_SECONDS = 60.0
# When the stream is idle with this much WAL in the target, it checkpoints: in a pause,
# not inside the commit of a batch that is holding the stream up (see duckfile.CHECKPOINT_MIN).
IDLE_CHECKPOINT_BYTES = 16 << 20


@dataclasses.dataclass
class Stats:
    transactions: int = 0
    changes: int = 0
    applied_rows: int = 0
    batches: int = 0
    applied_lsn: int = 0
    last_commit_ts_us: int | None = None
    lag_seconds: float | None = None
    lag_bytes: int = 0
    confirmed_lsn: int = 0  # the slot's position: past applied_lsn when idle WAL was skipped
    started: float = dataclasses.field(default_factory=time.monotonic)
    # monotonic times: the first message read from the slot, the latest commit that applied changes
    # (between the two: the apply rate as the benchmark defines it, without start-up and the final checkpoint)
    first_read_at: float | None = None
    last_applied_at: float | None = None
    # the latest per-batch lags (bounded: --follow runs for months)
    lag_samples: collections.deque[float] = dataclasses.field(default_factory=lambda: collections.deque(maxlen=10_000))


class ChangeStream:
    def __init__(
        self,
        *,
        dsn: str,
        control: connecting.Connection,
        target: duckfile.DuckTarget,
        slot: str,
        publication: str,
        states: dict[identifiers.TableName, duckfile.TableState],
        batch_changes: int = 50_000,
        max_batch_seconds: float = 0.5,
        poll_seconds: float = 0.1,
        on_batch: Callable[[Stats], None] | None = None,
        pins: pinning.Pins | None = None,
        open_stream: Callable[[], receiving.Source] | None = None,
    ) -> None:
        self.dsn = dsn
        # how the stream is opened: the slot by default; a recorded stream to
        # measure or test the apply alone (injected, not monkeypatched)
        self.open_stream = open_stream or (lambda: receiving.Stream(dsn, slot, publication))
        self.control = control
        self.target = target
        self.slot = slot
        self.publication = publication
        self.appliers = {
            name: applying.TableApplier(st, target.con, control, self._commit_partial) for name, st in states.items()
        }
        self.by_relid: dict[int, applying.TableApplier | None] = {}
        self.batch_changes = batch_changes
        # A batch commits at the first transaction end past batch_changes; only a transaction
        # that itself brings a table's pending changes to twice that is applied in pieces (in
        # the loop).  With the piece size at batch_changes, a batch of small transactions got
        # there at its last change, just before its Commit, and was applied in the loop instead
        # of the committing thread: no folding meanwhile.
        self.piece_changes = 2 * batch_changes
        self.max_batch_seconds = max_batch_seconds
        self.poll_seconds = poll_seconds
        self.on_batch = on_batch
        self.pins = pins
        applied, self._partial_final, self._partial_changes = target.checkpoint(slot)
        self.stats = Stats(applied_lsn=applied, confirmed_lsn=applied)
        self._final_lsn = 0
        self._txn_index = 0  # data messages seen in the current transaction
        self._stream: receiving.Prefetched | None = None
        self.confirmed = 0  # the highest position confirmed to the slot (this object's streams)
        self._last_lag = 0.0
        self._collected = self._collected_all = 0.0  # when the loop last ran the cyclic garbage collector
        # commit LSN of the latest transaction in the target (at least: everything before the checkpoint)
        # (a transaction partly committed before a restart is in the target too: a pin at or
        # before its commit was missed)
        self._last_begun = max(0, applied - 1, self._partial_final)
        self._txn_open = False  # a DuckDB transaction is open for the loop (begun when first needed)
        self._last_end = applied  # end LSN of the latest whole transaction received
        self._committer: concurrent.futures.ThreadPoolExecutor | None = None
        self._in_flight: concurrent.futures.Future[tuple[int, int, int | None, float, float]] | None = None

    # -- the loop --------------------------------------------------------------
    def run(self, until: int | None, stop: threading.Event) -> Stats:
        """Stream until ``until`` is reached (``--once``) or ``stop`` is set (``--follow``)."""
        stream = self._stream = receiving.Prefetched(self.open_stream(), poll=self.poll_seconds)
        in_txn = False
        skip_txn = False
        skip_upto = 0
        final_lsn = 0
        open_batch = False  # a batch is open (its DuckDB transaction is begun when first needed)
        done_txns = 0  # complete transactions in the open DuckDB transaction
        batch_changes = 0
        counted = 0  # of batch_changes, already added to stats.changes
        batch_started = time.monotonic()
        last_end, last_ts = 0, None
        applied = self.stats.applied_lsn
        stopping_since: float | None = None
        pins = self.pins
        if pins is not None:
            pins.open()
        fold = applying.fold_changes
        fast: dict[int, applying.FoldSpec] | None = None  # relid -> fold spec, for the current transaction
        collecting = gc.isenabled()
        gc.disable()
        self._collected = self._collected_all = time.monotonic()
        self._committer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="datasync-commit")
        ended = False
        try:
            while True:
                self._settle(wait=False)
                msgs = stream.read(READ_MESSAGES, self.poll_seconds)
                i, nmsgs = 0, len(msgs)
                if nmsgs and self.stats.first_read_at is None:
                    self.stats.first_read_at = time.monotonic()
                while i < nmsgs:
                    if in_txn and not skip_txn and self._txn_index >= skip_upto:
                        # the hot path: runs of ordinary changes folded in one call
                        if fast is None:
                            fast = self._fast_tables(final_lsn)
                        if fast:
                            j, folded = fold(msgs, i, fast, self.piece_changes)
                            if folded:
                                self._txn_index += folded
                                batch_changes += folded
                                for pending, _ in fast.values():
                                    if len(pending) >= self.piece_changes:
                                        self._flush_full()
                                        break
                            if j > i:
                                i = j
                                continue
                    data = msgs[i]
                    i += 1
                    change = decode_change(data)
                    if change is not None:  # what the fold left: key changes, unchanged TOAST, new layouts
                        if skip_txn:
                            continue
                        self._txn_index += 1
                        if self._txn_index <= skip_upto:
                            continue  # applied before a restart, in a partly committed transaction
                        tag, relid, new, old, old_is_key_only, unchanged = change
                        ap = self.by_relid.get(relid)
                        if ap is None or final_lsn < ap.state.snapshot_lsn:
                            continue
                        if not ap.layout_checked:
                            fast = None  # checked below: its changes can be folded from now on
                        if tag == 0x49:
                            ap.insert(new)
                        elif tag == 0x55:
                            ap.update(new, old, unchanged, old_is_key_only)
                        else:
                            ap.delete(old)
                        batch_changes += 1
                        if len(ap.pending) >= self.piece_changes:
                            self._flush_full()
                        continue
                    msg = pgoutput.decode(data)
                    if isinstance(msg, pgoutput.Begin):
                        in_txn = True
                        fast = None
                        final_lsn = self._final_lsn = msg.final_lsn
                        skip_txn = final_lsn < applied
                        self._txn_index = 0
                        skip_upto = self._partial_changes if final_lsn == self._partial_final else 0
                        if pins is not None and not skip_txn:
                            pins.wait_if_held()
                            wanted = pins.wanted()
                            if wanted is not None and wanted <= final_lsn:
                                # a pin lies before this transaction: the target must be exactly there
                                if open_batch:
                                    self._commit(last_end, last_ts)
                                    open_batch, done_txns, batch_changes, counted = False, 0, 0, 0
                                self._settle(wait=True)
                                pins.serve(self.target, final_lsn, self._last_begun)
                        if not skip_txn:
                            self._last_begun = final_lsn
                        if not open_batch and not skip_txn:
                            open_batch, batch_started = True, time.monotonic()
                    elif isinstance(msg, pgoutput.Commit):
                        in_txn = False
                        last_end, last_ts = msg.end_lsn, msg.commit_ts_us
                        self._last_end = max(self._last_end, last_end)
                        if skip_txn:
                            if not open_batch:
                                stream.confirm(max(applied, last_end))
                            continue
                        done_txns += 1
                        self.stats.transactions += 1
                        self.stats.changes += batch_changes - counted
                        counted = batch_changes
                        if batch_changes >= self.batch_changes or time.monotonic() - batch_started >= self.max_batch_seconds:
                            self._commit(last_end, last_ts)
                            open_batch, done_txns, batch_changes, counted = False, 0, 0, 0
                    elif isinstance(msg, pgoutput.Relation):
                        fast = None
                        ap = self.appliers.get(identifiers.TableName(msg.namespace, msg.name))
                        self.by_relid[msg.relid] = ap
                        if ap is not None:
                            ap.on_relation(msg)
                    elif isinstance(msg, pgoutput.Truncate) and not skip_txn:
                        if self._count_change() <= skip_upto:
                            continue  # applied before a restart, in a partly committed transaction
                        for relid in msg.relids:
                            ap = self.by_relid.get(relid)
                            if ap is not None and final_lsn >= ap.state.snapshot_lsn:
                                self._duck()
                                ap.truncate()
                        batch_changes += 1
                if stop.is_set() and stopping_since is None:
                    stopping_since = time.monotonic()
                if in_txn:
                    if stopping_since is not None and time.monotonic() - stopping_since > STOP_GRACE_SECONDS:
                        break  # a huge transaction is still arriving: leave it for the next run
                    continue
                # between transactions: commit the batch when due, check the exit conditions
                due = time.monotonic() - batch_started >= self.max_batch_seconds
                reached = until is not None and stream.wal_end >= until
                # caught up: commit, unless the batch before is still committing (then this one
                # grows until it is done: fewer, larger MERGEs while changes keep coming)
                caught_up = not msgs and (self._in_flight is None or self._in_flight.done())
                if open_batch and done_txns and (caught_up or due or reached or stopping_since is not None):
                    self._commit(last_end, last_ts)
                    open_batch, done_txns, batch_changes, counted = False, 0, 0, 0
                if stopping_since is not None or reached:
                    break
                if msgs:
                    if until is not None and nmsgs < READ_MESSAGES:
                        # caught up with what arrived: ask how far the server has sent now, so the
                        # end of a --once run is seen without waiting out an empty poll
                        stream.request_status()
                    continue
                if pins is not None and (wanted := pins.wanted()) is not None:
                    if stream.wal_end >= wanted:  # every transaction committed before the pin is applied
                        if open_batch:
                            self._commit(last_end, last_ts)
                            open_batch, done_txns, batch_changes, counted = False, 0, 0, 0
                        self._settle(wait=True)
                        pins.serve(self.target, stream.wal_end, self._last_begun)
                    else:
                        stream.request_status()
                if until is not None:
                    stream.request_status()
                else:
                    if not open_batch:
                        self._confirm_idle(stream, None, force=False)  # WAL of other tables must not pile up
                    self._idle()
            self._settle(wait=True)
            if not in_txn and not open_batch:
                self._confirm_idle(stream, until)
            ended = True
        finally:
            try:
                self._settle(wait=True)  # the batch in flight commits (or fails) before anything else
            except BaseException:
                if ended:
                    raise
                log.warning("the batch in flight failed too as the stream stopped", exc_info=True)
            finally:
                self._committer.shutdown()
                self._committer = None
                if collecting:
                    gc.enable()
                for ap in self.appliers.values():
                    ap.pending.clear()
                    ap.has_unchanged = False
                try:
                    if pins is not None:
                        pins.close()
                    if self._txn_open:
                        self._txn_open = False
                        self._rollback()  # only an unfinished transaction remains; it is resent
                finally:
                    self.confirmed = max(self.confirmed, stream.confirmed)
                    stream.close()  # whatever failed: the slot must not stay held by this process
                    self._stream = None
        self._lag()
        return self.stats

    def _fast_tables(self, final_lsn: int) -> dict[int, applying.FoldSpec]:
        """The tables whose changes in the transaction at ``final_lsn`` the fold may take."""
        fast = {}
        for relid, ap in self.by_relid.items():
            if ap is not None and final_lsn >= ap.state.snapshot_lsn:
                spec = ap.fold_spec()
                if spec is not None:
                    fast[relid] = spec
        return fast

    def _flush_full(self) -> None:
        for ap in self.appliers.values():
            if len(ap.pending) >= self.piece_changes:
                self._duck()
                self.stats.applied_rows += ap.flush()

    def _idle(self) -> None:
        self._collect()
        # idle polls come every poll_seconds; lag needs two queries and the WAL a stat: once a second is plenty
        now = time.monotonic()
        if now - self._last_lag < 1.0:
            return
        self._last_lag = now
        self._settle(wait=True)
        if self.target.wal_bytes() >= IDLE_CHECKPOINT_BYTES:
            self.target.flush_wal()
        self._lag()
        if self.on_batch:
            self.on_batch(self.stats)

    def _confirm_idle(self, stream: receiving.Prefetched, until: int | None, *, force: bool = True) -> None:
        """Everything sent was applied: let the slot move past WAL with no changes for us."""
        self._settle(wait=True)  # not before the batch in flight is committed
        pos = max(self.stats.applied_lsn, min(stream.wal_end, until) if until is not None else stream.wal_end)
        stream.confirm(pos, force=force)
        self.stats.confirmed_lsn = pos

    # -- commits ---------------------------------------------------------------
    def _count_change(self) -> int:
        self._txn_index += 1
        return self._txn_index

    def _duck(self) -> None:
        """Before the loop itself uses the target: the batch in flight is committed, a transaction open."""
        self._settle(wait=True)
        if not self._txn_open:
            self.target.begin()
            self._txn_open = True

    def _commit_partial(self) -> None:
        """Commit mid-transaction: everything before the current change is durable."""
        self._duck()
        for ap in self.appliers.values():
            self.stats.applied_rows += ap.flush()
        done = self._txn_index - 1
        # the whole transactions of the open batch commit with it: a restart must skip them
        lsn = max(self.stats.applied_lsn, self._last_end)
        self.target.write_checkpoint(self.slot, lsn, None, (self._final_lsn, done))
        self.target.commit()
        self.stats.applied_lsn = lsn
        self._partial_final, self._partial_changes = self._final_lsn, done
        self.target.begin()

    def _commit(self, end_lsn: int, commit_ts: int | None) -> None:
        """Hand the batch to the committing thread (after the one in flight) and go on folding."""
        detached = [(ap, ap.detach()) for ap in self.appliers.values() if ap.pending]
        begun, self._txn_open = self._txn_open, False  # the open transaction, if any, goes with the batch
        self._partial_final = self._partial_changes = 0
        self._settle(wait=True)
        lsn = max(end_lsn, self.stats.applied_lsn)
        assert self._committer is not None
        self._in_flight = self._committer.submit(self._committing, detached, begun, lsn, commit_ts)

    def _committing(
        self, detached: list[tuple[applying.TableApplier, Any]], begun: bool, lsn: int, commit_ts: int | None
    ) -> tuple[int, int, int | None, float, float]:
        """In the committing thread: apply a batch, store its LSN, commit, confirm.

        Returns (rows applied, LSN, commit timestamp, monotonic and wall time of the commit)."""
        try:
            if not begun:
                self.target.begin()
            rows = sum(ap.apply(*pending) for ap, pending in detached)
            self.target.write_checkpoint(self.slot, lsn, commit_ts)
            self.target.commit()
        except BaseException:
            self._rollback()
            raise
        if self._stream is not None:
            self._stream.confirm(lsn)
        return rows, lsn, commit_ts, time.monotonic(), time.time()

    def _rollback(self) -> None:
        """Roll the target back after a failure; a rollback that fails too (a failed COMMIT has
        rolled back already) is logged: the first error is the one to report."""
        try:
            self.target.rollback()
        except Exception:
            log.warning("rolling back the open DuckDB transaction failed", exc_info=True)

    def _settle(self, *, wait: bool) -> None:
        """Account for the batch in flight once committed (``wait``: wait for it); raises its error."""
        future = self._in_flight
        if future is None or not (wait or future.done()):
            return
        self._in_flight = None
        rows, lsn, commit_ts, committed_at, committed_wall = future.result()
        self.stats.applied_rows += rows
        self.stats.applied_lsn = self.stats.confirmed_lsn = max(lsn, self.stats.applied_lsn)
        self.stats.batches += 1
        self.stats.last_applied_at = committed_at
        if commit_ts is not None:
            self.stats.last_commit_ts_us = commit_ts
            lag = committed_wall - (commit_ts + pgoutput.PG_EPOCH_US) / 1e6
            self.stats.lag_seconds = max(0.0, lag)
            self.stats.lag_samples.append(self.stats.lag_seconds)
        if self.on_batch:
            self.on_batch(self.stats)
        self._collect()

    def _collect(self) -> None:
        """Run the cyclic collector if it is due (between batches: the folded changes are gone)."""
        now = time.monotonic()
        if now - self._collected_all >= GC_FULL_INTERVAL_SECONDS:
            gc.collect()
            self._collected = self._collected_all = now
        elif now - self._collected >= GC_INTERVAL_SECONDS:
            gc.collect(1)
            self._collected = now

    def _lag(self) -> None:
        cur = replication.current_lsn(self.control)
        info = replication.slot_info(self.control, self.slot)
        confirmed = info.confirmed_flush if info else self.stats.applied_lsn
        self.stats.confirmed_lsn = max(self.stats.confirmed_lsn, confirmed)
        self.stats.lag_bytes = max(0, cur - max(self.stats.confirmed_lsn, self.stats.applied_lsn))
        if self.stats.lag_bytes == 0:
            self.stats.lag_seconds = 0.0
