"""Rate limits: requests and tokens per minute for any scope, exact across replicas through Redis.

Windows are calendar minutes of the Redis server's clock, so every replica counts a request in the same window.
Admission is one script call (one round trip): it checks every limit the request counts against and, only if all
admit it, adds one request and the request's worst-case tokens (input estimate + output cap) to each. After the
response the tokens are settled to the real usage (input + output), off the request path. Like budgets, a limit
admits while its count is under the limit, so concurrent bursts overshoot by at most one request's worst case.

Without `shared_state`, or while Redis does not answer within `timeout_s`, each gateway counts in process with
the same rules: limits then hold per replica (N replicas admit up to N times a limit). `metergate_shared_state_up`
says which; Redis is tried again every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from metergate.config import Config, RateLimitConfig, SharedStateConfig
from metergate.errors import GatewayError
from metergate.estimate import worst_case_tokens
from metergate.ledger import redact_url
from metergate.scopes import ScopeIndex, Subject, scope_id
from metergate.usage import INCOMPLETE, UsageRecord

if TYPE_CHECKING:
    from metergate.exchange import RequestContext

log = logging.getLogger("metergate.ratelimits")

# KEYS: one counter base per limit. ARGV: per limit, requests/min, tokens/min (0: none) and tokens to add.
# Returns {admitted, index of the refusing limit, 1 requests / 2 tokens, minute, ms to the next minute, then per
# limit the requests and tokens counted after this request (admitted) or the refusing limit's counts}.
_ADMIT = """
local now = redis.call('TIME')
local seconds = tonumber(now[1])
local minute = math.floor(seconds / 60)
local reset_ms = (minute + 1) * 60000 - (seconds * 1000 + math.floor(tonumber(now[2]) / 1000))
for i = 1, #KEYS do
  local base = KEYS[i] .. ':' .. minute
  local r = tonumber(redis.call('GET', base .. ':r') or '0')
  local t = tonumber(redis.call('GET', base .. ':t') or '0')
  local rpm = tonumber(ARGV[3 * i - 2])
  local tpm = tonumber(ARGV[3 * i - 1])
  if rpm > 0 and r >= rpm then return {0, i, 1, minute, reset_ms, r, t} end
  if tpm > 0 and t >= tpm then return {0, i, 2, minute, reset_ms, r, t} end
