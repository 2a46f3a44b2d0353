"""Rate limits (issue 11): requests and tokens per minute at any scope, shared by replicas through a real Redis,
refused with 429 in the caller's API shape and the headers the SDKs read; counted in process when Redis is away."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest
import redis

from metergate.config import ConfigError, parse_config
from metergate.ratelimits import LocalWindows
from metergate.simulator import free_port
from tests.conftest import KEYS, Gateway, make_gateway

REDIS_URL = "redis://127.0.0.1:6379/0"
MESSAGES = [{"role": "user", "content": "limits"}]
HEADERS = {"x-sim-input-tokens": "20", "x-sim-output-tokens": "1000"}
WORST = 256 + 1000  # the gateway's worst case for these requests: a small body (256 tokens) + max_tokens
USED = 20 + 1000  # what the simulator bills for each


def test_local_windows_count_requests_and_tokens_per_minute() -> None:
    w = LocalWindows()
    limits = [(2, 0, 100), (0, 250, 100)]
    now = 60 * 1000 + 5.0
    assert w.admit(["a", "b"], limits, now).admitted
    assert w.admit(["a", "b"], limits, now).admitted
    refused = w.admit(["a", "b"], limits, now)
    assert (refused.admitted, refused.limit, refused.kind, refused.requests) == (False, 0, "requests", 2)
    assert w.admit(["b"], [limits[1]], now).admitted  # b: 200 tokens < 250, admitted (overshoot by one)
    over = w.admit(["b"], [limits[1]], now)
    assert (over.admitted, over.kind, over.tokens) == (False, "tokens", 300)
    w.adjust("b", 1000, -200)  # settled below the reservation: room again
    assert w.admit(["b"], [limits[1]], now).admitted
    assert w.admit(["a"], [limits[0]], now + 60).admitted  # the next minute starts from zero
    assert refused.reset_s == pytest.approx(55.0)


@pytest.mark.parametrize(
    ("yaml", "says"),
    [
        ("rate_limits: [{team: search}]", "needs requests_per_minute, tokens_per_minute, or both"),
        ("rate_limits: [{team: search, requests_per_minute: 0}]", "greater than 0"),
        ("rate_limits: [{team: nobody, requests_per_minute: 5}]", "rate limit for unknown team 'nobody'"),
        ("shared_state: {redis_url: 'http://x'}", "redis_url must start with redis://"),
    ],
)
def test_rate_limit_config_errors(yaml: str, says: str) -> None:
    base = (
        "providers: {openai: {type: openai, base_url: 'http://x:1'}}\n"
        "routes: [{model: '*', provider: openai}]\n"
        "keys: [{sha256: '" + "a" * 64 + "', team: search, app: ranker}]\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(base + yaml + "\n")
    assert says in str(info.value)


def limited_gateway(  # type: ignore[no-untyped-def]
    simulator, tmp_path: Path, limits: str, shared: str | None = None, prefix: str | None = None
) -> Gateway:
    prefix = prefix or f"t{uuid.uuid4().hex[:12]}"  # replicas of one fleet share a prefix; tests do not
    state = f'shared_state: {{redis_url: "{shared}", key_prefix: "{prefix}"}}\n' if shared else ""
    return make_gateway(tmp_path, simulator.url, extra="rate_limits:\n" + limits + state).start()


def call(gw: Gateway, scope: str, tag: str, user: str | None = None) -> None:
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS[scope], max_retries=0)
    c.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        max_tokens=1000,
        extra_headers={**HEADERS, "x-sim-tag": tag},
        **({"user": user} if user else {}),  # type: ignore[arg-type]
    )


def wait_for_a_fresh_minute(margin_s: float = 20.0) -> None:
    """Bursts must not straddle two windows (each would admit a limit): start early in a minute of Redis's clock."""
    seconds = redis.Redis.from_url(REDIS_URL).time()[0] % 60
    if seconds > 60 - margin_s:
        time.sleep(60 - seconds + 0.2)


