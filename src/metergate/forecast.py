"""Spend forecasts: where a team's (or app's) spend will end the current day, week or month.

Method (pure, tested by backtests in tests/test_forecast.py):

1. Daily history: full local days before today, from the scope's first day with any spend (a team that started
   mid-month is not diluted by the days before it existed), at most the last 28.
2. Run-rate: an exponentially weighted mean of those days with a 3-day half-life, so a growing team's forecast
   follows its recent level rather than its month average. With no full day yet, today's spend divided by the
   elapsed part of today.
3. Weekday profile: with two weeks of history or more, each weekday's mean over the overall mean (clamped to
   0.2..5), so quiet weekends are not forecast like busy weekdays.
4. Forecast = spend so far in the period + the rest of today at today's profile + each remaining day of the
   period at its weekday's profile.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime, timedelta

from metergate.periods import Window

HALF_LIFE_DAYS = 3.0
HISTORY_DAYS = 28
MIN_PROFILE_DAYS = 14


def daily_rate(history: Mapping[date, float], today: date) -> tuple[float, dict[int, float]]:
    """The run-rate (USD per day) and weekday factors from full days before `today`."""
    days = sorted(d for d in history if d < today)
    if not days:
        return 0.0, {}
    first = days[0]
    span = [first + timedelta(days=i) for i in range((today - first).days)][-HISTORY_DAYS:]
    values = [history.get(d, 0.0) for d in span]
    weights = [0.5 ** ((len(span) - 1 - i) / HALF_LIFE_DAYS) for i in range(len(span))]
    rate = sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)
    factors: dict[int, float] = {}
    mean = sum(values) / len(values)
    if len(span) >= MIN_PROFILE_DAYS and mean > 0:
        by_weekday: dict[int, list[float]] = {}
        for d, v in zip(span, values, strict=True):
            by_weekday.setdefault(d.weekday(), []).append(v)
        factors = {w: min(5.0, max(0.2, (sum(vs) / len(vs)) / mean)) for w, vs in by_weekday.items()}
        # The EWMA rate mixes weekdays; normalise so the weighted factors of the averaged days come out at 1.
        norm = sum(w * factors.get(d.weekday(), 1.0) for w, d in zip(weights, span, strict=True)) / sum(weights)
        if norm > 0:
            rate /= norm
    return rate, factors


def forecast(
    window: Window,
    now: datetime,
    spent_in_period: float,
    spent_today: float,
    history: Mapping[date, float],
) -> float:
    """Projected spend (USD) at the end of `window`, given spend so far and the daily history before today."""
    local_now = now.astimezone(window.start.tzinfo)
    today = local_now.date()
    day_start = datetime.combine(today, datetime.min.time(), tzinfo=window.start.tzinfo)
    elapsed_today = min(1.0, max(1 / 24, (local_now - day_start).total_seconds() / 86400))
    rate, factors = daily_rate(history, today)
    if rate <= 0:
        # No full day of history: extrapolate today's pace.
        rate = spent_today / elapsed_today
        factors = {}
    expected_today = rate * factors.get(today.weekday(), 1.0)
    # Today already spent more than a typical day: keep its own pace for the rest of it.
    expected_today = max(expected_today, spent_today / elapsed_today)
    remaining = max(0.0, expected_today * (1 - elapsed_today))
    end_day = (window.end - timedelta(seconds=1)).astimezone(window.start.tzinfo).date()
    d = today + timedelta(days=1)
    while d <= end_day:
        remaining += rate * factors.get(d.weekday(), 1.0)
        d += timedelta(days=1)
    return spent_in_period + remaining
