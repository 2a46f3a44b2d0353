"""Usage parsing and stream metering, checked against bytes the providers really sent.

Fixtures are copied byte for byte from public captures (provider docs, SDK and gateway test cassettes, recorded
streams); the comment above each one names its source: a repository or document, and `idx N`, the id of the
stored copy in the public-reference index the captures were collected from. `wire-formats.md §N` is the section of
the research notes (kept outside the repository) that gathered them by API. A fixture marked "(shape)" has no public
capture: it was written from the provider's documented schema and says so.

Streams are fed to the meters cut at every byte offset (see `splits`), because upstream chunks arrive cut anywhere,
and what the meter relays (every `feed` result, then `flush` at the end; see `relay`) is compared with exactly what
the client must receive.
"""

# The captures are kept one wire line per source line, so they can be diffed against where they came from.
# ruff: noqa: E501

from __future__ import annotations

import copy
import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import orjson
import pytest

from metergate.endpoints import match_endpoint
from metergate.providers.anthropic import MessagesStreamMeter, parse_anthropic_stream, parse_anthropic_usage
from metergate.providers.base import StreamMeter
from metergate.providers.gemini import (
    GeminiApi,
    GeminiArrayMeter,
    GeminiSSEMeter,
    parse_gemini_embedding_usage,
    parse_gemini_stream,
    parse_gemini_usage,
)
from metergate.providers.openai import (
    ChatStreamMeter,
    ResponsesStreamMeter,
    parse_chat_stream,
    parse_openai_usage,
    parse_responses_stream,
    parse_responses_usage,
)
from metergate.sse import SSEBuffer, SSEEvent
from metergate.usage import Usage, UsageError

# An SSE event as the lines it is made of (`event:` then `data:`), or a single `data:` line.
Event = bytes | tuple[bytes, ...]


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def sse(*events: Event, sep: bytes = b"\n\n") -> bytes:
    """A stream body: each event's lines joined by "\\n", every event followed by the blank-line `sep`."""
    return b"".join((e if isinstance(e, bytes) else b"\n".join(e)) + sep for e in events)


