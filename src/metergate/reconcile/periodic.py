"""Reconciliation inside `serve`: each provider with `reconcile.<name>.every_s` is reconciled on that schedule over
its last finished UTC days, and the result is exported as gauges for the LLMReconciliationGap alert."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from metergate.config import Config
from metergate.ledger import Ledger
from metergate.pricing import PriceBook
from metergate.reconcile.bill import ReconcileError, day_of_timestamp
from metergate.reconcile.compare import Reconciliation
from metergate.reconcile.run import reconcile_provider

log = logging.getLogger("metergate.reconcile")


def finished_days(now: float, settle_s: float, lookback_days: int) -> tuple[int, int]:
    """The last `lookback_days` UTC days that ended at least `settle_s` ago (the provider has published them)."""
    last = day_of_timestamp(now - settle_s) - 1
    return last - lookback_days + 1, last


@dataclass
class _Outcome:
    gap_usd: float = 0.0
    ratio: float = math.nan
    gateway_usd: float = 0.0
    provider_usd: float = 0.0
    bypass_usd: float = 0.0
    last_success: float = 0.0
    errors: int = 0


class PeriodicReconciler:
    def __init__(
        self, config: Config, ledger: Ledger, prices: PriceBook, clock: Callable[[], float] = time.time
    ) -> None:
        self.config, self.ledger, self.prices, self.clock = config, ledger, prices, clock
        self.providers = {n: r for n, r in config.reconcile.items() if r.every_s is not None}
        self.outcomes = {n: _Outcome() for n in self.providers}
        self._tasks: list[asyncio.Task[None]] = []

    async def reconcile_once(self, name: str) -> Reconciliation | None:
        settings = self.providers[name]
        first, last = finished_days(self.clock(), settings.settle_s, settings.lookback_days)
        outcome = self.outcomes[name]
        try:
            result = await reconcile_provider(self.config, name, self.ledger, self.prices, first, last)
        except ReconcileError as exc:
            outcome.errors += 1
            log.warning("reconciliation of %s failed, gauges keep the last result: %s", name, exc)
            return None
        except Exception:  # a bug here must not stop the gateway, nor the next attempt
            outcome.errors += 1
            log.exception("reconciliation of %s failed", name)
            return None
        totals = result.totals()
        outcome.gap_usd = float(totals["gap_usd"])
        outcome.ratio = totals["ratio"]
        outcome.gateway_usd = float(totals["gateway_cost_usd"])
        outcome.provider_usd = float(totals["provider_cost_usd"])
        outcome.bypass_usd = float(totals["bypass_cost_usd"])
        outcome.last_success = self.clock()
        log.info(
            "reconciled %s over %d UTC days: gateway $%.6f, provider $%.6f, ratio %.6f, other keys $%.6f",
            name,
            last - first + 1,
            outcome.gateway_usd,
            outcome.provider_usd,
            outcome.ratio,
            outcome.bypass_usd,
        )
        return result

    async def _loop(self, name: str, every_s: float) -> None:
        while True:
            await self.reconcile_once(name)
            await asyncio.sleep(every_s)

    async def start(self) -> None:
        for name, settings in self.providers.items():
            assert settings.every_s is not None
            self._tasks.append(asyncio.create_task(self._loop(name, settings.every_s), name=f"reconcile-{name}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()

    def collect(self) -> Iterator[Metric]:
        if not self.outcomes:
            return
        window = "over the last finished UTC days (reconcile.<provider>.lookback_days), the gateway's own keys"
        # name, help, the value for a provider
        gauges: tuple[tuple[str, str, Callable[[str, _Outcome], float]], ...] = (
            ("gap_usd", f"Provider-billed minus gateway-metered cost {window}.", lambda n, o: o.gap_usd),
            (
                "ratio",
                f"Provider-billed over gateway-metered cost {window} (1 = exact; NaN before the first one).",
                lambda n, o: o.ratio,
            ),
            (
                "tolerance_ratio",
                "reconcile.<provider>.tolerance_ratio: how far the ratio may stray from 1 before LLMReconciliationGap.",
                lambda n, o: self.providers[n].tolerance_ratio,
            ),
            (
                "tolerance_usd",
                "reconcile.<provider>.tolerance_usd: the smallest gap in USD LLMReconciliationGap fires for.",
                lambda n, o: self.providers[n].tolerance_usd,
            ),
            (
                "bypass_usd",
                "Cost the provider billed under API keys the gateway does not use, over the same days.",
                lambda n, o: o.bypass_usd,
            ),
            (
                "last_success_timestamp_seconds",
                "When the provider's reports were last read in full (0: never).",
                lambda n, o: o.last_success,
            ),
        )
        for suffix, text, value in gauges:
            family = GaugeMetricFamily(f"llm_reconciliation_{suffix}", text, labels=["provider"])
            for name, outcome in self.outcomes.items():
                family.add_metric([name], value(name, outcome))
            yield family
        errors = CounterMetricFamily(
            "llm_reconciliation_errors",
            "Reconciliations that could not read the provider's reports.",
            labels=["provider"],
        )
        for name, outcome in self.outcomes.items():
            errors.add_metric([name], outcome.errors)
        yield errors
