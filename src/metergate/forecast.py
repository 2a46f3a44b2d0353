"""Spend forecasts: where a team's (or app's) spend will end the current day, week or month.

Method (pure, backtested in tests/test_forecast.py on steady, growing, spiky, weekly, new and stopped teams):

1. Daily history: full local days before today, from the scope's first day with any spend (a team that started
   mid-month is not diluted by the days before it existed), at most the last 28.
2. Spikes: days above 3x the median are capped for the steps below; their excess comes back as a flat daily
   allowance, so one expensive batch job neither dominates the run-rate nor disappears.
3. Weekday profile: with two weeks of history or more, each weekday's mean over the overall mean (clamped to
   0.2..5), so quiet weekends are not forecast like busy weekdays.
4. Run-rate: an exponentially weighted mean (3-day half-life) of the de-seasonalised days.
5. Trend: with two weeks of history or more, a log-linear fit of the de-seasonalised days; used only when the
   slope is at least 4 standard errors from zero, clamped to +-5 % a day. The run-rate describes the level at
   the weighted age of its days, so the trend is applied from there.
6. Forecast = spend so far in the period + the rest of today + each remaining day of the period, each at its
   weekday's profile and trend. Today never counts less than its own pace so far.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from metergate.periods import Window

HALF_LIFE_DAYS = 3.0
HISTORY_DAYS = 28
MIN_PROFILE_DAYS = 14
MIN_TREND_DAYS = 14
SPIKE_FACTOR = 3.0
MAX_DAILY_GROWTH = 0.05


@dataclass(frozen=True)
class RunRate:
    """Expected spend per day: `level` at `lag` days before yesterday, then growing by `growth` a day."""

    level: float = 0.0
    factors: dict[int, float] = field(default_factory=dict)
    growth: float = 0.0
    lag: float = 0.0
    allowance: float = 0.0  # spikes' average excess per day

    def expected(self, day: date, yesterday: date) -> float:
        if self.level <= 0 and self.allowance <= 0:
            return 0.0
        ahead = self.lag + (day - yesterday).days
        trend = (1 + self.growth) ** ahead if self.growth else 1.0
        return self.level * trend * self.factors.get(day.weekday(), 1.0) + self.allowance


def daily_rate(history: Mapping[date, float], today: date) -> RunRate:
    """The run-rate, weekday profile and trend from full days before `today`."""
    days = sorted(d for d in history if d < today)
    if not days:
        return RunRate()
    first = days[0]
    span = [first + timedelta(days=i) for i in range((today - first).days)][-HISTORY_DAYS:]
    raw = [history.get(d, 0.0) for d in span]
    cap = SPIKE_FACTOR * statistics.median(raw) if any(raw) else 0.0
    values = [min(v, cap) for v in raw] if cap > 0 else raw
    allowance = sum(r - v for r, v in zip(raw, values, strict=True)) / len(raw)
    factors: dict[int, float] = {}
    mean = sum(values) / len(values)
    if len(span) >= MIN_PROFILE_DAYS and mean > 0:
        by_weekday: dict[int, list[float]] = {}
        for d, v in zip(span, values, strict=True):
            by_weekday.setdefault(d.weekday(), []).append(v)
        factors = {w: min(5.0, max(0.2, (sum(vs) / len(vs)) / mean)) for w, vs in by_weekday.items()}
    flat = [v / factors.get(d.weekday(), 1.0) for d, v in zip(span, values, strict=True)]
    ages = [len(span) - 1 - i for i in range(len(span))]
    weights = [0.5 ** (age / HALF_LIFE_DAYS) for age in ages]
    total_weight = sum(weights)
    level = sum(w * v for w, v in zip(weights, flat, strict=True)) / total_weight
    lag = sum(w * a for w, a in zip(weights, ages, strict=True)) / total_weight
    return RunRate(level, factors, _growth(flat), lag, allowance)


def _growth(flat: list[float]) -> float:
    """Daily growth from a log-linear least-squares fit, or 0 when the trend is not clearly there."""
    points = [(i, math.log(v)) for i, v in enumerate(flat) if v > 0]
    if len(points) < MIN_TREND_DAYS:
        return 0.0
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    residual = sum((y - mean_y - slope * (x - mean_x)) ** 2 for x, y in points)
    stderr = math.sqrt(residual / (n - 2) / sxx) if n > 2 else math.inf
    if abs(slope) < 4 * stderr:
        return 0.0
    return max(-MAX_DAILY_GROWTH, min(MAX_DAILY_GROWTH, math.exp(slope) - 1))


def forecast(
    window: Window,
    now: datetime,
    spent_in_period: float,
    spent_today: float,
    history: Mapping[date, float],
) -> float:
    """Projected spend (USD) at the end of `window`, given spend so far and the daily history before today."""
    tz = window.start.tzinfo
    local_now = now.astimezone(tz)
    today = local_now.date()
    day_start = datetime.combine(today, datetime.min.time(), tzinfo=tz)
    day_end = datetime.combine(today + timedelta(days=1), datetime.min.time(), tzinfo=tz)
    # Real elapsed seconds over the day's real length: days across a DST change last 23 or 25 hours.
    elapsed_today = (now.timestamp() - day_start.timestamp()) / (day_end.timestamp() - day_start.timestamp())
    elapsed_today = min(1.0, max(1 / 24, elapsed_today))
    rate = daily_rate(history, today)
    yesterday = today - timedelta(days=1)
    if rate.level <= 0 and rate.allowance <= 0:
        # No full day of history: extrapolate today's pace.
        rate = RunRate(level=spent_today / elapsed_today)
    # Today already spent more than a typical day: keep its own pace for the rest of it.
    expected_today = max(rate.expected(today, yesterday), spent_today / elapsed_today)
    remaining = max(0.0, expected_today * (1 - elapsed_today))
    end_day = (window.end - timedelta(seconds=1)).astimezone(tz).date()
    d = today + timedelta(days=1)
    while d <= end_day:
        remaining += rate.expected(d, yesterday)
        d += timedelta(days=1)
    return spent_in_period + remaining