def pieces(blob: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`blob` cut at the given offsets."""
    bounds = [0, *sorted(set(cuts)), len(blob)]
    return [blob[a:b] for a, b in itertools.pairwise(bounds) if a < b]


def splits(blob: bytes, max_pieces: int = 12, random_rounds: int = 100) -> Iterator[list[bytes]]:
    """Ways an upstream could deliver `blob`: whole, cut once at every byte offset, one byte at a time, and
    `random_rounds` random cuts into 3..`max_pieces` pieces (seeded, so failures reproduce)."""
    yield [blob]
    for offset in range(1, len(blob)):
        yield [blob[:offset], blob[offset:]]
    yield [blob[i : i + 1] for i in range(len(blob))]
    rng = random.Random(len(blob))
    for _ in range(random_rounds):
        yield pieces(blob, rng.sample(range(1, len(blob)), rng.randint(2, max_pieces - 1)))


def relay(meter: StreamMeter, chunks: Iterable[bytes]) -> bytes:
    """What the client receives: everything `feed` returned, in order, then what `flush` releases at the end of the
    upstream (the gateway sends any error event of its own between the two)."""
    return b"".join(meter.feed(chunk) for chunk in chunks) + meter.flush()


def cut_sizes(chunks: list[bytes]) -> list[int]:
    """A readable assertion message: where the stream was cut."""
    return [len(c) for c in chunks]


def events_of(blob: bytes) -> list[SSEEvent]:
    buffer = SSEBuffer()
    events = buffer.feed(blob)
    assert buffer.pending() == b""
    return events


def with_value(obj: Mapping[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `obj` with the dotted `path` set to `value`."""
    out = copy.deepcopy(dict(obj))
    node = out
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# OpenAI Chat Completions / legacy Completions fixtures
# --------------------------------------------------------------------------------------------------------------

# wire-formats.md §1.2 [CAPTURE Kong workshop doc idx 8147655469, gpt-4-0613]: no stream_options, no usage anywhere.
CHAT_NO_USAGE = [
    rb'data: {"id":"chatcmpl-C3jmyBQgTgsLd421Wg8fBhM0xkOiK","object":"chat.completion.chunk","created":1755007032,"model":"gpt-4-0613","service_tier":"default","system_fingerprint":null,"choices":[{"index":0,"delta":{"content":"."},"logprobs":null,"finish_reason":null}],"obfuscation":"YHL01GZcTNF1Wh"}',
    rb'data: {"id":"chatcmpl-C3jmyBQgTgsLd421Wg8fBhM0xkOiK","object":"chat.completion.chunk","created":1755007032,"model":"gpt-4-0613","service_tier":"default","system_fingerprint":null,"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"obfuscation":"vf2t9C6t3"}',
    rb"data: [DONE]",
]

# wire-formats.md §1.3 [CAPTURE envoyproxy/ai-gateway CassetteChatStreamingDetailedUsage, idx 33623202876,
# gpt-5-nano]: include_usage set, `"usage":null` after `choices` on every chunk, then the `choices: []` usage chunk.
CHAT_USAGE = [
    rb'data: {"id":"chatcmpl-C4Hq5a6K3RaPMymUv70btQNYv6SvY","object":"chat.completion.chunk","created":1755137921,"model":"gpt-5-nano-2025-08-07","service_tier":"default","system_fingerprint":null,"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"finish_reason":null}],"usage":null,"obfuscation":"WuQNX"}',
    rb'data: {"id":"chatcmpl-C4Hq5a6K3RaPMymUv70btQNYv6SvY","object":"chat.completion.chunk","created":1755137921,"model":"gpt-5-nano-2025-08-07","service_tier":"default","system_fingerprint":null,"choices":[{"index":0,"delta":{},"finish_reason":"length"}],"usage":null,"obfuscation":"IPio8PDeczEmdPr"}',
    rb'data: {"id":"chatcmpl-C4Hq5a6K3RaPMymUv70btQNYv6SvY","object":"chat.completion.chunk","created":1755137921,"model":"gpt-5-nano-2025-08-07","service_tier":"default","system_fingerprint":null,"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":100,"total_tokens":112,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":100,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"obfuscation":"t9"}',
    rb"data: [DONE]",
]

# What a client that did not ask for usage must receive from CHAT_USAGE: the same chunks without the
# `"usage":null` member, and no usage chunk.
CHAT_USAGE_FOR_CLIENT = [
    rb'data: {"id":"chatcmpl-C4Hq5a6K3RaPMymUv70btQNYv6SvY","object":"chat.completion.chunk","created":1755137921,"model":"gpt-5-nano-2025-08-07","service_tier":"default","system_fingerprint":null,"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"finish_reason":null}],"obfuscation":"WuQNX"}',
    rb'data: {"id":"chatcmpl-C4Hq5a6K3RaPMymUv70btQNYv6SvY","object":"chat.completion.chunk","created":1755137921,"model":"gpt-5-nano-2025-08-07","service_tier":"default","system_fingerprint":null,"choices":[{"index":0,"delta":{},"finish_reason":"length"}],"obfuscation":"IPio8PDeczEmdPr"}',
    rb"data: [DONE]",
]
CHAT_USAGE_BILLED = Usage(input_tokens=12, output_tokens=100, reasoning_tokens=100)

# wire-formats.md §1.3 key-order note [CAPTURE idx 8621934929, a gateway developer's notes recording an OpenAI
# gpt-4.1-nano-2025-04-14 tool-call stream]: the first
# chunk has `"usage":null` BEFORE `choices`, the finish chunk has it after.
CHAT_USAGE_FIRST = rb'data: {"id":"chatcmpl-CiKIfaJe92tvtH3QZModD64Qz5uvn","object":"chat.completion.chunk","created":1764680501,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_1a97b5aa6c","usage":null,"choices":[{"index":0,"delta":{"role":"assistant","content":null},"logprobs":null,"finish_reason":null}],"obfuscation":"58LAb"}'
CHAT_USAGE_FIRST_FOR_CLIENT = rb'data: {"id":"chatcmpl-CiKIfaJe92tvtH3QZModD64Qz5uvn","object":"chat.completion.chunk","created":1764680501,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_1a97b5aa6c","choices":[{"index":0,"delta":{"role":"assistant","content":null},"logprobs":null,"finish_reason":null}],"obfuscation":"58LAb"}'
CHAT_USAGE_AFTER_CHOICES = rb'data: {"id":"chatcmpl-CiKIfaJe92tvtH3QZModD64Qz5uvn","object":"chat.completion.chunk","created":1764680501,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_1a97b5aa6c","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}],"usage":null,"obfuscation":"azv06a8lAt7uZY"}'
CHAT_USAGE_AFTER_CHOICES_FOR_CLIENT = rb'data: {"id":"chatcmpl-CiKIfaJe92tvtH3QZModD64Qz5uvn","object":"chat.completion.chunk","created":1764680501,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_1a97b5aa6c","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}],"obfuscation":"azv06a8lAt7uZY"}'
# (shape) `usage` as the very first member, the one order no capture shows; the stripping must still leave valid JSON.
CHAT_USAGE_LEADING = rb'data: {"usage":null,"id":"chatcmpl-CiKIfaJe92tvtH3QZModD64Qz5uvn","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":null}]}'
CHAT_USAGE_LEADING_FOR_CLIENT = rb'data: {"id":"chatcmpl-CiKIfaJe92tvtH3QZModD64Qz5uvn","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":null}]}'

# wire-formats.md §1.6 [shape from vercel/ai's OpenAI-compatible completion test, idx 17935405477]: legacy
# /v1/completions; the usage chunk puts `usage` BEFORE `"choices":[]`, earlier chunks have no usage key at all.
LEGACY_COMPLETION = [
    rb'data: {"id":"cmpl-96c3yLQE1TtZCd6n6OILVmzev8M8H","object":"text_completion","created":1711363310,"choices":[{"text":"","index":0,"finish_reason":"stop"}],"model":"gpt-3.5-turbo-instruct"}',
    rb'data: {"id":"cmpl-96c3yLQE1TtZCd6n6OILVmzev8M8H","object":"text_completion","created":1711363310,"model":"gpt-3.5-turbo-instruct","usage":{"prompt_tokens":10,"total_tokens":372,"completion_tokens":362},"choices":[]}',
    rb"data: [DONE]",
]

# [CAPTURE idx 8621934929, api.deepseek.com deepseek-chat, cited by wire-formats.md §1.3]: DeepSeek puts usage on the
# finish chunk, whose `choices` is NOT empty, and reports cache hits at the top level (`prompt_cache_hit_tokens`).
DEEPSEEK = [
    rb'data: {"id":"8d101105-3bab-41db-8ad6-a7d6baa79b36","object":"chat.completion.chunk","created":1764680764,"model":"deepseek-chat","system_fingerprint":"fp_eaab8d114b_prod0820_fp8_kvcache","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}]}',
    rb'data: {"id":"8d101105-3bab-41db-8ad6-a7d6baa79b36","object":"chat.completion.chunk","created":1764680764,"model":"deepseek-chat","system_fingerprint":"fp_eaab8d114b_prod0820_fp8_kvcache","choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":11,"total_tokens":23,"prompt_tokens_details":{"cached_tokens":0},"prompt_cache_hit_tokens":0,"prompt_cache_miss_tokens":12}}',
    rb"data: [DONE]",
]

# wire-formats.md §5.4 [CAPTURE idx 34084233170, Azure OpenAI gpt-4o-2024-11-20]: the prompt-filter chunk has
# `choices: []` and no usage, it is NOT a usage chunk; then a content chunk; the stop chunk is from the same capture.
AZURE = [
    rb'data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},"jailbreak":{"filtered":false,"detected":false},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}}]}',
    rb'data: {"choices":[{"content_filter_results":{},"delta":{"content":"","refusal":null,"role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}],"created":1742460935,"id":"chatcmpl-BD5yZBfhSLLcuDtRtF48KwOywtED5","model":"gpt-4o-2024-11-20","object":"chat.completion.chunk","system_fingerprint":"fp_ded0d14823"}',
    rb'data: {"choices":[{"content_filter_results":{},"delta":{},"finish_reason":"stop","index":0,"logprobs":null}],"created":1742460935,"id":"chatcmpl-BD5yZBfhSLLcuDtRtF48KwOywtED5","model":"gpt-4o-2024-11-20","object":"chat.completion.chunk","system_fingerprint":"fp_ded0d14823"}',
]
# (shape) Azure's usage chunk on api-version 2024-10-21 (wire-formats.md §5.3): `choices: []` plus `usage`, keys sorted
# alphabetically as Azure does (§5.4). No byte capture of an Azure usage chunk exists in the research.
AZURE_USAGE = rb'data: {"choices":[],"created":1742460935,"id":"chatcmpl-BD5yZBfhSLLcuDtRtF48KwOywtED5","model":"gpt-4o-2024-11-20","object":"chat.completion.chunk","system_fingerprint":"fp_ded0d14823","usage":{"completion_tokens":9,"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":0,"rejected_prediction_tokens":0},"prompt_tokens":14,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":0},"total_tokens":23}}'

# wire-formats.md §1.5 [vercel/ai PR #1835 fixture, idx 17935405477; full message text from a Go streaming
# mock, idx 66757051584, as the markdown elides it]: a mid-stream error after HTTP 200, then [DONE].
CHAT_ERROR = rb'data: {"error":{"message": "The server had an error processing your request. Sorry about that! You can retry your request, or contact us through our help center at help.openai.com if you keep seeing this error.","type":"server_error","param":null,"code":null}}'

# (shape) A chunk carrying the usage figures of xAI's API reference, which count reasoning OUTSIDE completion_tokens
# (32 + 9 + 94 = 135), as quoted verbatim by third-party tests (idx 70266021712). OpenAI's rule (reasoning is a subset
# of completion) makes this usage unparseable, which is the point of the fixture.
XAI_USAGE_CHUNK = rb'data: {"id":"chatcmpl-xai-1","object":"chat.completion.chunk","model":"grok-4.3","choices":[],"usage":{"prompt_tokens":32,"completion_tokens":9,"total_tokens":135,"prompt_tokens_details":{"text_tokens":32,"cached_tokens":6},"completion_tokens_details":{"reasoning_tokens":94},"cost_in_usd_ticks":1234000}}'

# wire-formats.md §1.1 [CAPTURE envoyproxy/ai-gateway chat tests, idx 33623202876, re-compacted by the document]. The
# "…" is the document's own elision inside a string, so the body is still valid JSON.
BODY_CHAT = b'{"id":"chatcmpl-C4Gm9xikLXbgE8He0BHWeoM03aa72","object":"chat.completion","created":1755133833,"model":"gpt-5-nano-2025-08-07","choices":[{"index":0,"message":{"role":"assistant","content":"Hi there! \xe2\x80\xa6","refusal":null,"annotations":[]},"finish_reason":"stop"}],"usage":{"prompt_tokens":8,"completion_tokens":377,"total_tokens":385,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":320,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":null}'


# --------------------------------------------------------------------------------------------------------------
# OpenAI Responses fixtures
# --------------------------------------------------------------------------------------------------------------

# wire-formats.md §2.2 [CAPTURE idx 9877180099, gpt-3.5-turbo-0125, 19 events]. The document elides the created and
# completed frames with "…"; these are the complete frames from the cited capture. No [DONE]; usage only on
# response.completed.
RESPONSES = [
    (
        rb"event: response.created",
        rb'data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_045d5195f1ed9f940068ff5b16458c8197acc79be8346cd880","object":"response","created_at":1761565462,"status":"in_progress","background":false,"error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":null,"max_tool_calls":null,"model":"gpt-3.5-turbo-0125","output":[],"parallel_tool_calls":true,"previous_response_id":null,"prompt_cache_key":null,"reasoning":{"effort":null,"summary":null},"safety_identifier":null,"service_tier":"auto","store":true,"temperature":1.0,"text":{"format":{"type":"text"},"verbosity":"medium"},"tool_choice":"auto","tools":[],"top_logprobs":0,"top_p":1.0,"truncation":"disabled","usage":null,"user":null,"metadata":{}}}',
    ),
    (
        rb"event: response.in_progress",
        rb'data: {"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_045d5195f1ed9f940068ff5b16458c8197acc79be8346cd880","object":"response","created_at":1761565462,"status":"in_progress","background":false,"error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":null,"max_tool_calls":null,"model":"gpt-3.5-turbo-0125","output":[],"parallel_tool_calls":true,"previous_response_id":null,"prompt_cache_key":null,"reasoning":{"effort":null,"summary":null},"safety_identifier":null,"service_tier":"auto","store":true,"temperature":1.0,"text":{"format":{"type":"text"},"verbosity":"medium"},"tool_choice":"auto","tools":[],"top_logprobs":0,"top_p":1.0,"truncation":"disabled","usage":null,"user":null,"metadata":{}}}',
    ),
    (
        rb"event: response.output_item.added",
        rb'data: {"type":"response.output_item.added","sequence_number":2,"output_index":0,"item":{"id":"msg_045d5195f1ed9f940068ff5b17fd08819787a7a968fc33300f","type":"message","status":"in_progress","content":[],"role":"assistant"}}',
    ),
    (
        rb"event: response.content_part.added",
        rb'data: {"type":"response.content_part.added","sequence_number":3,"item_id":"msg_045d5195f1ed9f940068ff5b17fd08819787a7a968fc33300f","output_index":0,"content_index":0,"part":{"type":"output_text","annotations":[],"logprobs":[],"text":""}}',
    ),
    (
        rb"event: response.output_text.delta",
        rb'data: {"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_045d5195f1ed9f940068ff5b17fd08819787a7a968fc33300f","output_index":0,"content_index":0,"delta":"Greetings","logprobs":[],"obfuscation":"mvkAadO"}',
    ),
    (
        rb"event: response.output_text.delta",
        rb'data: {"type":"response.output_text.delta","sequence_number":5,"item_id":"msg_045d5195f1ed9f940068ff5b17fd08819787a7a968fc33300f","output_index":0,"content_index":0,"delta":",","logprobs":[],"obfuscation":"d3983J1LnnINX8U"}',
    ),
    (
        rb"event: response.output_text.delta",
        rb'data: {"type":"response.output_text.delta","sequence_number":6,"item_id":"msg_045d5195f1ed9f940068ff5b17fd08819787a7a968fc33300f","output_index":0,"content_index":0,"delta":" hello","logprobs":[],"obfuscation":"TZOE4wuLRN"}',
    ),
    (
        rb"event: response.output_text.delta",
        rb'data: {"type":"response.output_text.delta","sequence_number":7,"item_id":"msg_045d5195f1ed9f940068ff5b17fd08819787a7a968fc33300f","output_index":0,"content_index":0,"delta":",","logprobs":[],"obfuscation":"1IgEZnLm4x3wykQ"}',
    ),
    (
        rb"event: response.output_text.delta",
        rb'data: {"type":"response.output_text.delta","sequence_number":8,"item_id":"msg_045d5195f1ed9f940068ff5b17fd08819787a7a968fc33300f","output_index":0,"content_index":0,"delta":" hi","logprobs":[],"obfuscation":"OUVlhaiOQDTgm"}',
    ),
    (
        rb"event: response.output_text.delta",
        rb'data: {"type":"response.output_text.delta","sequence_number":9,"item_id":"msg_045d5195f1ed9f940068ff5b17fd08819787a7a968fc33300f","output_index":0,"content_index":0,"delta":",","logprobs":[],"obfuscation":"1VMNe9emr6FMPYR"}',
    ),
    (
        rb"event: response.output_text.delta",
        rb'data: {"type":"response.output_text.delta","sequence_number":10,"item_id":"msg_045d5195f1ed9f940068ff5b17fd08819787a7a968fc33300f","output_index":0,"content_index":0,"delta":" hey","logprobs":[],"obfuscation":"CDv4Vfns9WCh"}',
    ),
    (
        rb"event: response.output_text.delta",
        rb'data: {"type":"response.output_text.delta","sequence_number":11,"item_id":"msg_045d5195f1ed9f940068ff5b17fd08819787a7a968fc33300f","output_index":0,"content_index":0,"delta":",","logprobs":[],"obfuscation":"qYiIWF51l1Q0QPz"}',
    ),
    (
        rb"event: response.output_text.delta",
        rb'data: {"type":"response.output_text.delta","sequence_number":12,"item_id":"msg_045d5195f1ed9f940068ff5b17fd08819787a7a968fc33300f","output_index":0,"content_index":0,"delta":" sal","logprobs":[],"obfuscation":"V1VCdyRXwMpb"}',
    ),
    (
        rb"event: response.output_text.delta",
        rb'data: {"type":"response.output_text.delta","sequence_number":13,"item_id":"msg_045d5195f1ed9f940068ff5b17fd08819787a7a968fc33300f","output_index":0,"content_index":0,"delta":"utations","logprobs":[],"obfuscation":"8KyjANpr"}',
    ),
    (
        rb"event: response.output_text.delta",
        rb'data: {"type":"response.output_text.delta","sequence_number":14,"item_id":"msg_045d5195f1ed9f940068ff5b17fd08819787a7a968fc33300f","output_index":0,"content_index":0,"delta":"!","logprobs":[],"obfuscation":"WraPeSlOcUXTOJ2"}',
    ),
    (
        rb"event: response.output_text.done",
        rb'data: {"type":"response.output_text.done","sequence_number":15,"item_id":"msg_045d5195f1ed9f940068ff5b17fd08819787a7a968fc33300f","output_index":0,"content_index":0,"text":"Greetings, hello, hi, hey, salutations!","logprobs":[]}',
    ),
    (
        rb"event: response.content_part.done",
        rb'data: {"type":"response.content_part.done","sequence_number":16,"item_id":"msg_045d5195f1ed9f940068ff5b17fd08819787a7a968fc33300f","output_index":0,"content_index":0,"part":{"type":"output_text","annotations":[],"logprobs":[],"text":"Greetings, hello, hi, hey, salutations!"}}',
    ),
    (
        rb"event: response.output_item.done",
        rb'data: {"type":"response.output_item.done","sequence_number":17,"output_index":0,"item":{"id":"msg_045d5195f1ed9f940068ff5b17fd08819787a7a968fc33300f","type":"message","status":"completed","content":[{"type":"output_text","annotations":[],"logprobs":[],"text":"Greetings, hello, hi, hey, salutations!"}],"role":"assistant"}}',
    ),
    (
        rb"event: response.completed",
        rb'data: {"type":"response.completed","sequence_number":18,"response":{"id":"resp_045d5195f1ed9f940068ff5b16458c8197acc79be8346cd880","object":"response","created_at":1761565462,"status":"completed","background":false,"error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":null,"max_tool_calls":null,"model":"gpt-3.5-turbo-0125","output":[{"id":"msg_045d5195f1ed9f940068ff5b17fd08819787a7a968fc33300f","type":"message","status":"completed","content":[{"type":"output_text","annotations":[],"logprobs":[],"text":"Greetings, hello, hi, hey, salutations!"}],"role":"assistant"}],"parallel_tool_calls":true,"previous_response_id":null,"prompt_cache_key":null,"reasoning":{"effort":null,"summary":null},"safety_identifier":null,"service_tier":"default","store":true,"temperature":1.0,"text":{"format":{"type":"text"},"verbosity":"medium"},"tool_choice":"auto","tools":[],"top_logprobs":0,"top_p":1.0,"truncation":"disabled","usage":{"input_tokens":13,"input_tokens_details":{"cached_tokens":0},"output_tokens":12,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":25},"user":null,"metadata":{}}}',
    ),
]

# wire-formats.md §2.3 [CAPTURE live-probe notes idx 69764576934, probe 5, gpt-4o-mini cap 16]: the terminal
# response.incomplete event (no response.completed follows), usage 16 in / 16 out.
RESPONSES_INCOMPLETE = (
    rb"event: response.incomplete",
    rb"""data: {"type":"response.incomplete","response":{"id":"resp_0ebc56db5c0ec906006aac72df961c87d187505ffe8929bff7","object":"response","created_at":1789686495,"status":"incomplete","background":false,"completed_at":null,"error":null,"frequency_penalty":0.0,"incomplete_details":{"reason":"max_output_tokens"},"instructions":null,"max_output_tokens":16,"max_tool_calls":null,"model":"gpt-4o-mini-2024-07-18","moderation":null,"output":[{"id":"msg_0ebc56db5c0ec906006aac72e0c1a087d18fe6d5f0d91b8538","type":"message","status":"incomplete","content":[{"type":"output_text","annotations":[],"logprobs":[],"text":"Rivers are vital components of Earth's hydrological system, serving as lifelines for"}],"role":"assistant"}],"parallel_tool_calls":true,"presence_penalty":0.0,"previous_response_id":null,"prompt_cache_key":null,"prompt_cache_retention":"in_memory","reasoning":{"context":null,"effort":null,"summary":null},"safety_identifier":null,"service_tier":"default","store":true,"temperature":1.0,"text":{"format":{"type":"text"},"verbosity":"medium"},"tool_choice":"auto","tool_usage":{"image_gen":{"input_tokens":0,"input_tokens_details":{"image_tokens":0,"text_tokens":0},"output_tokens":0,"output_tokens_details":{"image_tokens":0,"text_tokens":0},"total_tokens":0},"web_search":{"num_requests":0}},"tools":[],"top_logprobs":0,"top_p":1.0,"truncation":"disabled","usage":{"input_tokens":16,"input_tokens_details":{"cache_write_tokens":0,"cached_tokens":0},"output_tokens":16,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":32},"user":null,"metadata":{}},"sequence_number":23}""",
)

# wire-formats.md §2.3: response.failed has no real capture. This frame is a third-party fixture found in the search
# index (idx 71224306974), without usage.
RESPONSES_FAILED = (
    rb"event: response.failed",
    rb'data: {"type":"response.failed","sequence_number":3,"response":{"id":"resp_4","status":"failed","error":{"code":"server_error","message":"The server had an error processing your request."}}}',
)
# (shape) The same failure reporting the partial usage the SDK schema allows (`response.usage`, §2.3).
RESPONSES_FAILED_WITH_USAGE = (
    rb"event: response.failed",
    rb'data: {"type":"response.failed","sequence_number":3,"response":{"id":"resp_4","status":"failed","error":{"code":"server_error","message":"The server had an error processing your request."},"usage":{"input_tokens":12,"input_tokens_details":{"cached_tokens":0},"output_tokens":5,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":17}}}',
)
# (shape) wire-formats.md §2.4, SDK `response_error_event.py`: {"type":"error","code","message","param","sequence_number"}.
RESPONSES_ERROR = (
    rb"event: error",
    rb'data: {"type":"error","code":"server_error","message":"The server had an error while processing your request.","param":null,"sequence_number":5}',
)

# wire-formats.md §2.1 [CAPTURE live-probe notes idx 69764576934, probe 2, compacted by the document].
BODY_RESPONSES = rb'{"id":"resp_01eecaf64d828a82006aac72d116c487d18f04516cc8bdcf08","object":"response","created_at":1789686481,"status":"completed","background":false,"completed_at":1789686482,"error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":32,"model":"gpt-4o-mini-2024-07-18","output":[{"id":"msg_01eecaf64d828a82006aac72d2490887d1a2274af798ad3c3f","type":"message","status":"completed","content":[{"type":"output_text","annotations":[],"logprobs":[],"text":"Hello there, friend!"}],"role":"assistant"}],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"context":null,"effort":null,"summary":null},"service_tier":"default","store":true,"temperature":1.0,"text":{"format":{"type":"text"},"verbosity":"medium"},"tool_choice":"auto","tool_usage":{"image_gen":{"input_tokens":0,"input_tokens_details":{"image_tokens":0,"text_tokens":0},"output_tokens":0,"output_tokens_details":{"image_tokens":0,"text_tokens":0},"total_tokens":0},"web_search":{"num_requests":0}},"tools":[],"top_p":1.0,"truncation":"disabled","usage":{"input_tokens":13,"input_tokens_details":{"cache_write_tokens":0,"cached_tokens":0},"output_tokens":6,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":19},"user":null,"metadata":{}}'


# --------------------------------------------------------------------------------------------------------------
# Anthropic Messages fixtures
# --------------------------------------------------------------------------------------------------------------

# wire-formats.md §3.3 [CAPTURE idx 19381274515, claude-3-7-sonnet with prompt caching]: message_delta repeats the
# input and cache figures of message_start, and several `data:` JSON objects are padded with spaces before the last `}`.
ANTHROPIC = [
    (
        rb"event: message_start",
        rb'data: {"type":"message_start","message":{"id":"msg_018dSxFH9nFU1QaPVuXdUoXF","type":"message","role":"assistant","model":"claude-3-7-sonnet-20250219","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":4,"cache_creation_input_tokens":22100,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":22100,"ephemeral_1h_input_tokens":0},"output_tokens":1,"service_tier":"standard"}}}',
    ),
    (
        rb"event: content_block_start",
        rb'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}        }',
    ),
    (
        rb"event: content_block_delta",
        rb'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"<thinking>\nI need to understan"}}',
    ),
    (rb"event: ping", rb'data: {"type": "ping"}'),
    (
        rb"event: content_block_delta",
        rb'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"\nOK"}         }',
    ),
    (rb"event: content_block_stop", rb'data: {"type":"content_block_stop","index":0              }'),
    (
        rb"event: message_delta",
        rb'data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":4,"cache_creation_input_tokens":22100,"cache_read_input_tokens":0,"output_tokens":151}             }',
    ),
    (rb"event: message_stop", rb'data: {"type":"message_stop"       }'),
]
ANTHROPIC_BILLED = Usage(input_tokens=4 + 22100 + 0, output_tokens=151, cache_write_tokens=22100)

# wire-formats.md §3.4 [OFFICIAL streaming docs; fixtures e.g. idx 54812280065]: the mid-stream error frame.
ANTHROPIC_ERROR = (
    rb"event: error",
    rb'data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
)

# Pre-May-2025 stream: message_delta carries only `output_tokens` (wire-formats.md §3.3 "Older streams had only
# {"output_tokens":15}"). [OFFICIAL docs.anthropic.com/en/docs/build-with-claude/streaming "Basic streaming request",
# as mirrored in idx 2268831995; the mirror lost the blank lines between events, restored here.]
ANTHROPIC_LEGACY = [
    (
        rb"event: message_start",
        rb'data: {"type": "message_start", "message": {"id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [], "model": "claude-opus-4-20250514", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "output_tokens": 1}}}',
    ),
    (
        rb"event: content_block_start",
        rb'data: {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}',
    ),
    (rb"event: ping", rb'data: {"type": "ping"}'),
    (
        rb"event: content_block_delta",
        rb'data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}',
    ),
    (
        rb"event: content_block_delta",
        rb'data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}}',
    ),
    (rb"event: content_block_stop", rb'data: {"type": "content_block_stop", "index": 0}'),
    (
        rb"event: message_delta",
        rb'data: {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence":null}, "usage": {"output_tokens": 15}}',
    ),
    (rb"event: message_stop", rb'data: {"type": "message_stop"}'),
]

# [OFFICIAL docs.anthropic.com streaming "Streaming request with web search tool use", mirrored in idx 2268831995]:
# with a server tool the input figures of message_delta GROW past message_start (2679 -> 10682; wire-formats.md §3.3).
# Only the two usage-bearing frames are kept: the docs elide the search-result frames with "...".
ANTHROPIC_WEB_SEARCH = [
    (
        rb"event: message_start",
        rb'data: {"type":"message_start","message":{"id":"msg_01G...","type":"message","role":"assistant","model":"claude-3-7-sonnet-20250219","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":2679,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":3}}}',
    ),
    (
        rb"event: message_delta",
        rb'data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":10682,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":510,"server_tool_use":{"web_search_requests":1}}}',
    ),
    (rb"event: message_stop", rb'data: {"type":"message_stop"}'),
]

# (shape) Several message_delta events, as server-tool streams send (wire-formats.md §3.3; PostHog v7.75.4): each one
# is cumulative, so the latest wins. Built on the §3.3 capture's message_start.
ANTHROPIC_DELTA_1 = (
    rb"event: message_delta",
    rb'data: {"type":"message_delta","delta":{"stop_reason":null,"stop_sequence":null},"usage":{"input_tokens":4,"cache_creation_input_tokens":22100,"cache_read_input_tokens":0,"output_tokens":87,"server_tool_use":{"web_search_requests":1}}}',
)
ANTHROPIC_DELTA_2 = (
    rb"event: message_delta",
    rb'data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":2684,"cache_creation_input_tokens":22100,"cache_read_input_tokens":0,"output_tokens":151,"server_tool_use":{"web_search_requests":2}}}',
)

# (shape) The §3.3 capture's message_start with the cache write split between the 5-minute and the 1-hour TTL, as
# the SDK's `cache_creation` breakdown allows (wire-formats.md §3.2). No capture with 1h writes is in the research.
ANTHROPIC_START_1H = (
    rb"event: message_start",
    rb'data: {"type":"message_start","message":{"id":"msg_018dSxFH9nFU1QaPVuXdUoXF","type":"message","role":"assistant","model":"claude-3-7-sonnet-20250219","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":4,"cache_creation_input_tokens":22100,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":22000},"output_tokens":1,"service_tier":"standard"}}}',
)

# wire-formats.md §3.2 [CAPTURE idx 68351125198, live probe of api.anthropic.com, claude-opus-4-6].
BODY_ANTHROPIC = rb'{"model":"claude-opus-4-6","id":"msg_011Cf4TVGMgFr4ZSWWd9hLXo","type":"message","role":"assistant","content":[],"container":null,"stop_reason":"max_tokens","stop_sequence":null,"stop_details":null,"usage":{"input_tokens":8,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":1,"service_tier":"standard","inference_geo":"global"}}'


# --------------------------------------------------------------------------------------------------------------
# Gemini fixtures
# --------------------------------------------------------------------------------------------------------------

# wire-formats.md §4.2 [CAPTURE idx 62014853838, gemini-2.5-flash]: two chunks, running totals (3 -> 8). The capture
# is a markdown file joined with "\n\n"; the raw separator is "\r\n\r\n" (idx 70228677879), used below.
GEMINI_SSE = [
    rb'data: {"candidates": [{"content": {"parts": [{"text": "1\n2\n"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 3,"totalTokenCount": 11,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 8}]},"modelVersion": "gemini-2.5-flash","responseId": "WhmlabShCNjv-8YPl_D1gAo"}',
    rb'data: {"candidates": [{"content": {"parts": [{"text": "3\n4\n5"}],"role": "model"},"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 8,"totalTokenCount": 16,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 8}]},"modelVersion": "gemini-2.5-flash","responseId": "WhmlabShCNjv-8YPl_D1gAo"}',
]

# [CAPTURE idx 8738055865, gemini-2.5-flash with thinking, cited by wire-formats.md §4.2 for "thoughtsTokenCount
# 72 -> 102"]: four chunks of running totals; the early thought chunks have no candidatesTokenCount. The source joins
# them with "\n\n".
GEMINI_THOUGHTS = [
    rb"""data: {"candidates": [{"content": {"parts": [{"text": "**Calculating Yesterday's Date**\n\nI've successfully retrieved today's date, 2025-11-11. My current focus is to determine yesterday's date, which I've now calculated as 2025-11-10. This is a crucial step towards providing the requested weather information, and I'm on track to deliver a complete and accurate response.\n\n\n","thought": true}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 391,"totalTokenCount": 463,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 391}],"thoughtsTokenCount": 72},"modelVersion": "gemini-2.5-flash","responseId": "HTESab3lIJWe0-kP6_Wh4Ao"}""",
    rb"""data: {"candidates": [{"content": {"parts": [{"text": "**Refining Date Parameters**\n\nI've determined yesterday's date, 2025-11-10, crucial for getting the weather. I'm building on that success. My task now is to integrate this date into the 'get_weather' tool with \"shanghai\" as the location. This will allow me to finally provide the requested information, which I will then report back.\n\n\n","thought": true}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 391,"totalTokenCount": 493,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 391}],"thoughtsTokenCount": 102},"modelVersion": "gemini-2.5-flash","responseId": "HTESab3lIJWe0-kP6_Wh4Ao"}""",
    rb'data: {"candidates": [{"content": {"parts": [{"text": "Yesterday was 2025-11-10.\n","thoughtSignature": "CikB0e2KbwvEqAUe/Jbf3zx5lg6fKQe382RFpFzHXfaI7x59tkpEUrWQ0Qp6AdHtim93jg0+fEbEV+4yvK/XAUKtsxzs/NjSKNdVB9bE6QiZZgun3CCrEMtOnvI0c0YPeSh7cD7pbCYrEdJAedfO0qLEkLB0Txf7vP8CCXFdVRfid8HX5vATXDgmJBvsb+oNBJMtbYKmvT89CvcceFYWtWUxQPVE7p0KsAEB0e2Kb7CsrMats3mXW9aOqkSbuS3kM3a6YTOQymYEfIsWmRNpM/1wvZsg8rfBSQ4rNtnKoXsRLhYdmpR4T3h5xV/UpclCduXabEjl4BV4lhln1Rp0CdAzW4j60NUv85NKR9Z0rt1sPZwwJ9B+XAgLnqz3aHWGImJG5ZXMa9FRmTIdV3ko8bAgup1nLYrl7UeOb/+QFSEMxqgZ0a9IPAJN/gB1BSBCRAzvZ/xvP3F3tgppAdHtim9mSHTlqsHDzXB6eIXcG+ciJayNMWdfVwrJ1RLK5aXwNgaeQb7p8QANO3gH9GpY5bIIazL+w20wnKM8xFP5rFD8T/x4LNhe+0sXh4Y7aJewaR8C6DN2ocob8zKi1qxqXyEaJL9I"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 391,"candidatesTokenCount": 12,"totalTokenCount": 505,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 391}],"thoughtsTokenCount": 102},"modelVersion": "gemini-2.5-flash","responseId": "HTESab3lIJWe0-kP6_Wh4Ao"}',
    rb'data: {"candidates": [{"content": {"parts": [{"functionCall": {"name": "get_weather","args": {"city": "shanghai","date": "2025-11-10"}}}],"role": "model"},"finishReason": "STOP","index": 0,"finishMessage": "Model generated function call(s)."}],"usageMetadata": {"promptTokenCount": 391,"candidatesTokenCount": 43,"totalTokenCount": 536,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 391}],"thoughtsTokenCount": 102},"modelVersion": "gemini-2.5-flash","responseId": "HTESab3lIJWe0-kP6_Wh4Ao"}',
]
GEMINI_THOUGHTS_BILLED = Usage(input_tokens=391, output_tokens=43 + 102, reasoning_tokens=102)

# wire-formats.md §4.3 [CAPTURE-shaped fixture idx 70476697696 "Without alt=sse: one JSON array of the same chunks"]:
# pretty-printed elements separated by "\n,\r\n", closed by "\n]".
GEMINI_ARRAY = (
    b"[{\n"
    b'  "candidates": [\n'
    b"    {\n"
    b'      "content": {\n'
    b'        "parts": [\n'
    b"          {\n"
    b'            "text": "Hello"\n'
    b"          }\n"
    b"        ],\n"
    b'        "role": "model"\n'
    b"      },\n"
    b'      "index": 0\n'
    b"    }\n"
    b"  ],\n"
    b'  "usageMetadata": {\n'
    b'    "promptTokenCount": 8,\n'
    b'    "totalTokenCount": 8\n'
    b"  },\n"
    b'  "modelVersion": "gemini-2.5-flash"\n'
    b"}\n"
    b",\r\n"
    b"{\n"
    b'  "candidates": [\n'
    b"    {\n"
    b'      "content": {\n'
    b'        "parts": [\n'
    b"          {\n"
    b'            "text": " there"\n'
    b"          }\n"
    b"        ],\n"
    b'        "role": "model"\n'
    b"      },\n"
    b'      "finishReason": "STOP",\n'
    b'      "index": 0\n'
    b"    }\n"
    b"  ],\n"
    b'  "usageMetadata": {\n'
    b'    "promptTokenCount": 8,\n'
    b'    "candidatesTokenCount": 12,\n'
    b'    "totalTokenCount": 47,\n'
    b'    "thoughtsTokenCount": 27\n'
    b"  },\n"
    b'  "modelVersion": "gemini-2.5-flash"\n'
    b"}\n"
    b"]"
)

# wire-formats.md §4.1 [CAPTURE idx 70228677879, gemini-2.5-flash generateContent], the usageMetadata object.
GEMINI_BODY_USAGE: dict[str, Any] = {
    "promptTokenCount": 29,
    "candidatesTokenCount": 3,
    "totalTokenCount": 89,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 29}],
    "thoughtsTokenCount": 57,
    "serviceTier": "standard",
}