@pytest.fixture
def local_gateway(simulator, tmp_path: Path) -> Iterator[Gateway]:
    gw = limited_gateway(
        simulator,
        tmp_path,
        "  - {team: search, app: ranker, requests_per_minute: 3}\n"
        "  - {team: search, app: indexer, tokens_per_minute: 3000}\n"
        "  - {team: ads, user: '*', requests_per_minute: 2}\n",
    )
    yield gw
    gw.stop()


def test_requests_per_minute_refused_in_the_callers_shape(local_gateway: Gateway, simulator, tag: str) -> None:
    gw = local_gateway
    wait_for_a_fresh_minute()
    for _ in range(3):
        call(gw, "search/ranker", tag)
    with pytest.raises(openai.RateLimitError) as info:
        call(gw, "search/ranker", tag)
    err = info.value
    assert err.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    h = err.response.headers
    assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-reset-requests"].endswith("s") and 1 <= int(h["retry-after"]) <= 60
    assert h["x-should-retry"] == "true" and int(h["retry-after-ms"]) <= 60_000
    assert "search/ranker may use 3 requests per minute" in err.message
    assert len(simulator.app.billed(tag)) == 3  # the refused request never reached the provider
    # Other scopes are not touched; Anthropic callers get Anthropic's headers and error shape.
    call(gw, "search/indexer", tag)
    an = anthropic.Anthropic(base_url=gw.url, api_key=KEYS["search/ranker"], max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as ainfo:
        an.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MESSAGES)
    assert ainfo.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert ainfo.value.response.headers["anthropic-ratelimit-requests-limit"] == "3"
    assert ainfo.value.response.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    # The refusals are counted, by what ran out.
    assert gw.metrics().sum("metergate_rate_limited_total", limit="requests") == 2
    assert gw.metrics().sum("llm_errors_total", error_type="rate_limit_exceeded") == 2


def test_tokens_per_minute_reserve_the_worst_case_and_settle_to_the_real_usage(
    local_gateway: Gateway, simulator, tag: str
) -> None:
    wait_for_a_fresh_minute()
    # 3000 tokens a minute: each request reserves 1256 and settles to the 1020 billed, so the counts before each
    # request are 0, 1020, 2040, then 3060: three admitted (the third ends past the limit, by less than one).
    for _ in range(3):
        call(local_gateway, "search/indexer", tag)
    with pytest.raises(openai.RateLimitError) as info:
        call(local_gateway, "search/indexer", tag)
    h = info.value.response.headers
    assert h["x-ratelimit-limit-tokens"] == "3000" and h["x-ratelimit-remaining-tokens"] == "0"
    assert "3,060 tokens are counted" in info.value.message


def test_each_user_has_a_rate_of_their_own(local_gateway: Gateway, tag: str) -> None:
    wait_for_a_fresh_minute()
    for user in ("ann", "ben"):
        call(local_gateway, "ads/bidder", tag, user)
        call(local_gateway, "ads/bidder", tag, user)
        with pytest.raises(openai.RateLimitError) as info:
            call(local_gateway, "ads/bidder", tag, user)
        assert f"(user {user})" in info.value.message
    call(local_gateway, "ads/bidder", tag)  # no user: not held to per-user limits


# --- replicas sharing Redis -------------------------------------------------------------------------------------


def burst(gateways: list[Gateway], n: int, scope: str, tag: str) -> int:
    async def run() -> int:
        clients = [openai.AsyncOpenAI(base_url=f"{g.url}/v1", api_key=KEYS[scope], max_retries=0) for g in gateways]

        async def one(i: int) -> bool:
            try:
                await clients[i % len(clients)].chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, max_tokens=1000, extra_headers={**HEADERS, "x-sim-tag": tag}
                )
            except openai.RateLimitError:
                return False
            return True

        admitted = sum(await asyncio.gather(*(one(i) for i in range(n))))
        for c in clients:
            await c.close()
        return admitted

    return asyncio.run(run())


