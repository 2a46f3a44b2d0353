"""Calendar periods (day, week, month, quarter, year) in a configured timezone, as budgets and reports count them.

Periods follow the wall calendar of `server.timezone`: a day is midnight to midnight there, a week starts on
Monday, a month on the 1st, and a day across a DST change is 23 or 25 hours long. Quarters and years are fiscal:
they start on the 1st of `server.fiscal_year_start_month` (January by default) and every third month from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

Period = Literal["day", "week", "month", "quarter", "year"]
PERIODS: tuple[Period, ...] = ("day", "week", "month", "quarter", "year")


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


def _add_months(first: date, months: int) -> date:
    """The 1st of the month `months` after the month of `first`."""
    index = first.year * 12 + first.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def first_day(period: Period, day: date, fiscal_start: int = 1) -> date:
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    # Months since the fiscal year's first month, then back to the start of the quarter or year.
    since_start = (day.month - fiscal_start) % 12
    return _add_months(day.replace(day=1), -(since_start % 3 if period == "quarter" else since_start))


def next_first_day(period: Period, first: date) -> date:
    if period == "day":
        return first + timedelta(days=1)
    if period == "week":
        return first + timedelta(days=7)
    return _add_months(first, {"month": 1, "quarter": 3, "year": 12}[period])


def window(period: Period, at: datetime, tz: ZoneInfo, fiscal_start: int = 1) -> Window:
    """The calendar period containing `at`."""
    local_day = at.astimezone(tz).date()
    first = first_day(period, local_day, fiscal_start)
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
