"""Polling the control plane until something is true (shared by the e2e tests)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def wait_for(
    what: str,
    fn: Callable[[], T | None],
    timeout: float = 60.0,
    interval: float = 0.5,
    logs: Callable[[], str] | None = None,
) -> T:
    """Return ``fn()``'s first truthy value; lookups that fail meanwhile count as not yet."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (AssertionError, KeyError, IndexError, TypeError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}\n{logs() if logs else ''}", pytrace=False)
