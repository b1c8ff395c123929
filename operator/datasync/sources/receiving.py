"""Receiving pgoutput over the streaming replication protocol.

Measured against the SQL interface (``pg_logical_slot_peek_binary_changes`` +
``pg_replication_slot_advance``): the SQL route decodes every change twice (the
peek, then the advance), cannot decode ahead while we apply, and polls; the
walsender decodes once, pushes continuously from its own process (the second
core) and answers status updates.  psycopg 3 has no COPY BOTH support, so this
module uses psycopg2's replication connection for the stream only.

Flow control is the standby status update: we confirm (flush) an LSN only after
the DuckDB transaction holding it committed.  After any reconnect the walsender
resends from the confirmed point; the applier skips what the target already has.

Messages are read from libpq in C (``_speedups.replication_read``) when the
extension is built: psycopg2's ``read_message`` spent ~5 µs of Python per
message holding the GIL, as much CPU as the whole apply, while the walsender
is the source's real limit.  psycopg2 still opens the connection and starts
replication; after that the C reader and status sender are its only users.
"""

from __future__ import annotations

import collections
import contextlib
import select
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import psycopg2
import psycopg2._psycopg

from datasync import errors
from datasync.sources import connecting


class StreamLost(errors.SourceError):
    """The replication connection broke (server restart, network): reconnect and resume."""


@contextlib.contextmanager
def _guarded() -> Iterator[None]:
    # a dying walsender surfaces as any of several libpq errors ("no COPY in
    # progress", "server closed the connection", ...): all mean the same here
    try:
        yield
    except (psycopg2.DatabaseError, OSError) as exc:
        raise StreamLost(f"replication stream lost: {str(exc).strip() or type(exc).__name__}") from None


class Source(Protocol):
    """What :class:`Prefetched` reads from: a :class:`Stream`, or a recording of one."""

    @property
    def wal_end(self) -> int: ...

    def read(self, max_messages: int, timeout: float) -> list[bytes]: ...

    def confirm(self, lsn: int, *, force: bool = False) -> None: ...

    def request_status(self, min_interval: float = 0.05) -> bool: ...

    def close(self) -> None: ...


class Recorded:
    """A stream played back from memory: ``reads`` as (messages, wal_end) pairs, as
    :class:`Stream` returned them; then ``end`` is reported as the server position.

    Why: it measures (and tests) the apply alone, without a walsender sharing the CPU.
    """

    def __init__(self, reads: list[tuple[list[bytes], int]], end: int) -> None:
        self._reads, self._end, self._next = reads, end, 0
        self.wal_end = 0

    def read(self, max_messages: int, timeout: float) -> list[bytes]:
        if self._next < len(self._reads):
            msgs, self.wal_end = self._reads[self._next]
            self._next += 1
            return list(msgs)
        self.wal_end = self._end
        time.sleep(timeout)  # as a quiet server would
        return []

    def confirm(self, lsn: int, *, force: bool = False) -> None:
        pass

    def request_status(self, min_interval: float = 0.05) -> bool:
        return True

    def close(self) -> None:
        pass


def _native() -> Any:
    try:
        from datasync.engine import _speedups  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - the extension is part of the build
        return None
    return _speedups