# wire-formats.md §4.1 "tool example 186+406+223=815" [CAPTURE idx 53261048248, gemini-2.5-flash with grounding].
GEMINI_TOOL_USE_USAGE = orjson.loads(
    b'{"promptTokenCount": 186,"candidatesTokenCount": 406,"totalTokenCount": 815,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 186}],"toolUsePromptTokenCount": 223,"toolUsePromptTokensDetails": [{"modality": "TEXT","tokenCount": 223}]}'
)


# ==============================================================================================================
# Parsers of complete usage objects
# ==============================================================================================================


def test_openai_reasoning_is_inside_completion_tokens() -> None:
    usage = orjson.loads(BODY_CHAT)["usage"]
    assert parse_openai_usage(usage) == Usage(input_tokens=8, output_tokens=377, reasoning_tokens=320)


def test_openai_cached_tokens_are_inside_prompt_tokens() -> None:
    # (shape) OpenAI prompt-caching guide; wire-formats.md §1.1: cached_tokens is a subset of prompt_tokens.
    usage = {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    assert parse_openai_usage(usage) == Usage(input_tokens=2006, output_tokens=300, cache_read_tokens=1920)


def test_openai_embeddings_usage_has_no_completion_tokens() -> None:
    # wire-formats.md §1.7 (shape from the SDK's create_embedding_response.py).
    assert parse_openai_usage({"prompt_tokens": 8, "total_tokens": 8}) == Usage(input_tokens=8)


def test_openai_deepseek_top_level_cache_hits_are_inside_prompt_tokens() -> None:
    real = orjson.loads(DEEPSEEK[1].removeprefix(b"data: "))["usage"]
    assert parse_openai_usage(real) == Usage(input_tokens=12, output_tokens=11)
    # (shape) the same usage with a cache hit: 8 of the 12 prompt tokens came from the cache.
    hit = {**real, "prompt_tokens_details": {}, "prompt_cache_hit_tokens": 8, "prompt_cache_miss_tokens": 4}
    assert parse_openai_usage(hit) == Usage(input_tokens=12, output_tokens=11, cache_read_tokens=8)


def test_responses_usage_from_a_complete_body() -> None:
    usage = orjson.loads(BODY_RESPONSES)["usage"]
    assert parse_responses_usage(usage) == Usage(input_tokens=13, output_tokens=6)


def test_responses_reasoning_is_inside_output_tokens() -> None:
    # [CAPTURE idx 69764576934, probe 4b, gpt-5-nano] quoted in wire-formats.md §2.1 ("19+100=119 with 64 reasoning").
    usage = orjson.loads(
        b'{"input_tokens":19,"input_tokens_details":{"cache_write_tokens":0,"cached_tokens":0},"output_tokens":100,"output_tokens_details":{"reasoning_tokens":64},"total_tokens":119}'
    )
    assert parse_responses_usage(usage) == Usage(input_tokens=19, output_tokens=100, reasoning_tokens=64)


def test_anthropic_usage_from_a_complete_body() -> None:
    usage = orjson.loads(BODY_ANTHROPIC)["usage"]
    assert parse_anthropic_usage(usage) == Usage(input_tokens=8, output_tokens=1)


def test_anthropic_input_is_the_sum_of_fresh_cache_read_and_cache_write() -> None:
    # (shape) input_tokens is only the uncached remainder; cache figures are added, with the 1h writes a subset.
    usage = {
        "input_tokens": 10,
        "cache_creation_input_tokens": 300,
        "cache_read_input_tokens": 1000,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
        "output_tokens": 7,
        "server_tool_use": {"web_search_requests": 2},
    }
    assert parse_anthropic_usage(usage) == Usage(
        input_tokens=1310,
        output_tokens=7,
        cache_read_tokens=1000,
        cache_write_tokens=300,
        cache_write_1h_tokens=200,
        units={"web_search": 2},
    )


def test_gemini_output_is_candidates_plus_thoughts() -> None:
    assert parse_gemini_usage(GEMINI_BODY_USAGE) == Usage(input_tokens=29, output_tokens=3 + 57, reasoning_tokens=57)


def test_gemini_tool_use_prompt_tokens_are_input() -> None:
    # totalTokenCount 815 = 186 prompt + 223 tool-use prompt + 406 candidates.
    assert parse_gemini_usage(GEMINI_TOOL_USE_USAGE) == Usage(input_tokens=186 + 223, output_tokens=406)


def test_gemini_cached_content_is_inside_prompt_tokens() -> None:
    # (shape) wire-formats.md §4.1: promptTokenCount "includes the number of tokens in the cached content".
    meta = {
        "promptTokenCount": 2000,
        "cachedContentTokenCount": 1500,
        "candidatesTokenCount": 10,
        "totalTokenCount": 2010,
    }
    assert parse_gemini_usage(meta) == Usage(input_tokens=2000, output_tokens=10, cache_read_tokens=1500)


def test_gemini_audio_prompt_tokens_are_counted() -> None:
    # (shape) promptTokensDetails per modality (wire-formats.md §4.1).
    meta = {
        "promptTokenCount": 40,
        "candidatesTokenCount": 5,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 15}, {"modality": "AUDIO", "tokenCount": 25}],
    }
    assert parse_gemini_usage(meta) == Usage(input_tokens=40, output_tokens=5, input_audio_tokens=25)


