"""Price modifiers, each against an invoice worked out by hand from the provider's price page (issue 9).

USD per million tokens unless said otherwise; every figure is at 2026-11-01 (prices are dated). Where a
modifier comes from metergate's own table (price_table.py: genai-prices 0.2.3 lacks it), the source is there.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from metergate.pricing import PriceBook
from metergate.providers.gemini import parse_gemini_usage
from metergate.providers.openai import parse_response
from metergate.usage import Usage, UsagePart

AT = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def quote(provider: str, model: str, usage: Usage) -> tuple[Decimal, bool, tuple[str, ...]]:
    q = PriceBook([]).quote(provider, provider, model, usage, AT)
    return q.usd, q.complete, q.notes


def test_anthropic_1h_cache_write_batch_and_us_inference_stack() -> None:
    """claude-opus-4-6, batch ($2.50 in, $0.25 cache read, $5 1-hour write, $12.50 out), US-only inference x1.1:
    (1000 x 2.5 + 2000 x 0.25 + 4000 x 5 + 500 x 12.5) / 1e6 = 0.02925, x1.1 = 0.032175."""
    usage = Usage(
        input_tokens=7000,
        cache_read_tokens=2000,
        cache_write_tokens=4000,
        cache_write_1h_tokens=4000,
        output_tokens=500,
        batch=True,
        region="us",
    )
    usd, complete, notes = quote("anthropic", "claude-opus-4-6", usage)
    assert usd == Decimal("0.032175") and complete
    assert "batch" in notes and "inference_geo=us x1.1" in notes
    # US-only inference is not billed higher before Claude 4.6.
    older = Usage(input_tokens=1_000_000, output_tokens=0, region="us")
    assert quote("anthropic", "claude-opus-4-5", older)[0] == Decimal(5)


def test_openai_data_residency_uplift_applies_to_models_from_march_2026() -> None:
    """gpt-5.4 on a regional endpoint: (100k x 2.50 + 10k x 15) / 1e6 = 0.40, x1.1 = 0.44; gpt-5.2 has none."""
    usage = Usage(input_tokens=100_000, output_tokens=10_000, region="eu")
    usd, _, notes = quote("openai", "gpt-5.4", usage)
    assert usd == Decimal("0.44") and "data_residency=eu x1.1" in notes
    assert quote("openai", "gpt-5.2", usage)[0] == quote("openai", "gpt-5.2", Usage(100_000, 10_000))[0]


def test_gemini_flex_is_half_the_standard_rate() -> None:
    """gemini-2.5-flash flex: (10,000 x 0.30 + 1,000 x 2.50) / 1e6 = 0.0055, x0.5 = 0.00275."""
    usd, complete, notes = quote("google", "gemini-2.5-flash", Usage(10_000, 1_000, service_tier="flex"))
    assert usd == Decimal("0.00275") and complete and "service_tier=flex x0.5" in notes


def test_a_tier_without_a_list_price_is_never_silently_standard() -> None:
    """Anthropic priority is priced by contract: the standard figure is a lower bound, and the quote says so."""
    usd, complete, notes = quote("anthropic", "claude-haiku-4-5", Usage(1_000_000, 0, service_tier="priority"))
    assert usd == Decimal(1) and not complete and "service_tier=priority (no list price)" in notes


def test_each_iteration_is_priced_at_its_own_long_context_tier() -> None:
    """claude-sonnet-4-5, a 250k-token compaction pass (over 200k: $6 in, $22.50 out) and a 10k message pass
    ($3, $15): 1.5225 + 0.0375 = 1.56, not the 1.59375 of pricing their sum at the higher tier."""
    compaction = Usage(input_tokens=250_000, output_tokens=1_000)
    message = Usage(input_tokens=10_000, output_tokens=500)
    usage = Usage(
        input_tokens=260_000,
        output_tokens=1_500,
        parts=(UsagePart("compaction", None, compaction), UsagePart("message", None, message)),
    )
    usd, complete, notes = quote("anthropic", "claude-sonnet-4-5", usage)
    assert usd == Decimal("1.56") and complete and "long_context>200000" in notes


def test_the_advisor_is_priced_at_the_advisor_model() -> None:
    """Executor claude-sonnet-4-5 (1000 in, 100 out at $3/$15 = 0.0045) with a claude-opus-4-1 advisor pass
    (2000 in, 50 out at $15/$75 = 0.03375): 0.03825."""
    usage = Usage(
        input_tokens=3000,
        output_tokens=150,
        parts=(
            UsagePart("message", None, Usage(1000, 100)),
            UsagePart("advisor_message", "claude-opus-4-1", Usage(2000, 50)),
        ),
    )
    usd, complete, notes = quote("anthropic", "claude-sonnet-4-5", usage)
    assert usd == Decimal("0.03825") and complete and "advisor_message@claude-opus-4-1" in notes


def test_anthropic_fast_mode() -> None:
    """claude-opus-4-6 fast mode, $30 in / $150 out, cache reads at 0.1x: 1000 x 30 + 10,000 x 3 + 1000 x 150 =
    0.21. A model without a published fast price is priced at standard and marked incomplete."""
    usage = Usage(input_tokens=11_000, cache_read_tokens=10_000, output_tokens=1_000, speed="fast")
    assert quote("anthropic", "claude-opus-4-6", usage)[:2] == (Decimal("0.21"), True)
    _, complete, notes = quote("anthropic", "claude-opus-4-8", usage)
    assert not complete and "speed=fast (no list price)" in notes


def test_grounding_is_billed_per_prompt_before_gemini_3_and_per_unique_query_after() -> None:
    """gemini-2.5-flash: one grounded prompt whatever the queries ($35/1000); gemini-3-flash-preview: each unique
    non-empty query ($14/1000)."""
    meta = {"promptTokenCount": 0}
    queries = ["", "weather in Paris", "weather in Rome", "weather in Paris"]
    flash = parse_gemini_usage(meta, "gemini-2.5-flash", queries)
    assert flash.units == {"web_search": 1}
    assert quote("google", "gemini-2.5-flash", flash)[0] == Decimal("0.035")
    three = parse_gemini_usage(meta, "gemini-3-flash-preview", queries)
    assert three.units == {"web_search": 2}
    assert quote("google", "gemini-3-flash-preview", three)[0] == Decimal("0.028")
    assert parse_gemini_usage(meta, "gemini-3-flash-preview", ["", " "]).units is None


def test_openai_search_calls_are_counted_from_the_output_when_tool_usage_is_absent() -> None:
    """Older Responses carry no tool_usage: each web_search_call that searched is a call ($10/1000 on gpt-5);
    opening a page is not billed, nor is a failed call."""
    response = {
        "usage": {"input_tokens": 0, "output_tokens": 0},
        "output": [
            {"type": "web_search_call", "status": "completed", "action": {"type": "search", "query": "a"}},
            {"type": "web_search_call", "status": "completed", "action": {"type": "search", "query": "b"}},
            {"type": "web_search_call", "status": "completed", "action": {"type": "open_page"}},
            {"type": "web_search_call", "status": "failed", "action": {"type": "search"}},
            {"type": "file_search_call", "status": "completed"},
            {"type": "code_interpreter_call", "container_id": "cntr_1"},
            {"type": "code_interpreter_call", "container_id": "cntr_1"},
        ],
    }
    usage = parse_response(response)
    assert usage.units == {"web_search": 2, "file_search": 1, "code_interpreter_session": 1}
    # 2 x 0.010 + 1 x 0.0025 (genai-prices) + one container session 0.03 (price_table.py)
    assert quote("openai", "gpt-5", usage)[:2] == (Decimal("0.0525"), True)


def test_image_generation_inside_responses_is_priced_at_the_image_model() -> None:
    """tool_usage.image_gen on gpt-image-1 ($5 text in, $10 image in, $40 out): 29 text + 1521 image input tokens,
    515 output: 29 x 5 + 1521 x 10 + 515 x 40 = 0.035955, beside the main model's own tokens."""
    response = {
        "usage": {"input_tokens": 1000, "output_tokens": 100},
        "tool_usage": {
            "image_gen": {
                "input_tokens": 1550,
                "input_tokens_details": {"image_tokens": 1521, "text_tokens": 29},
                "output_tokens": 515,
                "output_tokens_details": {"image_tokens": 515},
            },
            "web_search": {"num_requests": 0},
        },
        "output": [{"type": "image_generation_call"}],
    }
    usage = parse_response(response)
    assert (usage.input_tokens, usage.output_tokens) == (2550, 615)
    main = Decimal(1000) * Decimal("1.25") / 10**6 + Decimal(100) * 10 / 10**6  # gpt-5: $1.25 in, $10 out
    assert quote("openai", "gpt-5", usage)[0] == main + Decimal("0.035955")
    # Without tool_usage the image cannot be priced from tokens: counted, and the quote says it is incomplete.
    old = parse_response({"usage": {"input_tokens": 0, "output_tokens": 0}, "output": response["output"]})
    assert old.units == {"image_generation_call": 1}
    assert quote("openai", "gpt-5", old)[1] is False
