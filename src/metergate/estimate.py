"""A request's worst case before it is sent: the tokens it can be billed for, which budgets price and rate limits
count.

Input: a token is at least 3 bytes of the request body in practice; the estimate is rounded up to a multiple of
256 tokens, so the price of a request shape is computed once and reused (still an upper bound). Output: the
client's own cap (`max_tokens` and its equivalents) or the configured default, times the number of choices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from metergate.exchange import RequestContext


def worst_case_tokens(ctx: RequestContext, default_max_output_tokens: int) -> tuple[int, int]:
    """(input, output) tokens the request can be billed for at most; (0, 0) for a call the gateway cannot read."""
    if ctx.facts is None:
        return 0, 0
    body_bytes = len(ctx.raw_body) if ctx.raw_body is not None else 0
    input_tokens = -(-(body_bytes // 3 + 16) // 256) * 256
    cap = ctx.facts.max_output_tokens or default_max_output_tokens
    return input_tokens, cap * ctx.facts.choices  # every choice (OpenAI n, Gemini candidateCount) is billed