# (shape) EmbedContentResponse / BatchEmbedContentsResponse `usageMetadata` (EmbeddingUsageMetadata, Gemini API
# reference; JSON as in googleai_dart's embedding_usage_metadata test, idx 53207282072): `promptTokenDetails` has a
# singular "Token", unlike generateContent's `promptTokensDetails`.
GEMINI_EMBEDDING_USAGE = {
    "promptTokenCount": 15,
    "promptTokenDetails": [{"modality": "TEXT", "tokenCount": 10}, {"modality": "AUDIO", "tokenCount": 5}],
}


def test_gemini_embedding_usage_is_input_only() -> None:
    assert parse_gemini_embedding_usage(GEMINI_EMBEDDING_USAGE) == Usage(input_tokens=15, input_audio_tokens=5)
    assert parse_gemini_embedding_usage({"promptTokenCount": 7}) == Usage(input_tokens=7)


@pytest.mark.parametrize(
    "meta",
    [
        {},
        {"promptTokenDetails": [{"modality": "TEXT", "tokenCount": 3}]},
        {"promptTokenCount": "7"},
        {"promptTokenCount": -1},
    ],
)
def test_gemini_embedding_usage_without_a_count_is_not_billable(meta: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        parse_gemini_embedding_usage(meta)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1beta/models/gemini-embedding-001:embedContent", {"embedding": {"values": [0.1]}}),
        ("/v1beta/models/gemini-embedding-001:batchEmbedContents", {"embeddings": [{"values": [0.1]}]}),
    ],
)
def test_gemini_embedding_response_usage(path: str, body: dict[str, object]) -> None:
    match = match_endpoint("POST", path)
    assert match is not None
    # Older responses carry no usage: the gateway then asks countTokens (tests/test_gemini_accounting.py).
    with pytest.raises(UsageError):
        GeminiApi().usage_from_body(match.endpoint, body)
    reported = {**body, "usageMetadata": GEMINI_EMBEDDING_USAGE}
    assert GeminiApi().usage_from_body(match.endpoint, reported) == Usage(input_tokens=15, input_audio_tokens=5)


