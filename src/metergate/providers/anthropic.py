"""The Anthropic Messages API.

Usage rules: `input_tokens` is only the uncached remainder, so billed input is
`input_tokens + cache_creation_input_tokens + cache_read_input_tokens`. In a stream, `message_start` carries the
input and cache figures of the first pass and `message_delta` carries cumulative figures (the final
`output_tokens`, and in newer API versions the input figures and `usage.iterations` again): every field is
overwritten by its latest value, never added, so a `cache_read_input_tokens: 0` in the delta wins (with compaction
the first pass's cache read is billed through `iterations`, not the top level). A stream cut after message_start
is flagged incomplete: its output is unknown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import orjson

from metergate.endpoints import Endpoint, EndpointMatch
from metergate.providers.base import (
    MAX_MODEL_CHARS,
    MAX_OUTPUT_TOKENS,
    ApiAdapter,
    RequestFacts,
    SSEStreamMeter,
    StreamMeter,
    Upstream,
    join_url,
    read_count,
    read_flag,
    read_model,
    require_dict,
)
from metergate.sse import SSEEvent
from metergate.usage import (
    INCOMPLETE,
    INCONSISTENT,
    Usage,
    UsageError,
    UsageMissing,
    UsagePart,
    count,
    settle,
    tier_of,
    total_of,
)

DEFAULT_ANTHROPIC_VERSION = "2023-06-01"


# Iteration types metergate knows; any other is still billed, under a bounded name.
_ITERATION_KINDS = frozenset({"message", "compaction", "advisor_message", "fallback_message"})


def _anthropic_pass(usage: Mapping[str, Any], where: str) -> Usage:
    """The tokens of one billed pass: input_tokens is only the uncached remainder."""
    fresh = count(usage.get("input_tokens"), f"{where}input_tokens")
    cache_write = count(usage.get("cache_creation_input_tokens"), f"{where}cache_creation_input_tokens")
    cache_read = count(usage.get("cache_read_input_tokens"), f"{where}cache_read_input_tokens")
    output = count(usage.get("output_tokens"), f"{where}output_tokens")
    breakdown = usage.get("cache_creation") or {}
    if not isinstance(breakdown, Mapping):
        raise UsageError(f"{where}usage.cache_creation is not an object")
    write_5m = count(breakdown.get("ephemeral_5m_input_tokens"), f"{where}cache_creation.ephemeral_5m_input_tokens")
    write_1h = count(breakdown.get("ephemeral_1h_input_tokens"), f"{where}cache_creation.ephemeral_1h_input_tokens")
    inconsistent = write_5m + write_1h > cache_write
    if inconsistent:
        # Seen upstream: a total of 0 beside non-zero TTL figures. The TTL figures are what was billed.
        cache_write = write_5m + write_1h
    pass_usage = Usage(
        input_tokens=fresh + cache_write + cache_read,
        output_tokens=output,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        cache_write_1h_tokens=write_1h,
    )
    if inconsistent:
        pass_usage.flag(INCONSISTENT)
    return pass_usage


def parse_anthropic_usage(usage: Mapping[str, Any]) -> Usage:
    """A Messages `usage` object, top level or final stream figures.

    With `usage.iterations` (context compaction, the advisor tool, server-side fallback), the bill is the sum over
    the iterations, each priced at its own model (an `advisor_message` names it; the others run on the request's
    model), and the top-level figures, which leave some passes out, are not billed again. Server tool counts,
    thinking tokens, the service tier, US-only inference and fast mode are read from the top level.
    """
    iterations = usage.get("iterations")
    if iterations is not None and not isinstance(iterations, list):
        raise UsageError("usage.iterations is not a list")
    if iterations:
        parts = []
        for i, item in enumerate(iterations):
            item = require_dict(item, f"usage.iterations[{i}]")
            kind = item.get("type")
            kind = kind if kind in _ITERATION_KINDS else "other"
            model = item.get("model")
            model = model if isinstance(model, str) and 0 < len(model) <= MAX_MODEL_CHARS else None
            parts.append(UsagePart(kind, model, _anthropic_pass(item, f"iterations[{i}].")))
        result = total_of([p.usage for p in parts])
        for part in parts:
            for flag in part.usage.flags:
                result.flag(flag)
    else:
        parts, result = [], _anthropic_pass(usage, "")
    server_tools = usage.get("server_tool_use") or {}
    output_details = usage.get("output_tokens_details") or {}
    if not isinstance(server_tools, Mapping) or not isinstance(output_details, Mapping):
        raise UsageError("usage.server_tool_use or usage.output_tokens_details is not an object")
    result.add_units(
        "web_search", count(server_tools.get("web_search_requests"), "server_tool_use.web_search_requests")
    )
    result.add_units("web_fetch", count(server_tools.get("web_fetch_requests"), "server_tool_use.web_fetch_requests"))
    # A subset of output_tokens ("the inclusive, authoritative total used for billing").
    result.reasoning_tokens = count(output_details.get("thinking_tokens"), "output_tokens_details.thinking_tokens")
    tier = usage.get("service_tier")
    result.batch = tier == "batch"
    result.service_tier = None if tier == "batch" else tier_of(tier)
    result.region = "us" if usage.get("inference_geo") == "us" else None
    result.speed = "fast" if usage.get("speed") == "fast" else None
    result.parts = tuple(
        UsagePart(
            p.kind,
            p.model,
            replace(
                p.usage, service_tier=result.service_tier, batch=result.batch, region=result.region, speed=result.speed
            ),
        )
        for p in parts
    )
    return settle(result)


class MessagesStreamMeter(SSEStreamMeter):
    usage_marker = b'"message_delta"'
    usage_path = ("usage",)

    def __init__(self) -> None:
        super().__init__()
        self._fields: dict[str, Any] = {}
        self._seen_start = False
        self._seen_delta = False
        self._error: UsageError | None = None

    def observe(self, event: SSEEvent) -> bytes | None:
        name = event.event
        if name not in ("message_start", "message_delta", "message_stop", "error"):
            return event.raw
        if name == "message_stop":
            self.finished = True
            return event.raw
        if name == "message_delta":
            self._seen_delta = True
        try:
            payload = require_dict(orjson.loads(event.data), f"{name} event")
            if name == "error":
                self.upstream_error = "stream_error"
                return event.raw
            if name == "message_start":
                message = require_dict(payload.get("message"), "message_start.message")
                usage = require_dict(message.get("usage"), "message_start usage")
                self._seen_start = True
            else:
                usage = require_dict(payload.get("usage"), "message_delta usage")
            for key, value in usage.items():
                if value is not None:
                    self._fields[key] = value
        except orjson.JSONDecodeError as exc:
            self._error = UsageError(f"malformed {name} event: {exc}")
        except UsageError as exc:
            self._error = exc
        return event.raw

    def usage(self) -> Usage:
        if self._error is not None:
            raise self._error
        if not self._seen_start:
            raise UsageMissing("the stream ended before message_start")
        usage = parse_anthropic_usage(self._fields)
        if not self._seen_delta:
            # Cut after message_start: the input is known, the output is not (a lower bound; see budgets.py).
            usage.flag(INCOMPLETE)
        return usage


class AnthropicApi(ApiAdapter):
    family = "anthropic"

    def request_facts(
        self, endpoint: Endpoint, body: dict[str, Any], path_model: str | None, upload_bytes: int = 0
    ) -> RequestFacts:
        return RequestFacts(
            model=read_model(body.get("model")),
            stream=read_flag(body, "stream"),
            max_output_tokens=read_count(body, "max_tokens", bound=MAX_OUTPUT_TOKENS) or None,
            end_user=metadata.get("user_id") if isinstance(metadata := body.get("metadata"), dict) else None,
        )

    def upstream_body(self, body: dict[str, Any], facts: RequestFacts, upstream_model: str | None) -> dict[str, Any]:
        return {**body, "model": upstream_model} if upstream_model is not None else body

    def usage_from_body(self, endpoint: Endpoint, body: Any, facts: RequestFacts | None = None) -> Usage:
        usage = require_dict(body, "response").get("usage")
        return parse_anthropic_usage(require_dict(usage, "usage"))

    def stream_meter(self, endpoint: Endpoint, facts: RequestFacts, sse: bool) -> StreamMeter:
        return MessagesStreamMeter()


class AnthropicUpstream(Upstream):
    family = "anthropic"

    def url(self, match: EndpointMatch, path: str, query: str, upstream_model: str) -> str:
        return join_url(self.config.base_url, path, query)

    def auth_headers(self) -> dict[str, str]:
        return {"x-api-key": self._secret} if self._secret else {}


def parse_anthropic_stream(events: Iterable[SSEEvent]) -> Usage:
    meter = MessagesStreamMeter()
    for event in events:
        meter.observe(event)
    return meter.usage()
