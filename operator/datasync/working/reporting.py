"""The engine's reporter for the worker: remembers progress for the status publisher.

The engine calls it from its own thread; the control loop reads it from another. Everything
is copied under a lock, so the publisher never sees a half-updated figure.
"""

from __future__ import annotations

import dataclasses
import threading
import time

from datasync import identifiers
from datasync.engine import streaming


@dataclasses.dataclass(frozen=True)
class StreamFigures:
    applied_lsn: int
    lag_seconds: float | None
    lag_bytes: int
    at: float


class Progress:
    """Implements :class:`datasync.engine.syncing.Reporter`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._copied: dict[identifiers.TableName, int] = {}
        self._snapshotting: set[identifiers.TableName] = set()
        self._stream: StreamFigures | None = None

    def snapshot_started(self, table: identifiers.TableName, est_rows: int) -> None:
        with self._lock:
            self._snapshotting.add(table)
            self._copied[table] = 0

    def snapshot_rows(self, table: identifiers.TableName, rows: int) -> None:
        with self._lock:
            self._copied[table] = self._copied.get(table, 0) + rows

    def snapshot_done(self, table: identifiers.TableName, rows: int, seconds: float) -> None:
        with self._lock:
            self._snapshotting.discard(table)
            self._copied[table] = rows

    def batch(self, stats: streaming.Stats) -> None:
        with self._lock:
            self._stream = StreamFigures(stats.applied_lsn, stats.lag_seconds, stats.lag_bytes, time.monotonic())

    def copied(self, table: identifiers.TableName) -> int | None:
        with self._lock:
            return self._copied.get(table)

    def stream(self) -> StreamFigures | None:
        with self._lock:
            return self._stream
