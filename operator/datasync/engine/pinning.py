"""Running work inside the writer at an exact point of the change stream.

A consistency check under live traffic must look at both sides *at the same moment*.
PostgreSQL can give a snapshot whose position is exact — a temporary slot's exported
snapshot contains every transaction committed before its consistent LSN ``C`` and none
after — but the copy only reaches the same position if the writer stops applying right
before the first transaction that committed at or after ``C``.  A *pin* asks for that:
the writer calls the pinned function at that boundary, with everything before ``C``
committed in DuckDB and nothing after it, then carries on.  The function should be
short (open a read transaction, write a few repaired rows): the stream waits for it.

A pin can be *missed*: the writer may already have applied a transaction committed after
``C`` when the request arrives (a temporary slot is created while the stream runs).  So the
requester *holds* the writer while it creates the slot and posts the pin — the writer starts
no new transaction meanwhile, for two seconds at most — which makes every transaction the
copy holds older than ``C``.  Should the hold run out (a long transaction on the source
delays the slot), the pin may be missed; :class:`Missed` says so and the caller asks again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from datasync import errors
from datasync.targets import duckfile

PinFunction = Callable[[duckfile.DuckTarget], Any]
HOLD_SECONDS = 2.0


class Missed(errors.DataSyncError):
    """The writer had already applied past the requested position."""

    def __init__(self, lsn: int, past: int) -> None:
        from datasync.engine import pgoutput

        super().__init__(
            f"the writer had already applied a transaction committed at {pgoutput.format_lsn(past)}, "
            f"past the pinned position {pgoutput.format_lsn(lsn)}",
            "ask again with a fresh snapshot",
        )


class NotStreaming(errors.DataSyncError):
    """No writer serves pins (not started yet, stopped, or failed)."""


@dataclasses.dataclass
class Pin:
    lsn: int
    fn: PinFunction
    future: concurrent.futures.Future[Any] = dataclasses.field(default_factory=concurrent.futures.Future)


class Pins:
    """Pin requests from any thread, served by the writer thread at transaction boundaries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Pin] = []
        self._serving = False
        self._opened = threading.Event()
        self._hold_until = 0.0
        self._released = threading.Event()

    @property
    def serving(self) -> bool:
        return self._serving

    def wait_serving(self, timeout: float) -> bool:
        """Wait until a writer serves pins (the stream has started)."""
        return self._opened.wait(timeout)

    # -- the requesting side ---------------------------------------------------
    @contextlib.contextmanager
    def holding(self, max_seconds: float = HOLD_SECONDS) -> Iterator[None]:
        """Keep the writer from starting new transactions while the block runs (at most
        ``max_seconds``): a snapshot taken inside it is then never behind the copy.

        The block creates the temporary slot and posts the pin; it is short unless a
        long-running transaction delays the slot, and then the writer goes on after
        ``max_seconds`` (the pin may then be missed and is asked again).
        """
        self._released.clear()
        self._hold_until = time.monotonic() + max_seconds
        try:
            yield
        finally:
            self._hold_until = 0.0
            self._released.set()

    def post(self, lsn: int, fn: PinFunction) -> Pin:
        """Ask for ``fn(target)`` at ``lsn`` without waiting; :meth:`wait` for it."""
        pin = Pin(lsn, fn)
        with self._lock:
            if not self._serving:
                raise NotStreaming("the writer is not streaming", "wait until the tables are Ready, then ask again")
            self._pending.append(pin)
        return pin

    def wait(self, pin: Pin, timeout: float = 600.0) -> Any:
        try:
            return pin.future.result(timeout)
        except concurrent.futures.TimeoutError:
            with self._lock:
                if pin in self._pending:
                    self._pending.remove(pin)
            raise errors.DataSyncError(
                f"the writer did not reach the pinned position within {timeout:g}s",
                "the copy is lagging far behind; check the policy's lag",
            ) from None

    def cancel(self, pin: Pin) -> None:
        """The requester gave up: drop the pin, or release what it produced (e.g. close a reader)."""
        with self._lock:
            if pin in self._pending:
                self._pending.remove(pin)
                return
        if pin.future.done() and pin.future.exception() is None:
            close = getattr(pin.future.result(), "close", None)
            if callable(close):
                close()

    def request(self, lsn: int, fn: PinFunction, timeout: float = 600.0) -> Any:
        """Run ``fn(target)`` in the writer once the copy is exactly at ``lsn``; its result.

        Raises :class:`Missed` when the writer is already past ``lsn``, :class:`NotStreaming`
        when no writer is running (or it stops before getting there).
        """
        return self.wait(self.post(lsn, fn), timeout)

    # -- the writer's side -----------------------------------------------------
    def open(self) -> None:
        with self._lock:
            self._serving = True
        self._opened.set()

    def close(self) -> None:
        """The writer stops: fail what is still waiting."""
        with self._lock:
            self._serving = False
            self._opened.clear()
            pending, self._pending = self._pending, []
        for pin in pending:
            pin.future.set_exception(NotStreaming("the writer stopped before the pinned position", "ask again"))

    def wait_if_held(self) -> None:
        """Before starting a transaction: wait while a requester holds the writer (bounded)."""
        if self._hold_until:
            left = self._hold_until - time.monotonic()
            if left > 0:
                self._released.wait(left)

    def wanted(self) -> int | None:
        """The lowest pinned position waiting, if any (cheap: called for every transaction)."""
        if not self._pending:
            return None
        with self._lock:
            return min((p.lsn for p in self._pending), default=None)

    def serve(self, target: duckfile.DuckTarget, reached: int, last_begun: int) -> None:
        """Run every pin at or below ``reached``; ``last_begun`` is the commit LSN of the latest
        transaction applied (a pin at or below it was missed)."""
        with self._lock:
            due = [p for p in self._pending if p.lsn <= reached]
            self._pending = [p for p in self._pending if p.lsn > reached]
        for pin in due:
            if last_begun >= pin.lsn:
                pin.future.set_exception(Missed(pin.lsn, last_begun))
                continue
            try:
                pin.future.set_result(pin.fn(target))
            except BaseException as exc:  # the requester gets it; the stream goes on
                pin.future.set_exception(exc)