def test_integral_floats_are_token_counts() -> None:
    # Some OpenAI-compatible servers serialise counts as floats.
    assert parse_openai_usage({"prompt_tokens": 12.0, "completion_tokens": 3.0}) == Usage(
        input_tokens=12, output_tokens=3
    )


Parser = Callable[[Mapping[str, Any]], Usage]

# Each parser with a real usage object and every count field it reads.
PARSER_CASES: list[tuple[str, Parser, dict[str, Any], list[str]]] = [
    (
        "openai",
        parse_openai_usage,
        orjson.loads(CHAT_USAGE[2].removeprefix(b"data: "))["usage"],
        [
            "prompt_tokens",
            "completion_tokens",
            "prompt_tokens_details.cached_tokens",
            "prompt_tokens_details.audio_tokens",
            "completion_tokens_details.reasoning_tokens",
            "completion_tokens_details.audio_tokens",
            "prompt_cache_hit_tokens",
        ],
    ),
    (
        "responses",
        parse_responses_usage,
        orjson.loads(BODY_RESPONSES)["usage"],
        [
            "input_tokens",
            "output_tokens",
            "input_tokens_details.cached_tokens",
            "output_tokens_details.reasoning_tokens",
        ],
    ),
    (
        "anthropic",
        parse_anthropic_usage,
        orjson.loads(BODY_ANTHROPIC)["usage"],
        [
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "cache_creation.ephemeral_1h_input_tokens",
            "server_tool_use.web_search_requests",
        ],
    ),
    (
        "gemini",
        parse_gemini_usage,
        GEMINI_BODY_USAGE,
        [
            "promptTokenCount",
            "candidatesTokenCount",
            "thoughtsTokenCount",
            "cachedContentTokenCount",
            "toolUsePromptTokenCount",
        ],
    ),
]
FIELD_CASES = [
    pytest.param(parse, base, field, id=f"{name}-{field}")
    for name, parse, base, fields in PARSER_CASES
    for field in fields
]
BAD_VALUES = [
    pytest.param("12", id="string"),
    pytest.param(-1, id="negative"),
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
    pytest.param(1.5, id="fraction"),
    pytest.param(float("nan"), id="nan"),
    pytest.param(float("inf"), id="inf"),
    pytest.param(-3.0, id="negative-float"),
    pytest.param([12], id="list"),
    pytest.param({"n": 12}, id="object"),
]


