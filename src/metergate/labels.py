"""Bounded metric label values.

Every label value comes from the config or from a finite catalogue; anything a client could invent becomes
`other`, so no client can grow the number of series Prometheus stores.
"""

from __future__ import annotations

from metergate.config import RESERVED_LABELS, Config
from metergate.price_table import table_model
from metergate.pricing import PriceBook

OTHER = "other"
UNAUTHENTICATED = "unauthenticated"
assert {OTHER, UNAUTHENTICATED} == RESERVED_LABELS
_MAX_CACHED_MODELS = 10_000


class LabelPolicy:
    def __init__(self, config: Config, prices: PriceBook) -> None:
        self.teams = set(config.known_teams())
        self.apps = set(config.known_apps())
        self._prices = prices
        named: set[str] = set()
        for route in config.routes:
            if route.named_model is not None:
                named.add(route.named_model)
            if route.upstream_model:
                named.add(route.upstream_model)
        for price in config.prices:
            if not any(c in price.model for c in "*?["):
                named.add(price.model)
        for provider in config.providers.values():
            named.update(provider.deployments)
            named.update(provider.deployments.values())
        self.named_models = frozenset(named)
        self._models: dict[tuple[str, str], str] = {}

    def allow(self, team: str, app: str) -> None:
        """Teams and apps of keys created at run time are as legitimate as the config's."""
        self.teams.add(team)
        self.apps.add(app)

    def team(self, value: str) -> str:
        return value if value in self.teams else OTHER

    def app(self, value: str) -> str:
        return value if value in self.apps else OTHER

    def model(self, provider_name: str, pricing_provider: str | None, model: str) -> str:
        """The config's own name for a model, else its catalogue id, else `other`."""
        key = (provider_name, model)
        label = self._models.get(key)
        if label is None:
            if model in self.named_models:
                label = model
            else:
                entry = self._prices.lookup(pricing_provider, model)
                # Models only the unit price table knows (DALL-E, Imagen) go by the table's bounded names.
                label = entry.model.id if entry is not None else table_model(pricing_provider, model) or OTHER
            if len(self._models) >= _MAX_CACHED_MODELS:
                self._models.clear()
            self._models[key] = label
        return label
