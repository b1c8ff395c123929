"""receiving.Prefetched: read-ahead with the connection used by one thread only."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from datasync.sources import receiving


class FakeStream:
    """Hands out numbered messages; records which thread did what."""

    def __init__(self, total: int, fail_after: int | None = None) -> None:
        self.total, self.sent, self.fail_after = total, 0, fail_after
        self.wal_end = 0
        self.confirmed: list[tuple[int, bool]] = []
        self.status_requests = 0
        self.refuse_status = 0  # status requests to turn down as "too soon" first
        self.threads: set[str] = set()
        self.closed = False

    def read(self, max_messages: int, timeout: float) -> list[bytes]:
        self.threads.add(threading.current_thread().name)
        if self.fail_after is not None and self.sent >= self.fail_after:
            raise receiving.StreamLost("replication stream lost: test")
        n = min(max_messages, self.total - self.sent, 3)
        if n == 0:
            time.sleep(timeout)
            return []
        out = [str(self.sent + k).encode() for k in range(n)]
        self.sent += n
        self.wal_end = self.sent
        return out

    def confirm(self, lsn: int, *, force: bool = False) -> None:
        self.threads.add(threading.current_thread().name)
        self.confirmed.append((lsn, force))

    def request_status(self, min_interval: float = 0.05) -> bool:
        self.threads.add(threading.current_thread().name)
        if self.refuse_status:
            self.refuse_status -= 1
            return False
        self.status_requests += 1
        return True

    def close(self) -> None:
        self.closed = True


def test_reads_ahead_in_order_and_wal_end_follows_what_was_consumed() -> None:
    fake = FakeStream(100)
    pre = receiving.Prefetched(fake, max_bytes=8, batch=3, poll=0.01)  # type: ignore[arg-type]
    got: list[bytes] = []
    while len(got) < 100:
        msgs = pre.read(10_000, 1.0)
        got += msgs
        assert pre.wal_end == int(got[-1]) + 1 if msgs else True  # never ahead of what we hold
    assert got == [str(i).encode() for i in range(100)]
    assert pre.read(10_000, 0.05) == [] and pre.wal_end == 100
    pre.confirm(40)
    pre.confirm(70, force=True)
    pre.confirm(50)  # never moves back; force sticks until sent
    pre.request_status()
    pre.close()
    assert fake.confirmed[-1] == (70, True)
    assert fake.status_requests >= 1
    assert fake.threads == {"wal-reader"}  # psycopg2 is only ever called from the reader thread
    assert fake.closed


def test_errors_reach_the_consumer() -> None:
    fake = FakeStream(100, fail_after=6)
    pre = receiving.Prefetched(fake, max_bytes=64, batch=3, poll=0.01)  # type: ignore[arg-type]
    got: list[Any] = []
    with pytest.raises(receiving.StreamLost):
        while True:
            got += pre.read(10_000, 1.0)
    assert len(got) == 6
    pre.close()


def test_read_ahead_is_bounded_in_bytes() -> None:
    fake = FakeStream(10**9)
    pre = receiving.Prefetched(fake, max_bytes=300, batch=3, poll=0.01)  # type: ignore[arg-type]
    time.sleep(0.2)
    held = fake.sent
    assert 0 < held <= 300  # messages are >= 1 byte: the reader stopped at the budget
    time.sleep(0.1)
    assert fake.sent == held  # and stays stopped while nobody reads
    got = pre.read(50, 1.0)
    assert got[0] == b"0" and len(got) <= 51  # batches are merged up to max_messages
    deadline = time.monotonic() + 2
    while fake.sent == held:  # room again: reading resumes
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pre.close()


def test_a_status_request_turned_down_as_too_soon_is_sent_later() -> None:
    """Requests are spaced out by the stream; the last one before the end of a --once run must not be lost."""
    fake = FakeStream(0)
    fake.refuse_status = 3
    pre = receiving.Prefetched(fake, max_bytes=64, batch=3, poll=0.01)  # type: ignore[arg-type]
    pre.request_status()
    deadline = time.monotonic() + 2
    while fake.status_requests == 0:
        assert time.monotonic() < deadline, "the status request was dropped"
        time.sleep(0.01)
    assert fake.refuse_status == 0 and fake.status_requests == 1
    pre.close()