def test_two_replicas_share_the_limits_exactly(simulator, tmp_path: Path, tag: str) -> None:
    limits = "  - {team: search, app: ranker, requests_per_minute: 10}\n  - {team: ads, tokens_per_minute: 6000}\n"
    prefix = f"t{uuid.uuid4().hex[:12]}"
    gateways = [limited_gateway(simulator, tmp_path, limits, REDIS_URL, prefix) for _ in range(2)]
    try:
        wait_for_a_fresh_minute(margin_s=30)
        # 40 concurrent requests over both replicas: exactly the limit is admitted, not a limit per replica.
        assert burst(gateways, 40, "search/ranker", f"{tag}-rpm") == 10
        assert len(simulator.app.billed(f"{tag}-rpm")) == 10
        # Tokens: at most the limit plus one request's worst case is admitted in the minute.
        admitted = burst(gateways, 20, "ads/bidder", f"{tag}-tpm")
        billed = sum(b.reported.input + b.reported.output for b in simulator.app.billed(f"{tag}-tpm"))
        assert billed == admitted * USED and admitted >= 4 and billed <= 6000 + WORST
        assert redis.Redis.from_url(REDIS_URL).keys(f"{prefix}:rl:*"), "the counters live in Redis"
        for g in gateways:
            assert g.metrics().sum("metergate_shared_state_up") == 1
    finally:
        for g in gateways:
            g.stop()


def test_redis_away_falls_back_to_counting_in_process(simulator, tmp_path: Path, tag: str) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    gw = limited_gateway(simulator, tmp_path, "  - {team: search, app: ranker, requests_per_minute: 3}\n", closed)
    try:
        wait_for_a_fresh_minute()
        started = time.perf_counter()
        for _ in range(3):
            call(gw, "search/ranker", tag)
        with pytest.raises(openai.RateLimitError):
            call(gw, "search/ranker", tag)
        assert time.perf_counter() - started < 5  # no request waits on the missing Redis for long
        assert gw.metrics().sum("metergate_shared_state_up") == 0
        assert "not reachable" in gw.log()
    finally:
        gw.stop()


def test_a_requests_limit_and_a_tokens_limit_given_apart_count_each_request_once(
    simulator, tmp_path: Path, tag: str
) -> None:
    gw = limited_gateway(
        simulator,
        tmp_path,
        "  - {team: search, app: ranker, requests_per_minute: 4}\n"
        "  - {team: search, app: ranker, tokens_per_minute: 1000000}\n",
    )
    try:
        wait_for_a_fresh_minute()
        for _ in range(4):
            call(gw, "search/ranker", tag)
        with pytest.raises(openai.RateLimitError) as info:
            call(gw, "search/ranker", tag)
        h = info.value.response.headers
        assert h["x-ratelimit-limit-requests"] == "4" and h["x-ratelimit-limit-tokens"] == "1000000"
    finally:
        gw.stop()


def test_settling_a_window_that_is_over_leaves_no_key_behind() -> None:
    from metergate.ratelimits import SharedWindows

    prefix = f"t{uuid.uuid4().hex[:12]}"

    async def run() -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        shared = SharedWindows(client, 1.0)
        now = int(time.time() // 60)
        shared.adjust(f"{prefix}:old", now - 10, -500)  # a request that outlived its window: nothing to correct
        shared.adjust(f"{prefix}:new", now, -500)
        await shared.drain(2)
        assert await client.exists(f"{prefix}:old:{now - 10}:t") == 0
        assert 0 < await client.ttl(f"{prefix}:new:{now}:t") <= 180
        await client.delete(f"{prefix}:new:{now}:t")
        await client.aclose()

    asyncio.run(run())


def test_check_config_shows_the_limits_without_the_redis_password(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "gw.yaml"
    config.write_text(
        "providers: {openai: {type: openai, base_url: 'http://x:1'}}\n"
        "routes: [{model: '*', provider: openai}]\n"
        "keys: [{sha256: '" + "a" * 64 + "', team: search, app: ranker}]\n"
        "rate_limits: [{team: search, user: '*', requests_per_minute: 20, tokens_per_minute: 40000}]\n"
        "shared_state: {redis_url: 'redis://:hunter2@127.0.0.1:6379/0'}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "metergate", "check-config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert (
        "Rate limits (shared through" in out.stdout and "40,000" in out.stdout and "team search, user *" in out.stdout
    )
    assert "hunter2" not in out.stdout