end
local out = {1, 0, 0, minute, reset_ms}
for i = 1, #KEYS do
  local base = KEYS[i] .. ':' .. minute
  out[#out + 1] = redis.call('INCR', base .. ':r')
  out[#out + 1] = redis.call('INCRBY', base .. ':t', ARGV[3 * i])
  redis.call('EXPIRE', base .. ':r', 180)
  redis.call('EXPIRE', base .. ':t', 180)
end
return out
"""


@dataclass(slots=True)
class Ticket:
    """What one admitted request holds: its worst-case tokens in each limit's counter of one minute."""

    minute: int
    counters: list[tuple[str, int]]  # (counter key, tokens reserved)
    shared: bool


@dataclass(slots=True)
class Verdict:
    admitted: bool
    limit: int = -1  # index of the refusing limit
    kind: str = ""  # "requests" or "tokens"
    minute: int = 0
    reset_s: float = 60.0
    requests: int = 0  # the refusing limit's counts
    tokens: int = 0


@dataclass
class LocalWindows:
    """The same counting in process: for one gateway, and for many while Redis is away."""

    counts: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    minute: int = 0

    def admit(self, keys: list[str], limits: list[tuple[int, int, int]], now: float) -> Verdict:
        minute = int(now // 60)
        if minute != self.minute:
            # Only this minute and the last can still be settled: older windows are dropped.
            self.counts = {k: v for k, v in self.counts.items() if k[1] >= minute - 1}
            self.minute = minute
        reset_s = (minute + 1) * 60 - now
        for i, (key, (rpm, tpm, _)) in enumerate(zip(keys, limits, strict=True)):
            r, t = self.counts.get((key, minute), (0, 0))
            if (rpm and r >= rpm) or (tpm and t >= tpm):
                kind = "requests" if rpm and r >= rpm else "tokens"
                return Verdict(False, i, kind, minute, reset_s, r, t)
        for key, (_, _, tokens) in zip(keys, limits, strict=True):
            slot = self.counts.setdefault((key, minute), [0, 0])
            slot[0] += 1
            slot[1] += tokens
        return Verdict(True, minute=minute, reset_s=reset_s)

    def adjust(self, key: str, minute: int, delta: int) -> None:
        slot = self.counts.get((key, minute))
        if slot is not None:
            slot[1] += delta


class SharedWindows:
    """The counters in Redis, with every call of a moment sent in one pipeline.

    Admissions that arrive while a pipeline is in flight wait for the next one, and settlements (the real usage
    replacing the worst case) ride along with it: under load, one round trip serves many requests, and a lone
    request still costs one. Each admission is one script call, atomic over all its limits.
    """

    def __init__(self, client: Any, timeout_s: float) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.sha = hashlib.sha1(_ADMIT.encode()).hexdigest()
        self._waiting: list[tuple[list[str], list[int], asyncio.Future[list[int]]]] = []
        self._deltas: dict[str, int] = {}
        self._flushing: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._settle_now = False

    async def admit(self, keys: list[str], limits: list[tuple[int, int, int]]) -> list[int]:
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._waiting.append((keys, [n for limit in limits for n in limit], future))
        self._kick()
        async with asyncio.timeout(self.timeout_s):
            return await future

    SETTLE_DELAY_S = 0.05

    def adjust(self, key: str, minute: int, delta: int) -> None:
        """Settlements wait for the next admission's round trip, or SETTLE_DELAY_S: sent on their own right away,
        they would hold up the next admission behind them."""
        if minute < time.time() // 60 - 1:
            return  # that window is over (a long request): nothing left to correct
        name = f"{key}:{minute}:t"
        self._deltas[name] = self._deltas.get(name, 0) + delta
        self._schedule_settlements()

    def _schedule_settlements(self) -> None:
        if self._timer is None and self._flushing is None and self._deltas:
            self._timer = asyncio.get_running_loop().call_later(self.SETTLE_DELAY_S, self._kick, True)

    async def drain(self, timeout_s: float) -> None:
        """Send what waits (settlements at shutdown), for at most `timeout_s`."""
        if self._deltas:
            self._kick(settle=True)
        if self._flushing is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._flushing), timeout_s)

    def _kick(self, settle: bool = False) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._settle_now |= settle
        if self._flushing is None:
            self._flushing = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        try:
            while self._waiting or (self._deltas and self._settle_now):
                self._settle_now = False
                waiting, self._waiting = self._waiting, []
                deltas, self._deltas = self._deltas, {}
                try:
                    results = await self._send(waiting, deltas)
                except Exception as exc:  # the connection failed: every caller of this round falls back
                    for _, _, future in waiting:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, _, future), result in zip(waiting, results, strict=False):
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result([int(v) for v in result])
        finally:
            self._flushing = None
            self._schedule_settlements()

    async def _send(
        self, waiting: list[tuple[list[str], list[int], asyncio.Future[list[int]]]], deltas: dict[str, int]
    ) -> list[Any]:
        from redis.exceptions import NoScriptError

        for attempt in range(2):
            if len(waiting) == 1 and not deltas:
                # A lone admission: the plain call costs less than a pipeline of one.
                keys, args, _ = waiting[0]
                try:
                    async with asyncio.timeout(max(self.timeout_s * 4, 1.0)):
                        return [await self.client.evalsha(self.sha, len(keys), *keys, *args)]
                except NoScriptError:
                    if attempt:
                        raise
                    await self.client.script_load(_ADMIT)
                    continue
            pipe = self.client.pipeline(transaction=False)
            for keys, args, _ in waiting:
                pipe.evalsha(self.sha, len(keys), *keys, *args)
            for name, delta in deltas.items():
                if delta:
                    pipe.incrby(name, delta)
                    pipe.expire(name, 180)  # a settlement never leaves a key without its expiry
            async with asyncio.timeout(max(self.timeout_s * 4, 1.0)):
                results: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results[: len(waiting)]):
                # A new or restarted Redis does not know the script yet: load it once and send the round again
                # (settlements were applied and are not sent twice).
                await self.client.script_load(_ADMIT)
                deltas = {}
                continue
            return results
        return results


