"""The Anthropic Messages API.

Usage rules: `input_tokens` is only the uncached remainder, so billed input is
`input_tokens + cache_creation_input_tokens + cache_read_input_tokens`. In a stream, `message_start` carries the
input and cache figures and `message_delta` carries cumulative figures (the final `output_tokens`, and in newer
API versions the input figures again): every field is overwritten by its latest value, never added.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from metergate.endpoints import Endpoint, EndpointMatch
from metergate.providers.base import (
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
from metergate.usage import Usage, UsageError, count, tier_of

DEFAULT_ANTHROPIC_VERSION = "2023-06-01"


def parse_anthropic_usage(usage: Mapping[str, Any]) -> Usage:
    fresh = count(usage.get("input_tokens"), "input_tokens")
    cache_write = count(usage.get("cache_creation_input_tokens"), "cache_creation_input_tokens")
    cache_read = count(usage.get("cache_read_input_tokens"), "cache_read_input_tokens")
    output = count(usage.get("output_tokens"), "output_tokens")
    breakdown = usage.get("cache_creation") or {}
    server_tools = usage.get("server_tool_use") or {}
    if not isinstance(breakdown, Mapping) or not isinstance(server_tools, Mapping):
        raise UsageError("usage.cache_creation or usage.server_tool_use is not an object")
    write_1h = count(breakdown.get("ephemeral_1h_input_tokens"), "cache_creation.ephemeral_1h_input_tokens")
    if write_1h > cache_write:
        raise UsageError(f"1h cache writes exceed cache_creation_input_tokens ({write_1h} > {cache_write})")
    return Usage(
        input_tokens=fresh + cache_write + cache_read,
        output_tokens=output,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        cache_write_1h_tokens=write_1h,
        web_searches=count(server_tools.get("web_search_requests"), "server_tool_use.web_search_requests"),
        service_tier=tier_of(usage.get("service_tier")),
    )


class MessagesStreamMeter(SSEStreamMeter):
    def __init__(self) -> None:
        super().__init__()
        self._fields: dict[str, Any] = {}
        self._seen_start = False
        self._error: UsageError | None = None

    def observe(self, event: SSEEvent) -> bytes | None:
        name = event.event
        if name not in ("message_start", "message_delta", "message_stop", "error"):
            return event.raw
        if name == "message_stop":
            self.finished = True
            return event.raw
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
            raise UsageError("the stream ended before message_start")
        return parse_anthropic_usage(self._fields)


class AnthropicApi(ApiAdapter):
    family = "anthropic"

    def request_facts(self, endpoint: Endpoint, body: dict[str, Any], path_model: str | None) -> RequestFacts:
        return RequestFacts(
            model=read_model(body.get("model")),
            stream=read_flag(body, "stream"),
            max_output_tokens=read_count(body, "max_tokens", bound=MAX_OUTPUT_TOKENS) or None,
        )

    def upstream_body(self, body: dict[str, Any], facts: RequestFacts, upstream_model: str | None) -> dict[str, Any]:
        return {**body, "model": upstream_model} if upstream_model is not None else body

    def usage_from_body(self, endpoint: Endpoint, body: Any) -> Usage:
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
