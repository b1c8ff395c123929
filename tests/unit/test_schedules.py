"""Cron evaluation for scheduled checks."""

from __future__ import annotations

import datetime as dt

import pytest

from datasync import schedules

T0 = dt.datetime(2026, 11, 29, 10, 17, 30, tzinfo=dt.UTC)  # a Sunday


def at(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("*/30 * * * *", at(2026, 11, 29, 10, 30)),
        ("0 3 * * *", at(2026, 11, 30, 3, 0)),
        ("@hourly", at(2026, 11, 29, 11, 0)),
        ("@daily", at(2026, 11, 30, 0, 0)),
        ("@weekly", at(2026, 12, 6, 0, 0)),
        ("@monthly", at(2026, 12, 1, 0, 0)),
        ("@yearly", at(2027, 1, 1, 0, 0)),
        ("15 10 * * *", at(2026, 11, 30, 10, 15)),
        ("18 10 * * *", at(2026, 11, 29, 10, 18)),
        ("0 9 * * mon-fri", at(2026, 11, 30, 9, 0)),
        ("0 0 29 feb *", at(2028, 2, 29, 0, 0)),
        ("0 0 13 * 5", at(2026, 12, 4, 0, 0)),  # day 13 OR a Friday, as cron does
        ("0 12 * jan,jul ?", at(2027, 1, 1, 12, 0)),
        ("5-10/5 * * * 7", at(2026, 11, 29, 11, 5)),  # 7 is Sunday
        ("@every 15m", T0 + dt.timedelta(minutes=15)),
        ("@every 1h30m", T0 + dt.timedelta(minutes=90)),
    ],
)
def test_next_run(expr: str, expected: dt.datetime) -> None:
    assert schedules.next_run(expr, T0) == expected


@pytest.mark.parametrize("expr", ["* * * *", "61 * * * *", "* * * * mon-xyz", "*/0 * * * *", "0 0 31 feb *"])
def test_bad_schedules_say_why(expr: str) -> None:
    with pytest.raises(schedules.ScheduleError):
        schedules.next_run(expr, T0)
