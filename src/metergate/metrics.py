"""The Prometheus metrics, named exactly as the seed wrote them.

The seed names `llm_tokens_in`, `llm_tokens_out` and `llm_total_cost_usd` and queries them verbatim
(`sum by (team) (llm_tokens_in + llm_tokens_out) * 0.00002`). prometheus_client's Counter would expose them as
`..._total`, and a counter without that suffix fails `promtool check metrics`, so these three are exposed as
untyped, monotonically increasing series. The `_total` metrics are ordinary counters.

All series live in plain dicts updated from the event loop thread and exposed by a custom collector, which keeps
the per-request cost to a few dict operations. Each label set owns its tokens-in and tokens-out series together,
so the seed's `llm_tokens_in + llm_tokens_out` always finds both sides of the match.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import version
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector

from metergate.usage import UNITS, UsageRecord

LABELS = ("team", "app", "endpoint", "model", "provider", "code")
IN_FLIGHT_LABELS = ("team", "app", "endpoint", "provider")
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    180.0,
    300.0,
)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)

LabelKey = tuple[str, str, str, str, str, str]


class _Histogram:
    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


def histogram_quantile(q: float, bounds: tuple[float, ...], counts: list[int]) -> float | None:
    """The q-quantile of a histogram as Prometheus's histogram_quantile computes it: linear within the bucket the
    rank falls in; the highest finite bound when it falls in +Inf; None without observations."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    running = 0
    for i, n in enumerate(counts):
        if running + n >= rank and n:
            if i == len(bounds):
                return bounds[-1]
            low = bounds[i - 1] if i > 0 else 0.0
            return low + (bounds[i] - low) * (rank - running) / n
        running += n
    return bounds[-1]


