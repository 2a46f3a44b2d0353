"""Backtests and edge cases of the spend forecaster (metergate.forecast).

Backtests replay synthetic daily spend histories (seeded, deterministic) through `forecast` exactly as the
budget tracker calls it, and compare the month-end forecast with the month's true total. Run
`python -m tests.test_forecast` (or `pytest -s tests/test_forecast.py`) to print the MAPE table.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

import metergate.forecast as forecast_module
from metergate.forecast import forecast
from metergate.periods import PERIODS, Period, Window, days_between, next_first_day, window

TZ = ZoneInfo("Europe/Paris")
SIM_START = date(2026, 1, 1)  # four months, across the March DST change (2026-03-29)
SIM_END = date(2026, 5, 1)
EVAL_MONTHS = (date(2026, 2, 1), date(2026, 3, 1), date(2026, 4, 1))  # every month after the first
CHECKPOINTS = (3, 7, 10, 15, 20, 25)
SEEDS = tuple(range(10))
BASE = 100.0  # USD per day

Spend = dict[date, float]
Predictor = Callable[[Window, datetime, float, float, Mapping[date, float]], float]


# --- synthetic histories --------------------------------------------------------------------------------------


def _noisy(rng: random.Random, level: float) -> float:
    return level * rng.uniform(0.9, 1.1)


def steady(rng: random.Random, days: list[date]) -> Spend:
    return {d: _noisy(rng, BASE) for d in days}


def growth(rng: random.Random, days: list[date]) -> Spend:
    return {d: _noisy(rng, BASE * 1.02**i) for i, d in enumerate(days)}


def spiky(rng: random.Random, days: list[date]) -> Spend:
    return {d: _noisy(rng, BASE) * (rng.uniform(5, 10) if rng.random() < 0.05 else 1.0) for d in days}


def weekly(rng: random.Random, days: list[date]) -> Spend:
    return {d: _noisy(rng, BASE if d.weekday() < 5 else 0.2 * BASE) for d in days}


STARTED = date(2026, 2, 15)  # the mid-month team's first day: no history before the 15th
STOPPED = date(2026, 4, 15)  # the stopping team's first day without spend


def started_mid_month(rng: random.Random, days: list[date]) -> Spend:
    return {d: _noisy(rng, BASE) if d >= STARTED else 0.0 for d in days}


def stopped_mid_month(rng: random.Random, days: list[date]) -> Spend:
    return {d: _noisy(rng, BASE) if d < STOPPED else 0.0 for d in days}


SCENARIOS: dict[str, Callable[[random.Random, list[date]], Spend]] = {
    "steady": steady,
    "growth": growth,
    "spiky": spiky,
    "weekly": weekly,
    "started": started_mid_month,
    "stopped": stopped_mid_month,
}


def simulate(scenario: str, seed: int) -> Spend:
    return SCENARIOS[scenario](random.Random(f"{scenario}/{seed}"), days_between(SIM_START, SIM_END))


# --- backtest -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Point:
    scenario: str
    seed: int
    month: date
    checkpoint: int
    actual: float
    predicted: float
    spent: float

    @property
    def ape(self) -> float:
        return abs(self.predicted - self.actual) / self.actual


def naive(w: Window, now: datetime, spent_in_period: float, spent_today: float, history: Mapping[date, float]) -> float:
    """The baseline a forecast must beat: the month ends where it stands now."""
    return spent_in_period


def pace(w: Window, now: datetime, spent_in_period: float, spent_today: float, history: Mapping[date, float]) -> float:
    """A second baseline: the period's spend so far divided by its elapsed fraction (no history, no profile)."""
    elapsed = w.elapsed_fraction(now)
    return spent_in_period / elapsed if elapsed > 0 else spent_in_period


