"""Reconciliation: the ledger checked against each provider's own usage and cost reports.

`client.py` talks to an admin API (pages, retries); `openai.py` and `anthropic.py` each turn one provider's reports
into a `ProviderBill`; `compare.py` sets that bill beside the ledger's totals and explains every difference;
`periodic.py` runs it inside `serve` for the gauges and the alert.
"""

from metergate.reconcile.bill import ProviderBill, ProviderCharge, ProviderUsage, ReconcileError

__all__ = ["ProviderBill", "ProviderCharge", "ProviderUsage", "ReconcileError"]
