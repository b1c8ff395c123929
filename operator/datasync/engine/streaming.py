"""The CDC loop: read committed transactions from the slot, apply, checkpoint, advance.

Exactly-once in effect (DESIGN.md §3): a batch of whole transactions is applied
in one DuckDB transaction that also stores the batch's end LSN; only after that
commit is the slot advanced.  After a crash the slot replays from its last
confirmed position and transactions whose commit LSN is below the stored LSN
are skipped, so nothing is lost or applied twice.  A table snapshotted at LSN S
skips changes committed before S: its snapshot already holds them.

Large transactions are applied in pieces inside the still-open DuckDB
transaction, so memory stays bounded while the commit stays atomic.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from datasync import identifiers
from datasync.engine import applying, pgoutput
from datasync.sources import replication
from datasync.targets import duckfile

log = logging.getLogger(__name__)


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
    lag_samples: list[float] = dataclasses.field(default_factory=list)


class ChangeStream:
    def __init__(
        self,
        *,
        source: psycopg.Connection[Any],
        control: psycopg.Connection[Any],
        target: duckfile.DuckTarget,
        slot: str,
        publication: str,
        states: dict[identifiers.TableName, duckfile.TableState],
        batch_changes: int = 50_000,
        max_batch_seconds: float = 0.5,
        poll_seconds: float = 0.1,
        on_batch: Callable[[Stats], None] | None = None,
    ) -> None:
        self.source = source
        self.control = control
        self.target = target
        self.slot = slot
        self.publication = publication
        self.appliers = {
            name: applying.TableApplier(st, target.con, control, self._commit_partial) for name, st in states.items()
        }
        self.by_relid: dict[int, applying.TableApplier | None] = {}
        self.batch_changes = batch_changes
        self.max_batch_seconds = max_batch_seconds
        self.poll_seconds = poll_seconds
        self.on_batch = on_batch
        applied, self._partial_final, self._partial_changes = target.checkpoint(slot)
        self.stats = Stats(applied_lsn=applied)
        self._final_lsn = 0
        self._txn_index = 0  # data messages seen in the current transaction

    # -- one pass over the slot ------------------------------------------------
    def _round(self, upto: int) -> bool:
        """Process everything committed up to ``upto``; True if anything was read."""
        applied = self.stats.applied_lsn
        seen = False
        pending = 0
        batch_started = time.monotonic()
        last_end = 0
        last_ts: int | None = None
        skip_txn = False
        final_lsn = 0
        skip_upto = 0
        self.target.begin()
        try:
            for data in replication.peek(self.source, self.slot, self.publication, upto, self.batch_changes):
                seen = True
                msg = pgoutput.decode(data)
                if isinstance(msg, pgoutput.Begin):
                    final_lsn = self._final_lsn = msg.final_lsn
                    skip_txn = final_lsn < applied
                    self._txn_index = 0
                    skip_upto = self._partial_changes if final_lsn == self._partial_final else 0
                elif isinstance(msg, pgoutput.Commit):
                    last_end, last_ts = msg.end_lsn, msg.commit_ts_us
                    self.stats.transactions += 0 if skip_txn else 1
                    if pending >= self.batch_changes or time.monotonic() - batch_started >= self.max_batch_seconds:
                        self._commit(last_end, last_ts)
                        self.target.begin()
                        pending, batch_started = 0, time.monotonic()
                elif isinstance(msg, pgoutput.Relation):
                    ap = self.appliers.get(identifiers.TableName(msg.namespace, msg.name))
                    self.by_relid[msg.relid] = ap
                    if ap is not None:
                        ap.on_relation(msg)
                elif skip_txn:
                    continue
                elif isinstance(msg, (pgoutput.Insert, pgoutput.Update, pgoutput.Delete, pgoutput.Truncate)) and (
                    self._count_change() <= skip_upto
                ):
                    continue  # applied before a restart, in a partly committed transaction
                elif isinstance(msg, (pgoutput.Insert, pgoutput.Update, pgoutput.Delete)):
                    ap = self.by_relid.get(msg.relid)
                    if ap is None or final_lsn < ap.state.snapshot_lsn:
                        continue
                    if isinstance(msg, pgoutput.Insert):
                        ap.insert(msg.new)
                    elif isinstance(msg, pgoutput.Update):
                        ap.update(msg.new, msg.old)
                    else:
                        ap.delete(msg.old)
                    pending += 1
                    self.stats.changes += 1
                    if len(ap.pending) >= self.batch_changes:
                        ap.flush()
                elif isinstance(msg, pgoutput.Truncate):
                    for relid in msg.relids:
                        ap = self.by_relid.get(relid)
                        if ap is not None and final_lsn >= ap.state.snapshot_lsn:
                            ap.truncate()
                            pending += 1
                            self.stats.changes += 1
            if last_end:
                self._commit(last_end, last_ts)
            else:
                self.target.rollback()
        except BaseException:
            self.target.rollback()
            for ap in self.appliers.values():
                ap.pending.clear()
                ap.has_unchanged = False
            raise
        return seen

    def _count_change(self) -> int:
        self._txn_index += 1
        return self._txn_index

    def _commit_partial(self) -> None:
        """Commit mid-transaction: everything before the current change is durable."""
        for ap in self.appliers.values():
            self.stats.applied_rows += ap.flush()
        done = self._txn_index - 1
        self.target.write_checkpoint(self.slot, self.stats.applied_lsn, None, (self._final_lsn, done))
        self.target.commit()
        self._partial_final, self._partial_changes = self._final_lsn, done
        self.target.begin()

    def _commit(self, end_lsn: int, commit_ts: int | None) -> None:
        for ap in self.appliers.values():
            self.stats.applied_rows += ap.flush()
        lsn = max(end_lsn, self.stats.applied_lsn)
        self.target.write_checkpoint(self.slot, lsn, commit_ts)
        self.target.commit()
        self._partial_final = self._partial_changes = 0
        self.stats.applied_lsn = lsn
        self.stats.batches += 1
        replication.advance(self.control, self.slot, lsn)
        if commit_ts is not None:
            self.stats.last_commit_ts_us = commit_ts
            lag = time.time() - (commit_ts + pgoutput.PG_EPOCH_US) / 1e6
            self.stats.lag_seconds = max(0.0, lag)
            self.stats.lag_samples.append(self.stats.lag_seconds)
        if self.on_batch:
            self.on_batch(self.stats)

    # -- drivers ---------------------------------------------------------------
    def run_until(self, upto: int) -> Stats:
        """Apply everything committed up to ``upto`` (``--once``)."""
        while self._round(upto):
            pass
        replication.advance(self.control, self.slot, upto)
        self._lag()
        return self.stats

    def follow(self, stop: threading.Event) -> Stats:
        """Stream until ``stop`` is set; the batch in flight is finished first."""
        while not stop.is_set():
            upto = replication.flushed_lsn(self.control)
            if not self._round(upto):
                replication.advance(self.control, self.slot, upto)
                self._lag()
                if self.on_batch:
                    self.on_batch(self.stats)
                stop.wait(self.poll_seconds)
        return self.stats

    def _lag(self) -> None:
        cur = replication.current_lsn(self.control)
        info = replication.slot_info(self.control, self.slot)
        confirmed = info.confirmed_flush if info else self.stats.applied_lsn
        self.stats.confirmed_lsn = confirmed
        self.stats.lag_bytes = max(0, cur - max(confirmed, self.stats.applied_lsn))
        if self.stats.lag_bytes == 0:
            self.stats.lag_seconds = 0.0