def backtest(spend: Spend, predictor: Predictor = forecast, scenario: str = "", seed: int = 0) -> list[Point]:
    """Forecast each evaluated month's total at noon (local) of each checkpoint day, as the tracker would."""
    # The ledger only has rows for days with spend: the history is sparse, as reports.daily_history returns it.
    ledger = {d: v for d, v in spend.items() if v > 0}
    points = []
    for month in EVAL_MONTHS:
        month_days = days_between(month, next_first_day("month", month))
        actual = sum(spend[d] for d in month_days)
        if actual <= 0:
            continue
        for checkpoint in CHECKPOINTS:
            today = month.replace(day=checkpoint)
            spent_today = spend[today] / 2
            spent = sum(spend[d] for d in month_days if d < today) + spent_today
            if spent <= 0 and not any(d < today for d in ledger):
                continue  # the team does not exist yet: there is nothing to forecast from
            now = datetime.combine(today, time(12), tzinfo=TZ).astimezone(ZoneInfo("UTC"))
            history = {d: v for d, v in ledger.items() if d < today}
            predicted = predictor(window("month", now, TZ), now, spent, spent_today, history)
            points.append(Point(scenario, seed, month, checkpoint, actual, predicted, spent))
    return points


@functools.cache
def results(predictor: Predictor = forecast) -> tuple[Point, ...]:
    return tuple(
        p
        for scenario in SCENARIOS
        for seed in SEEDS
        for p in backtest(simulate(scenario, seed), predictor, scenario, seed)
    )


def mape(points: list[Point] | tuple[Point, ...]) -> float:
    return sum(p.ape for p in points) / len(points) if points else math.nan


def mape_by(scenario: str, checkpoint: int | None = None, predictor: Predictor = forecast) -> float:
    return mape([p for p in results(predictor) if p.scenario == scenario and checkpoint in (None, p.checkpoint)])