class RateLimiter:
    """Admission by requests and tokens per minute, for every `rate_limits:` entry a request counts against."""

    RETRY_REDIS_S = 5.0

    def __init__(self, config: Config) -> None:
        self.limits = list(config.rate_limits)
        # A limit naming a user replaces the `*` limit of its scope that limits the same things.
        self.index: ScopeIndex[RateLimitConfig] = ScopeIndex(
            self.limits,
            lambda rl: scope_id(rl, "minute"),
            lambda rl: (rl.requests_per_minute is not None, rl.tokens_per_minute is not None),
        )
        self.default_max_output = config.budget_defaults.default_max_output_tokens
        self.shared: SharedStateConfig | None = config.shared_state
        self.prefix = f"{config.shared_state.key_prefix}:rl:" if config.shared_state else "rl:"
        self.local = LocalWindows()
        self.redis: Any = None
        self.counters: SharedWindows | None = None
        self.up = False
        self._retry_at = 0.0
        self.refused = {"requests": 0, "tokens": 0}
        self.fallbacks = 0

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.shared is None or not self.limits:
            return
        import redis.asyncio as aioredis

        self.redis = aioredis.Redis.from_url(
            self.shared.redis_url,
            socket_timeout=max(self.shared.timeout_s * 4, 1.0),
            socket_connect_timeout=self.shared.timeout_s,
        )
        self.counters = SharedWindows(self.redis, self.shared.timeout_s)
        try:
            async with asyncio.timeout(self.shared.timeout_s * 4):
                await self.redis.script_load(_ADMIT)
            self.up = True
        except Exception as exc:  # any failure to reach Redis: count in process until it answers
            self._down(exc)

    async def stop(self) -> None:
        if self.counters is not None:
            await self.counters.drain(2.0)
        if self.redis is not None:
            await self.redis.aclose()

    def _down(self, exc: BaseException) -> None:
        if self.up or not self._retry_at:
            log.warning(
                "rate limits: Redis at %s not reachable (%s); counting in this process until it answers",
                redact_url(self.shared.redis_url if self.shared else ""),
                type(exc).__name__ if not str(exc) else str(exc)[:200],
            )
        self.up = False
        self._retry_at = time.monotonic() + self.RETRY_REDIS_S

    # --- admission -------------------------------------------------------------------------------------------

    async def admit(self, ctx: RequestContext) -> Ticket | None:
        subject = Subject.of_request(ctx) if self.limits else None
        if subject is None:
            return None
        applicable = self.index.matching(subject)
        if not applicable:
            return None
        tokens_in, tokens_out = worst_case_tokens(ctx, self.default_max_output)
        worst = tokens_in + tokens_out
        # Entries of one scope share a counter (a requests limit and a tokens limit given apart): counted once,
        # against the strictest of each.
        merged: dict[str, tuple[int, int, RateLimitConfig]] = {}
        for rl, counter in applicable:
            rpm, tpm, first = merged.get(counter, (0, 0, rl))
            merged[counter] = (_strictest(rpm, rl.requests_per_minute), _strictest(tpm, rl.tokens_per_minute), first)
        keys = [self.prefix + counter for counter in merged]
        # No reservation needs to exceed the limit itself: it bounds every number the counters add.
        limits = [(rpm, tpm, min(worst, tpm or worst)) for rpm, tpm, _ in merged.values()]
        verdict, shared = await self._admit(keys, limits)
        if not verdict.admitted:
            counter = list(merged)[verdict.limit]
            rpm, tpm, rl = merged[counter]
            rl = rl.model_copy(update={"requests_per_minute": rpm or None, "tokens_per_minute": tpm or None})
            self.refused[verdict.kind] += 1
            raise self._refusal(ctx, rl, counter, verdict, subject.user)
        return Ticket(verdict.minute, [(k, lim[2]) for k, lim in zip(keys, limits, strict=True)], shared)

    async def _admit(self, keys: list[str], limits: list[tuple[int, int, int]]) -> tuple[Verdict, bool]:
        if self.counters is not None and (self.up or time.monotonic() >= self._retry_at):
            try:
                out = await self.counters.admit(keys, limits)
            except Exception as exc:  # an outage, a timeout or a refused script: never a reason to fail the request
                self._down(exc)
            else:
                if not self.up:
                    log.warning("rate limits: Redis answers again; limits are shared by every replica")
                self.up = True
                if out[0]:
                    return Verdict(True, minute=out[3], reset_s=out[4] / 1000), True
                return Verdict(
                    False, out[1] - 1, "requests" if out[2] == 1 else "tokens", out[3], out[4] / 1000, out[5], out[6]
                ), True
        self.fallbacks += self.counters is not None
        return self.local.admit(keys, limits, time.time()), False

    def settle(self, ticket: Ticket | None, record: UsageRecord) -> None:
        """The reserved worst case becomes the real tokens (kept as reserved when the bill is unknown)."""
        if ticket is None:
            return
        unknown = not record.metered or INCOMPLETE in record.usage.flags
        used = record.usage.input_tokens + record.usage.output_tokens
        deltas = [(key, used - reserved) for key, reserved in ticket.counters if not unknown and used != reserved]
        if not deltas:
            return
        self._adjust(ticket, deltas)

    def _adjust(self, ticket: Ticket, deltas: list[tuple[str, int]]) -> None:
        # A settlement lost with a Redis outage leaves the worst case counted until the minute ends: stricter,
        # never looser.
        for key, delta in deltas:
            if ticket.shared and self.counters is not None:
                self.counters.adjust(key, ticket.minute, delta)
            else:
                self.local.adjust(key, ticket.minute, delta)

    def cancel(self, ticket: Ticket | None) -> None:
        """A request admitted here and refused by a later check (a budget) was never sent: it counts for nothing.
        Its request stays counted (it was made); its tokens are returned."""
        if ticket is not None:
            self._adjust(ticket, [(key, -reserved) for key, reserved in ticket.counters])

    def _refusal(
        self, ctx: RequestContext, rl: RateLimitConfig, counter: str, v: Verdict, user: str | None
    ) -> GatewayError:
        limit = rl.requests_per_minute if v.kind == "requests" else rl.tokens_per_minute
        scope = rl.scope + (f" (user {user})" if rl.per_user and user is not None else "")
        message = (
            f"Rate limit reached: {scope} may use {limit:,} {v.kind} per minute; {v.requests:,} requests and "
            f"{v.tokens:,} tokens are counted in this minute. Retry in {math.ceil(v.reset_s)} s."
        )
        wait = max(1, math.ceil(v.reset_s))
        headers = {
            "retry-after": str(wait),
            "retry-after-ms": str(max(1, int(v.reset_s * 1000))),
            "x-should-retry": "true",
            "x-metergate-rate-limit": counter[:256],
        }
        headers.update(_limit_headers(ctx.family, rl, v))
        return GatewayError(429, "rate_limit_exceeded", message, code="rate_limit_exceeded", headers=headers)

    # --- metrics ---------------------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        if self.shared is not None:
            up = GaugeMetricFamily(
                "metergate_shared_state_up", "1 while rate limits are shared through Redis, 0 while counted here."
            )
            up.add_metric([], 1.0 if self.up else 0.0)
            yield up
            fallback = CounterMetricFamily(
                "metergate_rate_limit_local_decisions", "Rate-limit decisions taken in process while Redis was away."
            )
            fallback.add_metric([], self.fallbacks)
            yield fallback
        refused = CounterMetricFamily(
            "metergate_rate_limited", "Requests refused by a rate limit, by what ran out.", labels=("limit",)
        )
        for kind, n in self.refused.items():
            refused.add_metric([kind], n)
        yield refused


def _strictest(current: int, limit: int | None) -> int:
    """The smaller of two limits, where 0 means none."""
    if not limit:
        return current
    return min(current, limit) if current else limit


def _limit_headers(family: str, rl: RateLimitConfig, v: Verdict) -> dict[str, str]:
    """The rate-limit headers each SDK family reads, for the limits of the refusing entry."""
    out: dict[str, str] = {}
    kinds = (("requests", rl.requests_per_minute, v.requests), ("tokens", rl.tokens_per_minute, v.tokens))
    for kind, limit, used in kinds:
        if limit is None:
            continue
        remaining = max(0, limit - used)
        if family == "anthropic":
            reset = datetime.fromtimestamp((v.minute + 1) * 60, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            out |= {
                f"anthropic-ratelimit-{kind}-limit": str(limit),
                f"anthropic-ratelimit-{kind}-remaining": str(remaining),
                f"anthropic-ratelimit-{kind}-reset": reset,
            }
        else:
            out |= {
                f"x-ratelimit-limit-{kind}": str(limit),
                f"x-ratelimit-remaining-{kind}": str(remaining),
                f"x-ratelimit-reset-{kind}": f"{max(0.001, v.reset_s):.3f}s",
            }
    return out
