"""200 mixed requests in parallel from several teams: the totals still match the provider's bills exactly."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from decimal import Decimal

import anthropic
import httpx
import openai

from metergate.simulator import Billed
from tests.conftest import KEYS, Gateway, wait_for
from tests.pricesheet import cost

MESSAGES = [{"role": "user", "content": "parallel"}]


async def _one(gw: Gateway, scope: str, kind: str, tag: str, rng: random.Random) -> None:
    headers = {
        "x-sim-tag": f"{tag}|{scope}",
        "x-sim-input-tokens": str(rng.randint(50, 4000)),
        "x-sim-output-tokens": str(rng.randint(1, 600)),
        "x-sim-chunks": "6",
    }
    if rng.random() < 0.4:
        headers["x-sim-cached-tokens"] = str(rng.randint(0, 40))
    key = KEYS[scope]
    if kind.startswith("openai"):
        c = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, default_headers=headers)
        if kind == "openai-stream":
            async for _ in await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True):
                pass
        elif kind == "openai-responses":
            await c.responses.create(model="o4-mini", input="parallel")
        else:
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        await c.close()
    elif kind.startswith("anthropic"):
        a = anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0, default_headers=headers)
        if kind == "anthropic-stream":
            async with a.messages.stream(model="claude-haiku-4-5", max_tokens=700, messages=MESSAGES) as s:
                async for _ in s:
                    pass
        else:
            await a.messages.create(model="claude-haiku-4-5", max_tokens=700, messages=MESSAGES)
        await a.close()
    else:
        stream = kind == "gemini-stream"
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        async with httpx.AsyncClient() as h:
            r = await h.post(
                f"{gw.url}/v1beta/models/gemini-2.5-flash:{method}",
                json={"contents": [{"parts": [{"text": "parallel"}]}]},
                headers={**headers, "x-goog-api-key": key},
            )
            r.raise_for_status()


def test_200_parallel_mixed_requests(gateway: Gateway, simulator, tag: str) -> None:
    rng = random.Random(2026)
    kinds = [
        "openai",
        "openai-stream",
        "openai-responses",
        "anthropic",
        "anthropic-stream",
        "gemini",
        "gemini-stream",
    ]
    plan = [(rng.choice(list(KEYS)), rng.choice(kinds)) for _ in range(200)]
    before = gateway.metrics()

    async def main() -> None:
        await asyncio.gather(
            *(_one(gateway, scope, kind, tag, random.Random(i)) for i, (scope, kind) in enumerate(plan))
        )

    asyncio.run(main())
    bills = [b for b in simulator.app.billed() if b.tag and b.tag.startswith(tag)]
    assert len(bills) == 200
    assert wait_for(lambda: gateway.metrics().delta(before, "llm_requests_total") == 200)
    after = gateway.metrics()
    want: dict[tuple[str, str, str], Billed] = defaultdict(Billed)
    money: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    for b in bills:
        team, app = b.tag.split("|")[1].split("/")
        key = (team, app, b.model)
        w, r = want[key], b.reported
        want[key] = Billed(w.input + r.input, w.output + r.output, w.cached + r.cached)
        money[key] += cost(b.model, r)
    assert len(want) > 8  # several teams, apps and models really were mixed
    for (team, app, model), w in want.items():
        labels = {"team": team, "app": app, "model": model}
        assert after.delta(before, "llm_tokens_in", **labels) == w.input
        assert after.delta(before, "llm_tokens_out", **labels) == w.output
        assert after.delta(before, "llm_tokens_in_cached", **labels) == w.cached
        got = Decimal(repr(after.delta(before, "llm_total_cost_usd", **labels)))
        assert abs(got - money[(team, app, model)]) <= Decimal("1e-9")
    per_scope: dict[str, int] = defaultdict(int)
    for scope, _ in plan:
        per_scope[scope] += 1
    for scope, n in per_scope.items():
        team, app = scope.split("/")
        assert after.delta(before, "llm_requests_total", team=team, app=app, code="200") == n
