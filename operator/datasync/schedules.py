"""Cron schedules: when a scheduled run is next due.

The syntax is what ``api.common.CRON_PATTERN`` admits (the Kubernetes CronJob dialect):
five fields — minute, hour, day of month, month, day of week — each a list of ``*``/``?``,
numbers, names (``jan``, ``mon``), ranges and steps; or a macro (``@hourly``, ``@daily``,
``@midnight``, ``@weekly``, ``@monthly``, ``@yearly``/``@annually``, ``@every 1h30m``).
Times are UTC.  As in cron, when both day of month and day of week are restricted a day
matching either is due.  A small evaluator here instead of a dependency: it walks days, then
hours, then minutes, so the next run is found in microseconds even for rare schedules.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}
_DAYS = {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}
_EVERY = re.compile(r"([0-9]+)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


class ScheduleError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Schedule:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # day of month is *
    any_weekday: bool  # day of week is *
    every: dt.timedelta | None = None

    def next_after(self, after: dt.datetime) -> dt.datetime:
        """The first due time strictly after ``after`` (UTC)."""
        after = after.astimezone(dt.UTC)
        if self.every is not None:
            return after + self.every
        start = after.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        day = start.date()
        for _ in range(366 * 8):  # 29 February on a Monday comes round within 28 years; 8 is plenty for others
            if day.month in self.months and self._day_matches(day):
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        at = dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=dt.UTC)
                        if at >= start:
                            return at
            day += dt.timedelta(days=1)
        raise ScheduleError("the schedule never comes due")

    def _day_matches(self, day: dt.date) -> bool:
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.any_day and self.any_weekday:
            return True
        if self.any_day:
            return dow
        if self.any_weekday:
            return dom
        return dom or dow


def _field(text: str, lo: int, hi: int, names: dict[str, int]) -> frozenset[int]:
    values: set[int] = set()
    for part in text.lower().split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise ScheduleError(f"step {step_text} in {text!r} must be at least 1")
        if base in ("*", "?"):
            first, last = lo, hi
        else:
            a, _, b = base.partition("-")
            first = names[a] if a in names else int(a)
            last = (names[b] if b in names else int(b)) if b else (hi if step_text else first)
        if not (lo <= first <= hi and lo <= last <= hi) or first > last:
            raise ScheduleError(f"{part!r} is outside {lo}-{hi}")
        values.update(range(first, last + 1, step))
    return frozenset(values)


def parse(expr: str) -> Schedule:
    text = " ".join(expr.split())
    if text.startswith("@every "):
        parts = _EVERY.findall(text[len("@every "):])
        seconds = sum(int(n) * _UNITS[u] for n, u in parts)
        if not parts or seconds <= 0:
            raise ScheduleError(f"cannot read {expr!r}")
        return Schedule(frozenset(), frozenset(), frozenset(), frozenset(), frozenset(), True, True,
                        dt.timedelta(seconds=seconds))
    text = MACROS.get(text.lower(), text)
    fields = text.split(" ")
    if len(fields) != 5:
        raise ScheduleError(f"{expr!r} needs 5 fields: minute hour day-of-month month day-of-week")
    try:
        weekdays = _field(fields[4], 0, 7, _DAYS)
        return Schedule(
            _field(fields[0], 0, 59, {}),
            _field(fields[1], 0, 23, {}),
            _field(fields[2], 1, 31, {}),
            _field(fields[3], 1, 12, _MONTHS),
            frozenset(d % 7 for d in weekdays),  # 7 is Sunday too
            fields[2] in ("*", "?"),
            fields[4] in ("*", "?"),
        )
    except (KeyError, ValueError) as exc:
        raise ScheduleError(f"cannot read {expr!r}: {exc}") from None


def next_run(expr: str, after: dt.datetime) -> dt.datetime:
    return parse(expr).next_after(after)
