"""What a request must pass before it is sent, and settles after: rate limits, then budgets.

Rate limits come first: they are the cheaper check, and a request refused for its rate never holds budget. A
request admitted by its rate limits and then refused by a budget was never sent: its reserved tokens are
returned to the rate limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from metergate.budgets import BudgetGuard
from metergate.ratelimits import RateLimiter, Ticket

if TYPE_CHECKING:
    from metergate.exchange import RequestContext
    from metergate.usage import UsageRecord


@dataclass(slots=True)
class Admitted:
    ticket: Ticket | None
    budgets: object | None


class AdmissionChain:
    def __init__(self, limiter: RateLimiter, budgets: BudgetGuard) -> None:
        self.limiter = limiter
        self.budgets = budgets

    async def reserve(self, ctx: RequestContext) -> object | None:
        ticket = await self.limiter.admit(ctx) if self.limiter.limits else None
        try:
            held = await self.budgets.reserve(ctx)
        except BaseException:
            # Refused by a budget (or the budget store failed): the request is not sent, its tokens are returned.
            self.limiter.cancel(ticket)
            raise
        if ticket is None:
            return held
        return Admitted(ticket, held)

    def settle(self, reservation: object | None, record: UsageRecord) -> None:
        if isinstance(reservation, Admitted):
            self.limiter.settle(reservation.ticket, record)
            reservation = reservation.budgets
        self.budgets.settle(reservation, record)