def mape_table() -> str:
    """MAPE (%) of the month-end forecast per scenario and checkpoint day, and over all checkpoints for the
    forecast and the two baselines: naive (spent so far) and pace (spent so far / elapsed part of the month)."""
    head = ["scenario", *(f"day {c}" for c in CHECKPOINTS), "all", "naive", "pace"]
    rows = [head]
    for scenario in SCENARIOS:
        cells = [mape_by(scenario, c) for c in CHECKPOINTS]
        cells += [mape_by(scenario), mape_by(scenario, None, naive), mape_by(scenario, None, pace)]
        rows.append([scenario, *("-" if math.isnan(v) else f"{100 * v:.1f}" for v in cells)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- backtests ------------------------------------------------------------------------------------------------

# Upper bounds on the month-end MAPE (all checkpoints, and day 25 alone) per scenario, set after measuring the
# current method (10 seeds x Feb-Apr 2026; measured values in the comments) with a margin. The naive "the month
# ends where it stands" forecast scores 47-62% on every scenario, so each bound also rules it out.
BOUNDS: dict[str, tuple[float, float]] = {
    "steady": (0.03, 0.015),  # measured 1.0% / 0.4%
    "growth": (0.05, 0.02),  # measured 2.4% / 0.8% with the trend term (16.5% / 3.1% without it)
    "spiky": (0.20, 0.10),  # measured 15.0% / 6.2% with spikes capped (18.5% / 6.6% before): future spikes are random
    "weekly": (0.03, 0.015),  # measured 1.2% / 0.5%; 6.1% without the weekday profile
    "started": (0.03, 0.015),  # measured 1.2% / 0.6%
    "stopped": (0.35, 0.04),  # measured 27.5% / 1.7%: nothing can foresee the stop; the forecast falls after it
}


def test_backtest_table(record_property: pytest.RecordProperty) -> None:
    """The MAPE table, in the captured output (shown with `pytest -s`, `-rP` or on failure) and the JUnit XML."""
    print()
    main()
    record_property("mape_table", mape_table())
    # Every scenario, seed, evaluated month and checkpoint, but the started team's first month before it existed.
    not_yet = len(SEEDS) * len([c for c in CHECKPOINTS if c < STARTED.day])
    assert len(results()) == len(SCENARIOS) * len(SEEDS) * len(EVAL_MONTHS) * len(CHECKPOINTS) - not_yet


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_backtest_error_bounds(scenario: str) -> None:
    overall, late = BOUNDS[scenario]
    assert mape_by(scenario) < overall, mape_table()
    assert mape_by(scenario, 25) < late, mape_table()
    # The forecast gets better as the month goes on.
    assert mape_by(scenario, 25) < mape_by(scenario, 3), mape_table()


def test_steady_every_forecast_close() -> None:
    worst = max(p.ape for p in results() if p.scenario == "steady")
    assert worst < 0.08, worst  # measured 4.7%


def test_naive_baseline_much_worse_on_steady() -> None:
    """'Spent so far' as the forecast would fail the steady bound by an order of magnitude."""
    method, baseline = mape_by("steady"), mape_by("steady", None, naive)
    assert baseline > 0.4, baseline  # measured 56.6%
    assert baseline > 10 * method, (baseline, method)
    assert baseline > BOUNDS["steady"][0] * 10
    for checkpoint in CHECKPOINTS:
        assert mape_by("steady", checkpoint, naive) > 5 * mape_by("steady", checkpoint), checkpoint


def test_beats_month_to_date_pace() -> None:
    """The weekday profile and the history since the first spend beat extrapolating the month-to-date pace."""
    assert mape_by("weekly") * 2 < mape_by("weekly", None, pace)  # measured 1.2% vs 5.3%
    assert mape_by("started") * 4 < mape_by("started", None, pace)  # measured 1.2% vs 10.9%


def test_trend_term_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the trend term the growth scenario misses its bound: the bound tests the trend."""
    monkeypatch.setattr(forecast_module, "MIN_TREND_DAYS", 10**6)
    points = [p for seed in SEEDS for p in backtest(simulate("growth", seed), forecast, "growth", seed)]
    assert mape(points) > BOUNDS["growth"][0], mape(points)  # measured 16.5%


def test_weekday_profile_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the weekday profile the weekly scenario misses its bound: the bound tests the profile."""
    monkeypatch.setattr(forecast_module, "MIN_PROFILE_DAYS", 10**6)
    points = [p for seed in SEEDS for p in backtest(simulate("weekly", seed), forecast, "weekly", seed)]
    assert mape(points) > BOUNDS["weekly"][0], mape(points)  # measured 6.1%


def test_forecast_never_below_spent_in_backtests() -> None:
    assert all(p.predicted >= p.spent for p in results())
    assert all(p.predicted >= p.spent for p in results(naive))
    assert all(p.predicted >= p.spent for p in results(pace))


def test_started_mid_month() -> None:
    """Before the team's first spend there is nothing to forecast; from its first day the forecast follows it."""
    for seed in SEEDS:
        spend = simulate("started", seed)
        assert all(v == 0 for d, v in spend.items() if d < STARTED)
        now = datetime.combine(STARTED - timedelta(days=5), time(12), tzinfo=TZ)
        assert forecast(window("month", now, TZ), now, 0.0, 0.0, {}) == 0.0
    first_month = [p for p in results() if p.scenario == "started" and p.month == STARTED.replace(day=1)]
    assert {p.checkpoint for p in first_month} == {c for c in CHECKPOINTS if c >= STARTED.day}
    # On its first day (no full day yet) the forecast extrapolates the day's pace; later the history, which
    # starts at the first spend rather than being diluted by the empty days before it.
    assert mape(first_month) < 0.05, mape(first_month)  # measured 2.1%
    assert max(p.ape for p in first_month) < 0.15  # measured 9.6%


def test_stopped_mid_month() -> None:
    before = [p for p in results() if p.scenario == "stopped" and p.month < STOPPED.replace(day=1)]
    assert mape(before) < 0.03, mape(before)  # measured 1.2%
    stop_month = [p for p in results() if p.scenario == "stopped" and p.month == STOPPED.replace(day=1)]
    by_day = {c: mape([p for p in stop_month if p.checkpoint == c]) for c in CHECKPOINTS}
    # The run-rate forgets the old level with a 3-day half-life: 5 and 10 days after the stop.
    assert by_day[20] < 0.35, by_day  # measured 25.0%
    assert by_day[25] < 0.08, by_day  # measured 4.2%
    assert by_day[25] < by_day[20] < by_day[15]


# --- edge cases -----------------------------------------------------------------------------------------------


def local(day: date, hour: int = 12, minute: int = 0, fold: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute, fold=fold), tzinfo=TZ)


def flat_history(today: date, value: float = 100.0, days: int = 28) -> dict[date, float]:
    return {today - timedelta(days=i): value for i in range(1, days + 1)}


def forecast_at(period: Period, now: datetime, spent: float, today: float, history: Mapping[date, float]) -> float:
    return forecast(window(period, now, TZ), now, spent, today, history)


@pytest.mark.parametrize("period", PERIODS)
@pytest.mark.parametrize("hour", [0, 1, 12, 23])
def test_no_history_no_spend_is_zero(period: Period, hour: int) -> None:
    assert forecast_at(period, local(date(2026, 2, 10), hour), 0.0, 0.0, {}) == 0.0


def test_no_history_extrapolates_todays_pace() -> None:
    now = local(date(2026, 2, 10), 6)  # Tuesday, a quarter of the day gone: a pace of 40 USD/day
    assert forecast_at("day", now, 10.0, 10.0, {}) == pytest.approx(10 + 30)
    assert forecast_at("week", now, 10.0, 10.0, {}) == pytest.approx(10 + 30 + 5 * 40)  # Wednesday..Sunday
    assert forecast_at("month", now, 10.0, 10.0, {}) == pytest.approx(10 + 30 + 18 * 40)  # 11..28 February
    # `now` in UTC is read in the window's timezone.
    assert forecast_at("day", now.astimezone(ZoneInfo("UTC")), 10.0, 10.0, {}) == pytest.approx(40)


def test_history_starts_at_first_spend() -> None:
    """Three days of history at 100/day forecast 100/day, not diluted by the days before the team existed."""
    today = date(2026, 2, 10)
    history = flat_history(today, days=3)
    assert forecast_at("month", local(today), 550.0, 50.0, history) == pytest.approx(550 + 50 + 18 * 100)


def test_ignores_history_from_today_on() -> None:
    today = date(2026, 2, 10)
    history = flat_history(today)
    polluted = {**history, today: 1e6, today + timedelta(days=3): 1e6}
    for period in PERIODS:
        assert forecast_at(period, local(today), 950.0, 50.0, polluted) == forecast_at(
            period, local(today), 950.0, 50.0, history
        )


def test_last_day_of_month() -> None:
    today = date(2026, 1, 31)  # a Saturday: its week runs into February
    history = flat_history(today)
    assert forecast_at("month", local(today, 18), 3075.0, 75.0, history) == pytest.approx(3075 + 25)
    assert forecast_at("day", local(today, 18), 75.0, 75.0, history) == pytest.approx(100)
    assert forecast_at("week", local(today, 18), 575.0, 75.0, history) == pytest.approx(575 + 25 + 100)
    # In the last second of the month nothing but the rest of that second remains.
    end = datetime.combine(today, time(23, 59, 59), tzinfo=TZ)
    assert forecast_at("month", end, 3100.0, 100.0, history) == pytest.approx(3100, abs=0.01)
    # The day's forecast and the month's differ by exactly the month's earlier days.
    assert forecast_at("month", local(today, 9), 3030.0, 30.0, history) - forecast_at(
        "day", local(today, 9), 30.0, 30.0, history
    ) == pytest.approx(3000)


@pytest.mark.parametrize(("day", "hours"), [(date(2026, 3, 29), 23), (date(2026, 10, 25), 25), (date(2026, 2, 18), 24)])
def test_dst_days(day: date, hours: int) -> None:
    w = window("day", local(day), TZ)
    assert w.end_ts - w.start_ts == hours * 3600
    week = window("week", local(day), TZ)
    assert week.end_ts - week.start_ts == (7 * 24 + hours - 24) * 3600
    month = window("month", local(day), TZ)
    month_days = (next_first_day("month", day.replace(day=1)) - day.replace(day=1)).days
    assert month.end_ts - month.start_ts == (month_days * 24 + hours - 24) * 3600
    # A team spending 1 USD per real hour since midnight, seen at noon local time (in UTC).
    now = local(day).astimezone(ZoneInfo("UTC"))
    spent = (now.timestamp() - w.start_ts) / 3600
    assert spent == {23: 11, 24: 12, 25: 13}[hours]
    day_forecast = forecast(w, now, spent, spent, {})
    # The forecaster reads today's elapsed part on the wall clock (12 of 24 hours at noon), so on a 23- or 25-hour
    # day it is off by at most the hour gained or lost (22 or 26 here); a 24-hour day is exact. A forecaster that
    # measured elapsed time in real hours would be exact on every day and pass too.
    assert abs(day_forecast - hours) <= 1 + 1e-9, day_forecast
    if hours == 24:
        assert day_forecast == pytest.approx(24)
    # The day's forecast stays inside the day (the next day would add another 100).
    history = flat_history(day)
    assert abs(forecast(w, now, 50.0, 50.0, history) - 100) < 10
    # The month's forecast adds the calendar days after today, whatever their length.
    days_left = (next_first_day("month", day.replace(day=1)) - day).days - 1
    month_forecast = forecast(month, now, 2850.0, 50.0, history)
    assert month_forecast - forecast(w, now, 50.0, 50.0, history) == pytest.approx(2800 + 100 * days_left)
    # An hour before the day ends (local time, after the change) about an hour of spend remains.
    late = forecast(w, local(day, 23), 90.0, 90.0, history)
    assert 90 + 100 / 25 - 1e-9 <= late <= 90 + 100 / 23 + 1e-9
    if hours == 25:
        # In the repeated hour the second 02:30 (an hour later in real time) forecasts no more than the first.
        first, second = (local(day, 2, 30, fold=f) for f in (0, 1))
        assert second.timestamp() - first.timestamp() == 3600
        assert 10 < forecast(w, second, 10.0, 10.0, history) <= forecast(w, first, 10.0, 10.0, history)


def test_week_and_day_periods() -> None:
    wednesday = date(2026, 2, 11)
    history = flat_history(wednesday)
    assert forecast_at("week", local(wednesday), 250.0, 50.0, history) == pytest.approx(250 + 50 + 4 * 100)
    assert forecast_at("day", local(wednesday), 50.0, 50.0, history) == pytest.approx(100)
    # A day above its usual pace keeps that pace for the rest of the day.
    assert forecast_at("day", local(wednesday), 150.0, 150.0, history) == pytest.approx(300)
    assert forecast_at("week", local(wednesday), 350.0, 150.0, history) == pytest.approx(350 + 150 + 4 * 100)


def test_weekday_profile_in_week_and_day() -> None:
    """Weekends at 20% of weekdays: the rest of the week counts two quiet days, and a Saturday is quiet."""
    wednesday = date(2026, 2, 11)
    history = {d: (100.0 if d.weekday() < 5 else 20.0) for d in flat_history(wednesday)}
    assert forecast_at("week", local(wednesday), 250.0, 50.0, history) == pytest.approx(250 + 50 + 200 + 40)
    saturday = date(2026, 2, 14)
    history = {d: (100.0 if d.weekday() < 5 else 20.0) for d in flat_history(saturday)}
    assert forecast_at("day", local(saturday), 10.0, 10.0, history) == pytest.approx(20)
    assert forecast_at("week", local(saturday), 510.0, 10.0, history) == pytest.approx(510 + 10 + 20)
    # Under 14 days of history there is no profile yet.
    history = {d: (100.0 if d.weekday() < 5 else 20.0) for d in flat_history(saturday, days=13)}
    assert forecast_at("day", local(saturday), 10.0, 10.0, history) > 40


def test_never_below_spent_in_period() -> None:
    rng = random.Random("never-below")
    for _ in range(3000):
        today = date(2026, 1, 1) + timedelta(days=rng.randrange(365))
        history = {
            today - timedelta(days=i): rng.choice([0.0, rng.uniform(0, 1), rng.uniform(0, 1000), rng.uniform(0, 1e6)])
            for i in range(1, rng.randrange(1, 45))
            if rng.random() < 0.8
        }
        now = local(today, rng.randrange(24), rng.randrange(60), fold=rng.randrange(2))
        spent_today = rng.choice([0.0, rng.uniform(0, 10), rng.uniform(0, 1e5)])
        spent = spent_today + rng.choice([0.0, rng.uniform(0, 1e5)])
        for period in PERIODS:
            got = forecast_at(period, now, spent_today if period == "day" else spent, spent_today, history)
            assert math.isfinite(got)
            assert got >= (spent_today if period == "day" else spent), (period, now, history)


def main() -> None:
    print(f"Month-end forecast MAPE (%), {len(SEEDS)} seeds x {len(EVAL_MONTHS)} months, noon {TZ.key}")
    print(mape_table())


if __name__ == "__main__":
    main()