class Stream:
    """One START_REPLICATION session on a logical slot."""

    STATUS_INTERVAL = 5.0  # seconds between standby status updates when nothing else sends one
    CONFIRM_INTERVAL = 0.5  # confirmations closer together than this wait for the next one
    LINGER = 0.001  # after a first message, how long to let more arrive before returning

    def __init__(
        self, dsn: str, slot: str, publication: str, proto_version: int = 1, *, native: bool = True
    ) -> None:
        self.conn = connecting.connect_libpq2(dsn, logical_replication=True)
        self.cur: Any = self.conn.cursor()
        try:
            self.cur.start_replication(
                slot_name=slot,
                decode=False,
                options={"proto_version": str(proto_version), "publication_names": publication},
                status_interval=5,
            )
        except psycopg2.Error as exc:
            self.conn.close()
            text = str(exc).strip()
            if "is active for PID" in text:
                raise errors.SourceError(
                    f"replication slot {slot} is in use by another process",
                    "only one sync may stream a slot; stop the other one (DuckDB also allows one writer per file)",
                ) from None
            raise errors.SourceError(f"could not start streaming from slot {slot}: {text}") from None
        self._last_status_request = 0.0
        self._speedups = _native() if native else None
        self._ptr: int = self.conn.pgconn_ptr
        self._lib = psycopg2._psycopg.__file__
        self._wal_end = 0
        self._flushed = 0  # the latest confirmed LSN (never moves back)
        self._reported = 0  # the LSN in the latest status update sent
        self._sent = time.monotonic()

    def read(self, max_messages: int, timeout: float) -> list[bytes]:
        """Up to ``max_messages`` payloads; waits up to ``timeout`` for the first."""
        with _guarded():
            return self._read(max_messages, timeout)

    def _read(self, max_messages: int, timeout: float) -> list[bytes]:
        if self._speedups is not None:
            read = self._speedups.replication_read
            msgs, wal_end, reply = read(self._ptr, self._lib, max_messages, timeout)
            if msgs and len(msgs) < max_messages and self.LINGER:
                # let the walsender fill the socket: it sends message by message, and reading
                # them as they come cost a recv per 2-3 messages (measured per 250k messages:
                # 1.3 s of client CPU without the pause, 0.3 s with it; same wall time)
                time.sleep(self.LINGER)
                more, end, again = read(self._ptr, self._lib, max_messages - len(msgs), 0)
                msgs += more
                wal_end, reply = end or wal_end, reply or again
            if wal_end:
                self._wal_end = wal_end
            since = time.monotonic() - self._sent
            owed = self._flushed > self._reported and since >= self.CONFIRM_INTERVAL
            if reply or owed or since >= self.STATUS_INTERVAL:
                self._send_status()
            return msgs  # type: ignore[no-any-return]
        out: list[bytes] = []
        read = self.cur.read_message
        while len(out) < max_messages:
            msg = read()
            if msg is None:
                if out or timeout <= 0:
                    break
                select.select([self.cur], [], [], timeout)
                timeout = 0
                continue
            out.append(msg.payload)
        return out

    @property
    def wal_end(self) -> int:
        """The server's sent position, from the latest keepalive or data message."""
        return self._wal_end if self._speedups is not None else int(self.cur.wal_end)

    def _send_status(self, reply: bool = False) -> None:
        assert self._speedups is not None
        self._speedups.replication_status(self._ptr, self._lib, self._flushed, reply)
        self._reported = self._flushed
        self._sent = time.monotonic()

    def confirm(self, lsn: int, *, force: bool = False) -> None:
        """Report ``lsn`` as durably applied (the slot may release WAL before it)."""
        with _guarded():
            if self._speedups is None:
                self.cur.send_feedback(write_lsn=lsn, flush_lsn=lsn, apply_lsn=lsn, force=force)
                return
            self._flushed = max(self._flushed, lsn)
            due = time.monotonic() - self._sent >= self.CONFIRM_INTERVAL
            if force or (self._flushed > self._reported and due):
                self._send_status()

    def request_status(self, min_interval: float = 0.05) -> bool:
        """Ask the walsender for a keepalive (it carries how far it has sent); False: too soon, not sent."""
        now = time.monotonic()
        if now - self._last_status_request < min_interval:
            return False
        self._last_status_request = now
        with _guarded():
            if self._speedups is None:
                self.cur.send_feedback(reply=True, force=True)
            else:
                self._send_status(reply=True)
        return True

    def close(self) -> None:
        """Send a confirmation still owed (confirmations are spaced out), then hang up."""
        if self._speedups is not None and self._flushed > self._reported:
            with contextlib.suppress(ConnectionError):
                self._send_status()
        try:
            self.conn.close()
        except psycopg2.Error:
            pass


