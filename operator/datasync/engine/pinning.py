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
``C`` when the request arrives (a temporary slot is created while the stream runs).  The
caller then simply asks again with a fresh snapshot; :class:`Missed` says so.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from datasync import errors
from datasync.targets import duckfile

PinFunction = Callable[[duckfile.DuckTarget], Any]


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

    @property
    def serving(self) -> bool:
        return self._serving

    def wait_serving(self, timeout: float) -> bool:
        """Wait until a writer serves pins (the stream has started)."""
        return self._opened.wait(timeout)

    # -- the requesting side ---------------------------------------------------
    def request(self, lsn: int, fn: PinFunction, timeout: float = 600.0) -> Any:
        """Run ``fn(target)`` in the writer once the copy is exactly at ``lsn``; its result.

        Raises :class:`Missed` when the writer is already past ``lsn``, :class:`NotStreaming`
        when no writer is running (or it stops before getting there).
        """
        pin = Pin(lsn, fn)
        with self._lock:
            if not self._serving:
                raise NotStreaming("the writer is not streaming", "wait until the tables are Ready, then ask again")
            self._pending.append(pin)
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
