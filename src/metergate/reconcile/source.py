"""The one interface every provider's reports are read through, and what all of them share."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from typing import Any

from metergate.reconcile.bill import ProviderBill, ReconcileError, day_of
from metergate.reconcile.client import AdminClient

_ELISION = re.compile(r"\.{3,}|…|\*{3,}")


def hint_matches(hint: str, key: str) -> bool:
    """Whether a provider's redacted key (`sk-abc...wxyz`, `sk-ant-api03-R2D...igAA`) can be `key`: the part
    before the elision must start it and the part after must end it."""
    parts = _ELISION.split(hint)
    if len(parts) != 2 or not parts[0] or not parts[1]:
        return False
    head, tail = parts
    return len(key) >= len(head) + len(tail) and key.startswith(head) and key.endswith(tail)


def buckets(page: dict[str, Any], what: str) -> list[dict[str, Any]]:
    data = page.get("data")
    if not isinstance(data, list) or not all(isinstance(b, dict) for b in data):
        raise ReconcileError(f"{what}: the answer has no list of buckets")
    return data


def check_days(days: list[int], first: int, last: int, what: str) -> None:
    """A report must have one bucket per day asked for: a day missing or repeated would be a wrong total posing as
    a complete one."""
    if len(days) != len(set(days)):
        raise ReconcileError(f"{what}: the report has the same day more than once")
    missing = sorted(set(range(first, last + 1)) - set(days))
    if missing:
        raise ReconcileError(f"{what}: the report has no bucket for {day_of(missing[0])} ({len(missing)} days missing)")


def results(bucket: dict[str, Any], what: str) -> Iterable[dict[str, Any]]:
    items = bucket.get("results")
    if not isinstance(items, list):
        raise ReconcileError(f"{what}: a bucket has no results list")
    return (r for r in items if isinstance(r, dict))


class BillingSource(ABC):
    """Reads one provider's usage and cost reports over whole UTC days, and finds the gateway's key among its keys."""

    def __init__(self, provider: str, client: AdminClient) -> None:
        self.provider = provider
        self.client = client

    @abstractmethod
    async def bill(self, first_day: int, last_day: int) -> ProviderBill:
        """Usage and charges from the start of `first_day` to the end of `last_day` (days since 1970-01-01)."""

    @abstractmethod
    def key_hints(self) -> AsyncIterator[tuple[str, str]]:
        """(key id, redacted key) for every API key of the organisation."""

    async def key_ids_of(self, secret: str) -> set[str]:
        """The provider-side id of the key the gateway uses, found by its redacted form."""
        found = {key_id async for key_id, hint in self.key_hints() if hint_matches(hint, secret)}
        if len(found) != 1:
            which = "none" if not found else f"{len(found)} ({', '.join(sorted(found)[:5])})"
            raise ReconcileError(
                f"{self.provider}: {which} of the organisation's API keys look like the gateway's key; "
                f"set reconcile.{self.provider}.api_key_ids"
            )
        return found
