"""Calendar periods (day, week, month) in a configured timezone, as budgets and reports count them.

Periods follow the wall calendar of `server.timezone`: a day is midnight to midnight there, a week starts on
Monday, a month on the 1st, and a day across a DST change is 23 or 25 hours long.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

Period = Literal["day", "week", "month"]
PERIODS: tuple[Period, ...] = ("day", "week", "month")


@dataclass(frozen=True, slots=True)
class Window:
    period: Period
    start: datetime  # aware, in the configured timezone
    end: datetime  # exclusive
    start_ts: float = field(init=False)
    end_ts: float = field(init=False)

    def __post_init__(self) -> None:
        # Compared on every request: computed once.
        object.__setattr__(self, "start_ts", self.start.timestamp())
        object.__setattr__(self, "end_ts", self.end.timestamp())

    def contains(self, ts: float) -> bool:
        return self.start_ts <= ts < self.end_ts

    def elapsed_fraction(self, now: datetime) -> float:
        total = (self.end - self.start).total_seconds()
        return min(1.0, max(0.0, (now - self.start).total_seconds() / total))


def _midnight(day: date, tz: ZoneInfo) -> datetime:
    return datetime.combine(day, time(0), tzinfo=tz)


def first_day(period: Period, day: date) -> date:
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def next_first_day(period: Period, first: date) -> date:
    if period == "day":
        return first + timedelta(days=1)
    if period == "week":
        return first + timedelta(days=7)
    return (first.replace(day=28) + timedelta(days=4)).replace(day=1)


def window(period: Period, at: datetime, tz: ZoneInfo) -> Window:
    """The calendar period containing `at`."""
    local_day = at.astimezone(tz).date()
    first = first_day(period, local_day)
    return Window(period, _midnight(first, tz), _midnight(next_first_day(period, first), tz))


def days_between(start: date, end: date) -> list[date]:
    """Every date from start (inclusive) to end (exclusive)."""
    return [start + timedelta(days=i) for i in range((end - start).days)]


# Reports turn days into timestamps, one day past the last: the calendar must have room on both sides.
FIRST_DAY, LAST_DAY = date(1970, 1, 1), date(9998, 12, 31)


def parse_day(text: str) -> date:
    try:
        day = date.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"expected a date like 2026-11-01, got {text!r}") from exc
    if not FIRST_DAY <= day <= LAST_DAY:
        raise ValueError(f"{text!r} is outside the dates metergate reports on ({FIRST_DAY} to {LAST_DAY})")
    return day