class Prefetched:
    """A :class:`Stream` read ahead by a thread of its own, with the same interface.

    Why: while the applier folds and commits a batch, nobody reads the socket;
    once its buffer is full the walsender stops decoding, and the two sides take
    turns instead of working at once (on 2 cores, the walsender's decoding is
    as much work as our apply).  The read-ahead is bounded in bytes, not in
    reads: it must hold what the walsender sends during a whole flush (a
    budget of 8 small reads stalled the walsender during every flush).  The
    thread is the connection's only user: confirmations and status requests
    are handed to it, so psycopg2/libpq is never called from two threads.  Each
    batch carries the ``wal_end`` seen right after it was read, so "everything
    up to wal_end has been read" stays true for the consumer however far ahead
    the thread is.
    """

    def __init__(self, stream: Source, *, max_bytes: int = 64 << 20, batch: int = 10_000, poll: float = 0.1) -> None:
        self.stream = stream
        self.wal_end = stream.wal_end
        self._items: collections.deque[tuple[list[bytes], int, int]] = collections.deque()  # (msgs, wal_end, bytes)
        self._buffered = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._lock = threading.Lock()
        self._confirm: tuple[int, bool] | None = None
        self.confirmed = 0  # the highest position ever confirmed: the slot is never past it
        self._status = False
        self._closing = threading.Event()
        self._max_bytes, self._batch, self._poll = max_bytes, batch, poll
        self._pushed_end = -1  # the wal_end handed to the consumer last
        self._thread = threading.Thread(target=self._run, name="wal-reader", daemon=True)
        self._thread.start()

    def _send_pending(self) -> None:
        with self._lock:
            confirm, self._confirm = self._confirm, None
            status, self._status = self._status, False
        if confirm is not None:
            self.stream.confirm(confirm[0], force=confirm[1])
        if status and not self.stream.request_status():
            with self._lock:
                self._status = True  # too soon after the last one: sent on a later pass, not dropped

    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                self._send_pending()
                # short waits: close() joins this thread, and a --once run ends with it
                msgs = self.stream.read(self._batch, min(self._poll, 0.02))
                if not msgs and self.stream.wal_end == self._pushed_end:
                    continue  # nothing new for the consumer: let it sleep
                self._pushed_end = self.stream.wal_end
                size = sum(map(len, msgs))
                with self._cond:
                    if not msgs and self._items and not self._items[-1][0]:
                        self._items[-1] = (msgs, self.stream.wal_end, 0)  # only the position moved
                    else:
                        self._items.append((msgs, self.stream.wal_end, size))
                        self._buffered += size
                    self._cond.notify_all()
                while not self._closing.is_set():
                    with self._cond:
                        if self._buffered < self._max_bytes:
                            break
                        self._cond.wait(self._poll)
                    self._send_pending()  # confirmations flow while the consumer catches up
            self._send_pending()
        except BaseException as exc:  # handed to the consumer, after what was read before it
            self._closing.set()
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def read(self, max_messages: int, timeout: float) -> list[bytes]:
        """What the thread has read, up to ``max_messages`` (or one larger read), or [] after ``timeout``."""
        with self._cond:
            if not self._items and self._error is None:
                self._cond.wait_for(lambda: bool(self._items) or self._error is not None, timeout)
            if not self._items:
                if self._error is not None:
                    raise self._error
                if not self._thread.is_alive():
                    raise StreamLost("replication stream lost: the reader stopped")
                return []
            out, self.wal_end, size = self._items.popleft()
            self._buffered -= size
            while self._items and len(out) + len(self._items[0][0]) <= max_messages:
                msgs, self.wal_end, size = self._items.popleft()
                out += msgs
                self._buffered -= size
            self._cond.notify_all()
        return out

    def confirm(self, lsn: int, *, force: bool = False) -> None:
        with self._lock:
            self.confirmed = max(self.confirmed, lsn)
            prior = self._confirm
            self._confirm = (max(lsn, prior[0]) if prior else lsn, force or bool(prior and prior[1]))

    def request_status(self, min_interval: float = 0.05) -> bool:
        with self._lock:
            self._status = True
        return True  # handed to the reader thread, which sends it as soon as the spacing allows

    def close(self) -> None:
        """Send what is pending, stop the thread, close the connection."""
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=10)
        self.stream.close()