@pytest.mark.parametrize(("parse", "base", "field"), FIELD_CASES)
@pytest.mark.parametrize("bad", BAD_VALUES)
def test_non_numeric_negative_and_boolean_counts_are_rejected(
    parse: Parser, base: dict[str, Any], field: str, bad: Any
) -> None:
    parse(base)  # the real object itself is fine
    with pytest.raises(UsageError):
        parse(with_value(base, field, bad))


@pytest.mark.parametrize(
    ("parse", "usage"),
    [
        pytest.param(parse_openai_usage, {"prompt_tokens": "x"}, id="openai-prompt"),
        pytest.param(parse_openai_usage, {"prompt_tokens": 1, "prompt_tokens_details": "x"}, id="openai-details"),
        pytest.param(
            parse_openai_usage, {"prompt_tokens": 1, "completion_tokens_details": [1]}, id="openai-completion-details"
        ),
        pytest.param(parse_responses_usage, {"input_tokens": 1, "input_tokens_details": 5}, id="responses-details"),
        pytest.param(parse_anthropic_usage, {"input_tokens": 1, "cache_creation": 5}, id="anthropic-cache-creation"),
        pytest.param(parse_anthropic_usage, {"input_tokens": 1, "server_tool_use": "x"}, id="anthropic-server-tools"),
        pytest.param(parse_gemini_usage, {"promptTokenCount": 1, "promptTokensDetails": {"x": 1}}, id="gemini-details"),
    ],
)
def test_malformed_detail_objects_are_rejected(parse: Parser, usage: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        parse(usage)


@pytest.mark.parametrize(
    ("parse", "usage", "settled"),
    [
        pytest.param(
            parse_openai_usage,
            {"prompt_tokens": 12, "completion_tokens": 100, "prompt_tokens_details": {"cached_tokens": 13}},
            Usage(input_tokens=12, output_tokens=100, cache_read_tokens=12),
            id="openai-cached",
        ),
        pytest.param(
            parse_openai_usage,
            {"prompt_tokens": 12, "completion_tokens": 100, "prompt_cache_hit_tokens": 13},
            Usage(input_tokens=12, output_tokens=100, cache_read_tokens=12),
            id="deepseek-cache-hit",
        ),
        pytest.param(
            parse_openai_usage,
            {"prompt_tokens": 12, "completion_tokens": 100, "prompt_tokens_details": {"audio_tokens": 13}},
            Usage(input_tokens=12, output_tokens=100, input_audio_tokens=12),
            id="openai-audio-in",
        ),
        pytest.param(
            parse_openai_usage,
            {"prompt_tokens": 12, "completion_tokens": 100, "completion_tokens_details": {"reasoning_tokens": 101}},
            Usage(input_tokens=12, output_tokens=100, reasoning_tokens=100),
            id="openai-reasoning",
        ),
        pytest.param(
            parse_responses_usage,
            {"input_tokens": 13, "output_tokens": 6, "input_tokens_details": {"cached_tokens": 14}},
            Usage(input_tokens=13, output_tokens=6, cache_read_tokens=13),
            id="responses-cached",
        ),
        pytest.param(
            parse_responses_usage,
            {"input_tokens": 13, "output_tokens": 6, "output_tokens_details": {"reasoning_tokens": 7}},
            Usage(input_tokens=13, output_tokens=6, reasoning_tokens=6),
            id="responses-reasoning",
        ),
        pytest.param(
            parse_gemini_usage,
            {"promptTokenCount": 29, "cachedContentTokenCount": 30},
            Usage(input_tokens=29, cache_read_tokens=29),
            id="gemini-cached",
        ),
        pytest.param(
            parse_anthropic_usage,
            {
                "input_tokens": 4,
                "cache_creation_input_tokens": 100,
                "cache_creation": {"ephemeral_1h_input_tokens": 101},
            },
            # The TTL breakdown is what Anthropic billed (a total of 0 beside it has been seen upstream).
            Usage(input_tokens=105, cache_write_tokens=101, cache_write_1h_tokens=101),
            id="anthropic-1h",
        ),
    ],
)
def test_a_subset_larger_than_its_total_is_recorded_settled_and_flagged(
    parse: Parser, usage: dict[str, Any], settled: Usage
) -> None:
    """Issue 9: contradictory figures are never rejected (the request was billed) nor extrapolated into a negative
    component: the totals stand, the split inside them gives way (a discount before a surcharge), and the usage is
    flagged so the ledger and llm_usage_anomalies_total show it."""
    got = parse(usage)
    assert got.flags == ("inconsistent",)
    got.flags = ()
    assert got == settled


# ==============================================================================================================
# OpenAI Chat Completions streams
# ==============================================================================================================


def test_chat_injected_include_usage_is_invisible_to_the_client_at_every_split() -> None:
    upstream, client = sse(*CHAT_USAGE), sse(*CHAT_USAGE_FOR_CLIENT)
    for chunks in splits(upstream):
        meter = ChatStreamMeter(hide_usage=True)
        assert relay(meter, chunks) == client, cut_sizes(chunks)
        assert meter.usage() == CHAT_USAGE_BILLED
        assert meter.finished and meter.upstream_error is None


def test_chat_hidden_usage_leaves_the_other_members_intact() -> None:
    client = events_of(relay(ChatStreamMeter(hide_usage=True), [sse(*CHAT_USAGE)]))
    sent = events_of(sse(*CHAT_USAGE))
    assert [e.data for e in client][-1] == b"[DONE]" and len(client) == 3
    for got, original in zip(client[:2], sent[:2], strict=True):
        want = orjson.loads(original.data)
        assert want.pop("usage") is None
        assert orjson.loads(got.data) == want


@pytest.mark.parametrize(
    ("upstream", "client"),
    [
        pytest.param(CHAT_USAGE_FIRST, CHAT_USAGE_FIRST_FOR_CLIENT, id="usage-before-choices"),
        pytest.param(CHAT_USAGE_AFTER_CHOICES, CHAT_USAGE_AFTER_CHOICES_FOR_CLIENT, id="usage-after-choices"),
        pytest.param(CHAT_USAGE[0], CHAT_USAGE_FOR_CLIENT[0], id="usage-between-choices-and-obfuscation"),
        pytest.param(CHAT_USAGE_LEADING, CHAT_USAGE_LEADING_FOR_CLIENT, id="usage-first-member"),
    ],
)
def test_chat_usage_null_is_stripped_whatever_the_key_order(upstream: bytes, client: bytes) -> None:
    assert relay(ChatStreamMeter(hide_usage=True), [sse(upstream)]) == sse(client)
    orjson.loads(client.removeprefix(b"data: "))  # still one valid JSON object


def test_chat_include_usage_asked_by_the_client_is_relayed_byte_for_byte_at_every_split() -> None:
    upstream = sse(*CHAT_USAGE)
    for chunks in splits(upstream):
        meter = ChatStreamMeter(hide_usage=False)
        assert relay(meter, chunks) == upstream, cut_sizes(chunks)
        assert meter.usage() == CHAT_USAGE_BILLED
        assert meter.finished


def test_chat_azure_prompt_filter_chunk_with_empty_choices_is_relayed_untouched() -> None:
    upstream = sse(*AZURE, AZURE_USAGE, b"data: [DONE]")
    client = sse(*AZURE, b"data: [DONE]")  # every Azure chunk as sent; only the usage chunk is gone
    for chunks in splits(upstream, random_rounds=20):
        meter = ChatStreamMeter(hide_usage=True)
        assert relay(meter, chunks) == client, cut_sizes(chunks)
        assert meter.usage() == Usage(input_tokens=14, output_tokens=9)


def test_chat_azure_stream_blocked_before_the_usage_chunk_is_relayed_but_not_metered() -> None:
    # wire-formats.md §5.4: a filter-blocked stream ends with [DONE] and no usage chunk even though it was requested.
    upstream = sse(*AZURE, b"data: [DONE]")
    meter = ChatStreamMeter(hide_usage=True)
    assert relay(meter, [upstream]) == upstream
    assert meter.finished
    with pytest.raises(UsageError):
        meter.usage()


def test_chat_empty_choices_with_null_usage_is_not_a_usage_chunk() -> None:
    # (shape) Older Azure api-versions (wire-formats.md §5.4, go-openai PR #448): the prompt-annotation chunk has
    # `choices: []` AND `"usage":null`. It is relayed (minus the null member), never mistaken for the usage chunk;
    # content_filter_results filled in from the §5.4 capture, which the document elides.
    upstream = rb'data: {"id":"","object":"","created":0,"model":"","prompt_annotations":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}}],"choices":[],"usage":null}'
    client = rb'data: {"id":"","object":"","created":0,"model":"","prompt_annotations":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}}],"choices":[]}'
    meter = ChatStreamMeter(hide_usage=True)
    assert relay(meter, [sse(upstream, *CHAT_USAGE[1:])]) == sse(client, *CHAT_USAGE_FOR_CLIENT[1:])
    assert meter.usage() == CHAT_USAGE_BILLED


def test_chat_legacy_completions_usage_chunk_with_usage_before_choices_is_hidden() -> None:
    meter = ChatStreamMeter(hide_usage=True)
    assert relay(meter, [sse(*LEGACY_COMPLETION)]) == sse(LEGACY_COMPLETION[0], LEGACY_COMPLETION[2])
    assert meter.usage() == Usage(input_tokens=10, output_tokens=362)


def test_chat_usage_on_a_chunk_with_choices_is_never_hidden() -> None:
    # DeepSeek's usage rides on the finish chunk, which carries a delta the client needs.
    upstream = sse(*DEEPSEEK)
    meter = ChatStreamMeter(hide_usage=True)
    assert relay(meter, [upstream]) == upstream
    assert meter.usage() == Usage(input_tokens=12, output_tokens=11)


def test_chat_unparseable_usage_chunk_with_empty_choices_is_still_hidden() -> None:
    # Regression: ChatStreamMeter.observe returned event.raw when parse_openai_usage raised, before the
    # `choices == []` check, so with hide_usage=True an unreadable usage chunk reached a client that never asked
    # for usage; clients index choices[0] and crash on it (headroom #2026, wire-formats.md §1.3).
    garbled = XAI_USAGE_CHUNK.replace(b'"prompt_tokens":32', b'"prompt_tokens":"32"')
    upstream = sse(CHAT_USAGE[0], CHAT_USAGE[1], garbled, b"data: [DONE]")
    meter = ChatStreamMeter(hide_usage=True)
    assert relay(meter, [upstream]) == sse(*CHAT_USAGE_FOR_CLIENT)
    with pytest.raises(UsageError):
        meter.usage()


def test_xai_reasoning_outside_completion_tokens_is_billed_as_output() -> None:
    # xAI counts reasoning beside completion_tokens (32 + 9 + 94 = 135 total); billed output is 9 + 94.
    upstream = sse(CHAT_USAGE[0], CHAT_USAGE[1], XAI_USAGE_CHUNK, b"data: [DONE]")
    meter = ChatStreamMeter(hide_usage=True)
    assert relay(meter, [upstream]) == sse(*CHAT_USAGE_FOR_CLIENT)
    assert meter.usage() == Usage(input_tokens=32, output_tokens=103, cache_read_tokens=6, reasoning_tokens=94)


def test_chat_stream_without_usage_cannot_be_metered() -> None:
    upstream = sse(*CHAT_NO_USAGE)
    meter = ChatStreamMeter(hide_usage=False)
    assert relay(meter, pieces(upstream, range(7, len(upstream), 97))) == upstream
    assert meter.finished and meter.upstream_error is None
    with pytest.raises(UsageError):
        meter.usage()


def test_chat_error_chunk_sets_upstream_error() -> None:
    upstream = sse(CHAT_ERROR, b"data: [DONE]")
    for hide in (True, False):
        meter = ChatStreamMeter(hide_usage=hide)
        assert relay(meter, [upstream]) == upstream
        assert meter.upstream_error == "stream_error"
        assert meter.finished
        with pytest.raises(UsageError):
            meter.usage()


def test_chat_done_is_held_back_until_the_upstream_ends() -> None:
    # So that an error event the gateway adds (unmetered usage) reaches the client before [DONE].
    meter = ChatStreamMeter(hide_usage=False)
    assert meter.feed(sse(*CHAT_USAGE)) == sse(*CHAT_USAGE[:3])
    assert meter.flush() == b"data: [DONE]\n\n"


def test_chat_stream_cut_inside_the_usage_chunk() -> None:
    upstream = sse(*CHAT_USAGE)
    cut = upstream.index(b'"usage":{') + 20
    meter = ChatStreamMeter(hide_usage=True)
    # The unfinished usage chunk is never passed on, and there is no [DONE] to release.
    assert relay(meter, [upstream[:cut]]) == sse(*CHAT_USAGE_FOR_CLIENT[:2])
    assert not meter.finished
    with pytest.raises(UsageError):
        meter.usage()


def test_chat_usage_values_that_are_not_counts_fail_metering() -> None:
    # (shape) the §1.3 usage chunk with a string count.
    bad = CHAT_USAGE[2].replace(b'"prompt_tokens":12', b'"prompt_tokens":"12"')
    meter = ChatStreamMeter(hide_usage=False)
    meter.feed(sse(CHAT_USAGE[0], bad, b"data: [DONE]"))
    with pytest.raises(UsageError):
        meter.usage()


def test_parse_chat_stream() -> None:
    assert parse_chat_stream(events_of(sse(*CHAT_USAGE))) == CHAT_USAGE_BILLED
    assert parse_chat_stream(events_of(sse(*CHAT_USAGE)), hide_usage=True) == CHAT_USAGE_BILLED
    assert parse_chat_stream(events_of(sse(*LEGACY_COMPLETION))) == Usage(input_tokens=10, output_tokens=362)
    with pytest.raises(UsageError):
        parse_chat_stream(events_of(sse(*CHAT_NO_USAGE)))


# ==============================================================================================================
# OpenAI Responses streams
# ==============================================================================================================


def test_responses_stream_is_relayed_untouched_and_metered_from_completed_at_every_split() -> None:
    upstream = sse(*RESPONSES)
    for chunks in splits(upstream, random_rounds=30):
        meter = ResponsesStreamMeter()
        assert relay(meter, chunks) == upstream, cut_sizes(chunks)
        assert meter.usage() == Usage(input_tokens=13, output_tokens=12)
        assert meter.finished and meter.upstream_error is None


def test_responses_incomplete_carries_the_usage() -> None:
    upstream = sse(*RESPONSES[:-1], RESPONSES_INCOMPLETE)
    meter = ResponsesStreamMeter()
    assert relay(meter, [upstream]) == upstream
    assert meter.usage() == Usage(input_tokens=16, output_tokens=16)
    assert meter.finished and meter.upstream_error is None


def test_responses_created_and_in_progress_usage_null_is_not_usage() -> None:
    meter = ResponsesStreamMeter()
    meter.feed(sse(*RESPONSES[:-1]))
    assert not meter.finished
    with pytest.raises(UsageError):
        meter.usage()


def test_responses_failed_sets_upstream_error_and_keeps_partial_usage() -> None:
    meter = ResponsesStreamMeter()
    upstream = sse(*RESPONSES[:4], RESPONSES_FAILED_WITH_USAGE)
    assert relay(meter, [upstream]) == upstream
    assert meter.upstream_error == "response_failed"
    assert meter.finished
    assert meter.usage() == Usage(input_tokens=12, output_tokens=5)


def test_responses_failed_without_usage() -> None:
    meter = ResponsesStreamMeter()
    meter.feed(sse(*RESPONSES[:4], RESPONSES_FAILED))
    assert meter.upstream_error == "response_failed"
    with pytest.raises(UsageError):
        meter.usage()


def test_responses_error_event_sets_upstream_error() -> None:
    meter = ResponsesStreamMeter()
    upstream = sse(*RESPONSES[:5], RESPONSES_ERROR)
    assert relay(meter, [upstream]) == upstream
    assert meter.upstream_error == "stream_error"
    assert not meter.finished
    with pytest.raises(UsageError):
        meter.usage()


def test_responses_stream_without_event_lines() -> None:
    # (shape) The capture with its `event:` lines dropped: some compatible servers send data-only frames
    # (the probe notes of idx 69764576934 quote frames that way).
    upstream = sse(*(frame[1] for frame in RESPONSES))
    assert parse_responses_stream(events_of(upstream)) == Usage(input_tokens=13, output_tokens=12)


def test_parse_responses_stream() -> None:
    assert parse_responses_stream(events_of(sse(*RESPONSES))) == Usage(input_tokens=13, output_tokens=12)
    assert parse_responses_stream(events_of(sse(RESPONSES_INCOMPLETE))) == Usage(input_tokens=16, output_tokens=16)
    with pytest.raises(UsageError):
        parse_responses_stream(events_of(sse(*RESPONSES[:-1])))


# ==============================================================================================================
# Anthropic Messages streams
# ==============================================================================================================


def test_anthropic_stream_is_relayed_untouched_and_metered_at_every_split() -> None:
    upstream = sse(*ANTHROPIC)
    for chunks in splits(upstream):
        meter = MessagesStreamMeter()
        assert relay(meter, chunks) == upstream, cut_sizes(chunks)
        assert meter.usage() == ANTHROPIC_BILLED
        assert meter.finished and meter.upstream_error is None


def test_anthropic_message_delta_repeating_input_figures_is_not_added() -> None:
    usage = parse_anthropic_stream(events_of(sse(*ANTHROPIC)))
    # Adding message_delta to message_start would give 44208 input tokens and 152 output tokens.
    assert usage.input_tokens == 22104
    assert usage.cache_write_tokens == 22100
    assert usage.output_tokens == 151


def test_anthropic_legacy_message_delta_with_output_only() -> None:
    assert parse_anthropic_stream(events_of(sse(*ANTHROPIC_LEGACY))) == Usage(input_tokens=25, output_tokens=15)


def test_anthropic_server_tool_input_growing_in_message_delta() -> None:
    usage = parse_anthropic_stream(events_of(sse(*ANTHROPIC_WEB_SEARCH)))
    assert usage == Usage(input_tokens=10682, output_tokens=510, units={"web_search": 1})


def test_anthropic_several_message_delta_events_latest_wins() -> None:
    upstream = sse(ANTHROPIC[0], ANTHROPIC[1], ANTHROPIC_DELTA_1, ANTHROPIC[4], ANTHROPIC_DELTA_2, ANTHROPIC[7])
    meter = MessagesStreamMeter()
    assert relay(meter, [upstream]) == upstream
    assert meter.usage() == Usage(
        input_tokens=2684 + 22100, output_tokens=151, cache_write_tokens=22100, units={"web_search": 2}
    )


def test_anthropic_one_hour_cache_writes() -> None:
    upstream = sse(ANTHROPIC_START_1H, *ANTHROPIC[1:])
    assert parse_anthropic_stream(events_of(upstream)) == Usage(
        input_tokens=22104, output_tokens=151, cache_write_tokens=22100, cache_write_1h_tokens=22000
    )


def test_anthropic_trailing_spaces_inside_data_json() -> None:
    delta = events_of(sse(ANTHROPIC[6]))[0]
    assert delta.event == "message_delta" and delta.data.endswith(b"}             }")
    meter = MessagesStreamMeter()
    meter.feed(sse(ANTHROPIC[0], ANTHROPIC[6]))
    assert meter.usage().output_tokens == 151


def test_anthropic_error_event_sets_upstream_error_and_keeps_what_was_seen() -> None:
    upstream = sse(*ANTHROPIC[:4], ANTHROPIC_ERROR)
    for chunks in splits(upstream, random_rounds=10):
        meter = MessagesStreamMeter()
        assert relay(meter, chunks) == upstream, cut_sizes(chunks)
        assert meter.upstream_error == "stream_error"
        assert not meter.finished
        # Only message_start was seen: its input figures and its intermediate output count, a lower bound.
        assert meter.usage() == Usage(
            input_tokens=22104, output_tokens=1, cache_write_tokens=22100, flags=("incomplete",)
        )


def test_anthropic_stream_without_message_start_cannot_be_metered() -> None:
    meter = MessagesStreamMeter()
    meter.feed(sse(*ANTHROPIC[1:]))
    with pytest.raises(UsageError):
        meter.usage()


@pytest.mark.parametrize("bad", [b'"151"', b"-151", b"true", b"151.5"])
def test_anthropic_message_delta_with_bad_counts_fails_metering(bad: bytes) -> None:
    delta = (ANTHROPIC[6][0], ANTHROPIC[6][1].replace(b'"output_tokens":151', b'"output_tokens":' + bad))
    meter = MessagesStreamMeter()
    meter.feed(sse(ANTHROPIC[0], delta, ANTHROPIC[7]))
    with pytest.raises(UsageError):
        meter.usage()


# ==============================================================================================================
# Gemini streams
# ==============================================================================================================


def test_gemini_sse_with_crlf_separators_at_every_split() -> None:
    upstream = sse(*GEMINI_SSE, sep=b"\r\n\r\n")
    for chunks in splits(upstream):
        meter = GeminiSSEMeter()
        assert relay(meter, chunks) == upstream, cut_sizes(chunks)
        assert meter.usage() == Usage(input_tokens=8, output_tokens=8)
        assert meter.finished and meter.upstream_error is None


@pytest.mark.parametrize("sep", [b"\r\n\r\n", b"\n\n"], ids=["crlf", "lf"])
def test_gemini_cumulative_usage_last_wins_not_a_sum(sep: bytes) -> None:
    upstream = sse(*GEMINI_THOUGHTS, sep=sep)
    for chunks in splits(upstream, random_rounds=20):
        meter = GeminiSSEMeter()
        assert relay(meter, chunks) == upstream, cut_sizes(chunks)
        assert meter.usage() == GEMINI_THOUGHTS_BILLED
    # Summing the running totals would bill 4 x 391 input tokens.
    assert parse_gemini_stream(events_of(upstream)).input_tokens == 391


def test_gemini_chunks_without_usage_metadata_keep_the_last_one_seen() -> None:
    # (shape) wire-formats.md §4.2: some chunks (gemini-3 parallel function calls) carry no usageMetadata at all.
    bare = rb'data: {"candidates": [{"content": {"parts": [{"functionCall": {"name": "get_weather","args": {"city": "paris"}}}],"role": "model"},"index": 0}],"modelVersion": "gemini-3-pro-preview","responseId": "HTESab3lIJWe0-kP6_Wh4Ao"}'
    upstream = sse(GEMINI_THOUGHTS[0], bare, *GEMINI_THOUGHTS[1:], bare, sep=b"\r\n\r\n")
    meter = GeminiSSEMeter()
    assert relay(meter, [upstream]) == upstream
    assert meter.usage() == GEMINI_THOUGHTS_BILLED


def test_gemini_stream_cut_before_finish_reason_is_metered_so_far() -> None:
    meter = GeminiSSEMeter()
    meter.feed(sse(*GEMINI_THOUGHTS[:2], sep=b"\r\n\r\n"))
    assert not meter.finished
    assert meter.usage() == Usage(input_tokens=391, output_tokens=102, reasoning_tokens=102)


def test_gemini_stream_without_usage_metadata_cannot_be_metered() -> None:
    meter = GeminiSSEMeter()
    meter.feed(b'data: {"candidates": [{"content": {"parts": [{"text": "hi"}],"role": "model"},"index": 0}]}\r\n\r\n')
    with pytest.raises(UsageError):
        meter.usage()


@pytest.mark.parametrize("bad", [b'"8"', b"-8", b"true"])
def test_gemini_stream_with_bad_counts_fails_metering(bad: bytes) -> None:
    chunk = GEMINI_SSE[1].replace(b'"candidatesTokenCount": 8', b'"candidatesTokenCount": ' + bad)
    meter = GeminiSSEMeter()
    meter.feed(sse(GEMINI_SSE[0], chunk, sep=b"\r\n\r\n"))
    with pytest.raises(UsageError):
        meter.usage()


def test_parse_gemini_stream() -> None:
    assert parse_gemini_stream(events_of(sse(*GEMINI_SSE, sep=b"\r\n\r\n"))) == Usage(input_tokens=8, output_tokens=8)
    with pytest.raises(UsageError):
        parse_gemini_stream([])


GEMINI_ARRAY_BILLED = Usage(input_tokens=8, output_tokens=12 + 27, reasoning_tokens=27)


def test_gemini_json_array_fed_in_arbitrary_splits() -> None:
    for chunks in splits(GEMINI_ARRAY):
        meter = GeminiArrayMeter()
        assert relay(meter, chunks) == GEMINI_ARRAY, cut_sizes(chunks)
        assert meter.usage() == GEMINI_ARRAY_BILLED
        assert meter.finished and meter.upstream_error is None


def test_gemini_truncated_json_array_falls_back_to_the_last_complete_usage_metadata() -> None:
    first_end = GEMINI_ARRAY.index(b'"totalTokenCount": 8\n  }') + len(b'"totalTokenCount": 8\n  }')
    second_end = GEMINI_ARRAY.index(b'"thoughtsTokenCount": 27\n  }') + len(b'"thoughtsTokenCount": 27\n  }')
    finish_at = GEMINI_ARRAY.index(b'"finishReason"') + len(b'"finishReason"')
    for cut in range(len(GEMINI_ARRAY) + 1):
        meter = GeminiArrayMeter()
        assert relay(meter, [GEMINI_ARRAY[:cut]]) == GEMINI_ARRAY[:cut]
        if cut >= second_end:
            assert meter.usage() == GEMINI_ARRAY_BILLED, cut
        elif cut >= first_end:
            assert meter.usage() == Usage(input_tokens=8), cut
        else:
            with pytest.raises(UsageError):
                meter.usage()
        # The chunk with finishReason is the provider's last word, even if the closing bracket never came.
        assert meter.finished == (cut >= finish_at), cut


def test_gemini_json_array_beyond_the_kept_tail_is_still_metered() -> None:
    # (shape) A long answer (e.g. inline images) grows the array past the bytes the meter keeps whole; it then reads
    # the last complete usageMetadata from the tail it kept.
    first, last = GEMINI_ARRAY.removeprefix(b"[").split(b"\n,\r\n", 1)
    filler = first.replace(b'"text": "Hello"', b'"text": "' + b"x" * (256 * 1024) + b'"')
    body = b"[" + b"\n,\r\n".join([filler] * 40 + [last])
    assert len(orjson.loads(body)) == 41 and len(body) > 10 * 1024 * 1024
    meter = GeminiArrayMeter()
    assert relay(meter, pieces(body, range(65536, len(body), 65536))) == body
    assert meter.usage() == GEMINI_ARRAY_BILLED


def test_gemini_sse_blocked_prompt_reports_prompt_tokens_only() -> None:
    # (shape) wire-formats.md §4.6: a blocked prompt gets promptFeedback.blockReason, no candidates, and usage with
    # only promptTokenCount / totalTokenCount.
    chunk = rb'data: {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},"usageMetadata": {"promptTokenCount": 8,"totalTokenCount": 8,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 8}]},"modelVersion": "gemini-2.5-flash","responseId": "WhmlabShCNjv-8YPl_D1gAo"}'
    assert parse_gemini_stream(events_of(sse(chunk, sep=b"\r\n\r\n"))) == Usage(input_tokens=8)


def test_gemini_json_array_carrying_an_error() -> None:
    # (shape) wire-formats.md §4.3: errors on this endpoint arrive wrapped in the array; body from §4.7 (400 bad key).
    body = b'[{\n  "error": {\n    "code": 400,\n    "message": "API key not valid. Please pass a valid API key.",\n    "status": "INVALID_ARGUMENT"\n  }\n}\n]'
    meter = GeminiArrayMeter()
    assert relay(meter, [body]) == body
    with pytest.raises(UsageError):
        meter.usage()
    assert meter.upstream_error == "stream_error"
