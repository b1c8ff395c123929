"""Pins: served at the right boundary, missed when too late, holds bounded, cancels clean up."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from datasync.engine import pinning


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_served_at_or_after_the_pinned_position_and_missed_when_past_it() -> None:
    pins = pinning.Pins()
    with pytest.raises(pinning.NotStreaming):
        pins.request(100, lambda target: 1, timeout=1)
    pins.open()
    t, out = _in_thread(lambda: pins.request(100, lambda target: "served", timeout=5))
    while pins.wanted() is None:
        time.sleep(0.01)
    pins.serve(None, reached=99, last_begun=50)  # type: ignore[arg-type]  # not there yet
    assert pins.wanted() == 100
    pins.serve(None, reached=120, last_begun=90)  # type: ignore[arg-type]
    t.join()
    assert out == ["served"]
    t, out = _in_thread(lambda: pins.request(100, lambda target: "late", timeout=5))
    while pins.wanted() is None:
        time.sleep(0.01)
    pins.serve(None, reached=150, last_begun=130)  # type: ignore[arg-type]  # a txn at 130 >= 100 was applied
    t.join()
    assert isinstance(out[0], pinning.Missed)


def test_close_fails_waiting_pins_and_cancel_releases_results() -> None:
    pins = pinning.Pins()
    pins.open()
    t, out = _in_thread(lambda: pins.request(10, lambda target: 1, timeout=5))
    while pins.wanted() is None:
        time.sleep(0.01)
    pins.close()
    t.join()
    assert isinstance(out[0], pinning.NotStreaming)
    pins.open()

    class Reader:
        closed = False

        def close(self) -> None:
            self.closed = True

    reader = Reader()
    pin = pins.post(10, lambda target: reader)
    pins.serve(None, reached=10, last_begun=0)  # type: ignore[arg-type]
    pins.cancel(pin)
    assert reader.closed
    pending = pins.post(20, lambda target: reader)
    pins.cancel(pending)
    assert pins.wanted() is None


def test_a_hold_pauses_the_writer_until_released_and_never_longer_than_its_bound() -> None:
    pins = pinning.Pins()
    with pins.holding(max_seconds=5):
        t, out = _in_thread(lambda: (pins.wait_if_held(), time.monotonic())[1])
        time.sleep(0.2)
        assert t.is_alive()  # the writer waits
        released = time.monotonic()
    t.join()
    assert out[0] >= released
    with pins.holding(max_seconds=0.2):
        started = time.monotonic()
        pins.wait_if_held()  # nobody releases: the bound ends the wait
        assert 0.15 < time.monotonic() - started < 2
    pins.wait_if_held()  # no hold: returns at once