class _Series:
    """Everything counted for one label set."""

    __slots__ = (
        "cache_write_in",
        "cached_in",
        "cost",
        "latency",
        "reasoning_out",
        "requests",
        "tokens_in",
        "tokens_out",
        "ttft",
        "unmetered",
        "unpriced",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.cached_in = 0
        self.cache_write_in = 0
        self.reasoning_out = 0
        self.cost = 0.0
        self.unpriced = 0
        self.unmetered = 0
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.ttft: _Histogram | None = None


class Meter(Collector):
    """Counts finished requests and exposes them to Prometheus."""

    def __init__(self) -> None:
        self._series: dict[LabelKey, _Series] = {}
        self._errors: dict[tuple[str, ...], int] = {}
        self._units: dict[tuple[str, ...], int] = {}  # LABELS + unit (a closed set: usage.UNITS)
        self._anomalies: dict[tuple[str, ...], int] = {}  # LABELS + anomaly (usage.INCONSISTENT, INCOMPLETE)
        self._in_flight: dict[tuple[str, str, str, str], int] = {}
        self._extra: list[Callable[[], Iterable[Metric]]] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._build = {"version": version("metergate"), "genai_prices": version("genai-prices")}

    def traffic(self, team: str | None = None) -> dict[str, Any]:
        """Requests, errors and latency quantiles counted by this process since it started (of one team), for the
        console: the same counters /metrics exposes, with the quantiles `histogram_quantile` would give."""
        counts = [0] * (len(LATENCY_BUCKETS) + 1)
        requests = errors = 0
        for key, s in list(self._series.items()):
            if team is not None and key[0] != team:
                continue
            requests += s.requests
            if int(key[5]) >= 400:
                errors += s.requests
            for i, n in enumerate(s.latency.counts):
                counts[i] += n
        return {
            "requests": requests,
            "errors": errors,
            "error_rate": errors / requests if requests else 0.0,
            "latency_p50_s": histogram_quantile(0.5, LATENCY_BUCKETS, counts),
            "latency_p95_s": histogram_quantile(0.95, LATENCY_BUCKETS, counts),
        }

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """More metric families computed at scrape time (budget and spend gauges)."""
        self._extra.append(collect)

    def record(self, rec: UsageRecord) -> None:
        key: LabelKey = (rec.team, rec.app, rec.endpoint, rec.model, rec.provider, str(rec.code))
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        usage = rec.usage
        series.requests += 1
        series.tokens_in += usage.input_tokens
        series.tokens_out += usage.output_tokens
        series.cached_in += usage.cache_read_tokens
        series.cache_write_in += usage.cache_write_tokens
        series.reasoning_out += usage.reasoning_tokens
        series.cost += float(rec.cost_usd)
        if not rec.priced:
            series.unpriced += 1
        if not rec.metered:
            series.unmetered += 1
        series.latency.observe(rec.latency_s)
        if rec.ttft_s is not None:
            if series.ttft is None:
                series.ttft = _Histogram(TTFT_BUCKETS)
            series.ttft.observe(rec.ttft_s)
        if rec.error_type is not None:
            error_key = (*key, rec.error_type)
            self._errors[error_key] = self._errors.get(error_key, 0) + 1
        if usage.units:
            for unit, n in usage.units.items():
                # `image/1024x1024/hd` is counted as `image`: the size and quality stay in the ledger.
                unit = unit.split("/", 1)[0]
                if n and unit in UNITS:
                    unit_key = (*key, unit)
                    self._units[unit_key] = self._units.get(unit_key, 0) + n
        for flag in usage.flags:
            flag_key = (*key, flag)
            self._anomalies[flag_key] = self._anomalies.get(flag_key, 0) + 1

    def request_started(self, team: str, app: str, endpoint: str, provider: str) -> None:
        key = (team, app, endpoint, provider)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def request_finished(self, team: str, app: str, endpoint: str, provider: str) -> None:
        key = (team, app, endpoint, provider)
        self._in_flight[key] -= 1

    def in_flight(self) -> int:
        return sum(self._in_flight.values())

    def collect(self) -> Iterator[Metric]:
        series = list(self._series.items())
        untyped = (
            (
                "llm_tokens_in",
                "Input tokens billed by the provider, cached reads and cache writes included.",
                "tokens_in",
            ),
            ("llm_tokens_out", "Output tokens billed by the provider, reasoning included.", "tokens_out"),
            ("llm_total_cost_usd", "Cost in USD priced from the provider's own usage figures.", "cost"),
            (
                "llm_tokens_in_cached",
                "Input tokens read from the provider's prompt cache (within llm_tokens_in).",
                "cached_in",
            ),
            (
                "llm_tokens_in_cache_write",
                "Input tokens written to the prompt cache (within llm_tokens_in).",
                "cache_write_in",
            ),
            (
                "llm_tokens_out_reasoning",
                "Reasoning/thinking tokens (within llm_tokens_out).",
                "reasoning_out",
            ),
        )
        for name, help_text, attr in untyped:
            family = UnknownMetricFamily(name, help_text, labels=LABELS)
            for key, s in series:
                family.add_metric(key, getattr(s, attr))
            yield family
        requests = CounterMetricFamily("llm_requests", "Requests that reached an API route.", labels=LABELS)
        unpriced = CounterMetricFamily(
            "llm_unpriced_requests",
            "Requests for a model with no known price (cost not counted).",
            labels=LABELS,
        )
        unmetered = CounterMetricFamily(
            "llm_unmetered_requests",
            "Requests that reached a provider whose usage could not be read (billed, not in tokens or cost).",
            labels=LABELS,
        )
        latency = HistogramMetricFamily(
            "llm_latency_seconds", "Time from request start to the last byte of the response.", labels=LABELS
        )
        ttft = HistogramMetricFamily(
            "llm_time_to_first_token_seconds",
            "Time from request start to the first streamed byte.",
            labels=LABELS,
        )
        for key, s in series:
            requests.add_metric(key, s.requests)
            if s.unpriced:
                unpriced.add_metric(key, s.unpriced)
            if s.unmetered:
                unmetered.add_metric(key, s.unmetered)
            latency.add_metric(key, s.latency.cumulative(), s.latency.sum)
            if s.ttft is not None:
                ttft.add_metric(key, s.ttft.cumulative(), s.ttft.sum)
        yield requests
        errors = CounterMetricFamily(
            "llm_errors", "Requests that ended in an error, by error_type.", labels=(*LABELS, "error_type")
        )
        for error_key, n in list(self._errors.items()):
            errors.add_metric(error_key, n)
        yield errors
        units = CounterMetricFamily(
            "llm_billed_units",
            "Non-token charges the provider billed (web searches, fetches, containers, images...); cost in "
            "llm_total_cost_usd.",
            labels=(*LABELS, "unit"),
        )
        for unit_key, n in list(self._units.items()):
            units.add_metric(unit_key, n)
        yield units
        anomalies = CounterMetricFamily(
            "llm_usage_anomalies",
            "Requests whose usage was inconsistent (recorded, priced conservatively) or incomplete (a lower bound).",
            labels=(*LABELS, "anomaly"),
        )
        for flag_key, n in list(self._anomalies.items()):
            anomalies.add_metric(flag_key, n)
        yield anomalies
        yield latency
        yield ttft
        yield unpriced
        yield unmetered
        in_flight = GaugeMetricFamily("llm_requests_in_flight", "Requests being served now.", labels=IN_FLIGHT_LABELS)
        for flight_key, n in list(self._in_flight.items()):
            in_flight.add_metric(flight_key, n)
        yield in_flight
        info = GaugeMetricFamily(
            "metergate_build_info",
            "metergate version and the pinned genai-prices version.",
            labels=list(self._build),
        )
        info.add_metric(list(self._build.values()), 1)
        yield info
        for extra in self._extra:
            yield from extra()
