"""One reconciliation of one configured provider: its admin API read in full, the ledger summed, both compared."""

from __future__ import annotations

import os
from datetime import UTC, datetime

from metergate.config import Config, ProviderConfig, ReconcileConfig
from metergate.ledger import Ledger
from metergate.pricing import PriceBook
from metergate.reconcile.anthropic import AnthropicBilling
from metergate.reconcile.bill import ReconcileError
from metergate.reconcile.client import AdminClient
from metergate.reconcile.compare import Reconciliation, reconcile
from metergate.reconcile.openai import OpenAIBilling
from metergate.reconcile.source import BillingSource


def _secret(env: str | None, what: str) -> str:
    value = os.environ.get(env) if env else None
    if not value:
        raise ReconcileError(f"{what}: environment variable {env} is not set" if env else f"{what}: no key configured")
    return value


def billing_source(name: str, provider: ProviderConfig, settings: ReconcileConfig) -> BillingSource:
    """The admin API reader for a provider's type, authenticated as that API expects its admin key."""
    admin_key = _secret(settings.admin_key_env, f"reconcile.{name}.admin_key_env")
    base = settings.base_url or provider.base_url
    if provider.type == "openai":
        headers = {"authorization": f"Bearer {admin_key}"}
        cls: type[BillingSource] = OpenAIBilling
    else:
        headers = {"x-api-key": admin_key, "anthropic-version": "2023-06-01"}
        cls = AnthropicBilling
    headers["user-agent"] = "metergate-reconcile"
    client = AdminClient(
        name,
        base,
        headers,
        timeout_s=settings.timeout_s,
        max_retries=settings.max_retries,
        max_wait_s=settings.max_wait_s,
    )
    return cls(name, client)


async def reconcile_provider(
    cfg: Config, name: str, ledger: Ledger, prices: PriceBook, first_day: int, last_day: int
) -> Reconciliation:
    """The provider's reports from the first to the last UTC day (inclusive) beside the ledger's. Raises
    `ReconcileError` when a report cannot be read in full."""
    settings, provider = cfg.reconcile[name], cfg.providers[name]
    source = billing_source(name, provider, settings)
    async with source.client:
        if settings.api_key_ids:
            keys = set(settings.api_key_ids)
        else:
            keys = await source.key_ids_of(_secret(provider.api_key_env, f"providers.{name}.api_key_env"))
        bill = await source.bill(first_day, last_day)
    await ledger.flush_now()
    store = await ledger.store()
    days = await ledger.call(store.provider_days, first_day * 86400.0, (last_day + 1) * 86400.0)
    pricing_provider = provider.pricing_provider_id
    return reconcile(
        bill,
        [d for d in days if d.provider == name],
        keys,
        first_day,
        last_day,
        lambda model, day: prices.per_mtok(name, pricing_provider, model, datetime.fromtimestamp(day * 86400, UTC)),
    )
