"""The OpenAI API: Chat Completions, legacy Completions, Responses and Embeddings.

Usage rules: `prompt_tokens` already includes `prompt_tokens_details.cached_tokens` and `completion_tokens`
already includes `completion_tokens_details.reasoning_tokens`; the details are subsets, never added on top.
Chat and legacy completion streams carry usage only when `stream_options.include_usage` is set, in one extra
chunk with `choices: []` and a non-null `usage` just before `data: [DONE]`. Responses streams carry it in the
terminal `response.completed` / `response.incomplete` / `response.failed` event.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from metergate.endpoints import Endpoint, EndpointMatch
from metergate.errors import bad_request
from metergate.providers.base import (
    MAX_CHOICES,
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
    read_object,
    require_dict,
)
from metergate.sse import SSEEvent
from metergate.usage import Usage, UsageError, count, tier_of

_USAGE_KEY = b'"usage"'
_USAGE_NULL_FORMS = (b',"usage":null', b'"usage":null,')
# The `"usage": null` member OpenAI adds to every chunk once usage is requested, however it is spaced (Python's
# json.dumps and several OpenAI-compatible servers write `"usage": null`). The pattern starts with a literal, so
# the search is a fast substring scan.
_USAGE_NULL = re.compile(rb'"usage"\s*:\s*null(?=\s*[,}])')
_RESPONSES_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_RESPONSES_TERMINAL_BYTES = tuple(f'"{t}"'.encode() for t in _RESPONSES_TERMINAL)


def parse_openai_usage(usage: Mapping[str, Any], service_tier: object = None) -> Usage:
    """Chat Completions, Completions and Embeddings `usage` objects.

    Some OpenAI-compatible servers (xAI) count reasoning outside `completion_tokens`; `total_tokens` tells which
    convention a response uses, and billed output includes the reasoning either way.
    """
    prompt = count(usage.get("prompt_tokens"), "prompt_tokens")
    completion = count(usage.get("completion_tokens"), "completion_tokens")
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    if not isinstance(prompt_details, Mapping) or not isinstance(completion_details, Mapping):
        raise UsageError("usage details are not objects")
    cached = count(prompt_details.get("cached_tokens"), "prompt_tokens_details.cached_tokens")
    if not cached and "prompt_cache_hit_tokens" in usage:
        # DeepSeek and some OpenAI-compatible servers report cache hits at the top level, also within prompt_tokens.
        cached = count(usage.get("prompt_cache_hit_tokens"), "prompt_cache_hit_tokens")
    cache_write = count(prompt_details.get("cache_write_tokens"), "prompt_tokens_details.cache_write_tokens")
    reasoning = count(completion_details.get("reasoning_tokens"), "completion_tokens_details.reasoning_tokens")
    audio_in = count(prompt_details.get("audio_tokens"), "prompt_tokens_details.audio_tokens")
    audio_out = count(completion_details.get("audio_tokens"), "completion_tokens_details.audio_tokens")
    total = usage.get("total_tokens")
    if reasoning and total == prompt + completion + reasoning and total != prompt + completion:
        completion += reasoning  # reasoning reported beside completion_tokens, not within it
    if cached + cache_write > prompt or audio_in > prompt:
        raise UsageError(f"cached, cache-write or audio tokens exceed prompt_tokens ({cached}/{audio_in} > {prompt})")
    if reasoning + audio_out > completion:
        raise UsageError(f"reasoning/audio tokens exceed completion_tokens ({reasoning}+{audio_out} > {completion})")
    return Usage(
        input_tokens=prompt,
        output_tokens=completion,
        cache_read_tokens=cached,
        cache_write_tokens=cache_write,
        reasoning_tokens=reasoning,
        input_audio_tokens=audio_in,
        output_audio_tokens=audio_out,
        service_tier=tier_of(service_tier),
    )


def parse_responses_usage(usage: Mapping[str, Any], service_tier: object = None, tool_usage: object = None) -> Usage:
    """Responses API `usage` objects; web searches are counted in the response's `tool_usage`."""
    inp = count(usage.get("input_tokens"), "input_tokens")
    out = count(usage.get("output_tokens"), "output_tokens")
    in_details = usage.get("input_tokens_details") or {}
    out_details = usage.get("output_tokens_details") or {}
    if not isinstance(in_details, Mapping) or not isinstance(out_details, Mapping):
        raise UsageError("usage details are not objects")
    cached = count(in_details.get("cached_tokens"), "input_tokens_details.cached_tokens")
    cache_write = count(in_details.get("cache_write_tokens"), "input_tokens_details.cache_write_tokens")
    reasoning = count(out_details.get("reasoning_tokens"), "output_tokens_details.reasoning_tokens")
    if cached + cache_write > inp:
        raise UsageError(f"cached and cache-write tokens exceed input_tokens ({cached}+{cache_write} > {inp})")
    if reasoning > out:
        raise UsageError(f"reasoning tokens exceed output_tokens ({reasoning} > {out})")
    searches = 0
    if isinstance(tool_usage, Mapping):
        web = tool_usage.get("web_search")
        if isinstance(web, Mapping):
            searches = count(web.get("num_requests"), "tool_usage.web_search.num_requests")
    return Usage(
        input_tokens=inp,
        output_tokens=out,
        cache_read_tokens=cached,
        cache_write_tokens=cache_write,
        reasoning_tokens=reasoning,
        web_searches=searches,
        service_tier=tier_of(service_tier),
    )


def _without_usage_null(raw: bytes) -> bytes | None:
    """`raw` without its `"usage": null` member and the comma joining it to a neighbour; None if it has none."""
    found = _USAGE_NULL.search(raw)
    if found is None:
        return None
    start, end = found.span()
    before = raw[:start].rstrip()
    if before.endswith(b","):  # `..., "usage": null}`
        return before[:-1] + raw[end:]
    after = raw[end:].lstrip()
    if after.startswith(b","):  # `{"usage": null, ...`
        return raw[:start] + after[1:].lstrip()
    return None


def _usage_object(container: Mapping[str, Any]) -> Mapping[str, Any]:
    usage = container.get("usage")
    if not isinstance(usage, Mapping):
        raise UsageError("the response has no usage object")
    return usage


class ChatStreamMeter(SSEStreamMeter):
    """Chat Completions and legacy Completions streams.

    When the gateway added `include_usage` on the client's behalf, it hides what the client did not ask for:
    the usage chunk itself, and the `"usage":null` member OpenAI then adds to every other chunk. A chunk with
    `choices: []` but no usage (Azure's content-filter chunks) is relayed untouched.

    `data: [DONE]` is held back until the upstream ends, so that an error the gateway must report (unreadable
    usage) reaches the client before it; SDKs stop reading at `[DONE]`.
    """

    rewrites = True

    def __init__(self, hide_usage: bool) -> None:
        super().__init__()
        self._hide = hide_usage
        self._usage: Usage | None = None
        self._error: UsageError | None = None
        self._done = b""

    def observe(self, event: SSEEvent) -> bytes | None:
        data = event.data
        if _USAGE_KEY not in data:
            if data.startswith(b"[DONE]"):
                self.finished = True
                self._done = event.raw
                return None
            if data.startswith(b'{"error"'):
                self.upstream_error = "stream_error"
            return event.raw
        if self._hide:
            for form in _USAGE_NULL_FORMS:  # OpenAI's compact JSON: a plain replace, no regex on the hot path
                if form in data:
                    return event.raw.replace(form, b"", 1)
            stripped = _without_usage_null(event.raw)
            if stripped is not None:
                return stripped
        try:
            chunk = require_dict(orjson.loads(data), "stream chunk")
        except (orjson.JSONDecodeError, UsageError) as exc:
            self._error = UsageError(f"malformed usage chunk: {exc}")
            # A garbled chunk the client never asked for is not passed on to break its SDK.
            return None if self._hide else event.raw
        usage = chunk.get("usage")
        if usage is None:
            return event.raw
        hidden = self._hide and chunk.get("choices") == []
        try:
            self._usage = parse_openai_usage(require_dict(usage, "usage"), chunk.get("service_tier"))
        except UsageError as exc:
            self._error = exc
        return None if hidden else event.raw

    def flush(self) -> bytes:
        tail = self._buffer.pending()
        if not self._done and tail.strip() == b"data: [DONE]":
            self.finished = True
            return tail
        return self._done

    def usage(self) -> Usage:
        if self._usage is not None:
            return self._usage
        raise self._error or UsageError("the stream ended without a usage chunk")


class ResponsesStreamMeter(SSEStreamMeter):
    def __init__(self) -> None:
        super().__init__()
        self._usage: Usage | None = None
        self._error: UsageError | None = None

    def observe(self, event: SSEEvent) -> bytes | None:
        if event.event == "error":
            self.upstream_error = "stream_error"
            return event.raw
        if event.event is not None and event.event not in _RESPONSES_TERMINAL:
            return event.raw
        if event.event is None and not any(t in event.data for t in _RESPONSES_TERMINAL_BYTES):
            return event.raw
        try:
            payload = require_dict(orjson.loads(event.data), "event")
            if payload.get("type") not in _RESPONSES_TERMINAL:
                return event.raw
            self.finished = True
            if payload["type"] == "response.failed":
                self.upstream_error = "response_failed"
            response = require_dict(payload.get("response"), "event response")
            self._usage = parse_responses_usage(
                _usage_object(response), response.get("service_tier"), response.get("tool_usage")
            )
        except orjson.JSONDecodeError as exc:
            self._error = UsageError(f"malformed terminal event: {exc}")
        except UsageError as exc:
            self._error = exc
        return event.raw

    def usage(self) -> Usage:
        if self._usage is not None:
            return self._usage
        raise self._error or UsageError("the stream ended without response.completed")


class OpenAIApi(ApiAdapter):
    family = "openai"

    def request_facts(self, endpoint: Endpoint, body: dict[str, Any], path_model: str | None) -> RequestFacts:
        # Azure deployment paths name the deployment in the path and may leave `model` out of the body.
        model = path_model if path_model is not None else read_model(body.get("model"))
        stream = read_flag(body, "stream")
        if endpoint.operation == "responses" and read_flag(body, "background") and not stream:
            # A background response answers before it runs, without usage, and is read back later: until the
            # gateway meters that read-back, it would be unmetered spend.
            raise bad_request(
                "background: background responses are not supported through metergate yet; "
                "stream the response instead (stream: true, background: true is accepted)",
                "unsupported_feature",
            )
        caps = [
            cap
            for name in ("max_completion_tokens", "max_output_tokens", "max_tokens")
            if (cap := read_count(body, name, bound=MAX_OUTPUT_TOKENS)) is not None
        ]
        inject = False
        if stream and endpoint.operation in ("chat", "completions"):
            options = read_object(body, "stream_options")
            inject = not read_flag(options, "include_usage", "stream_options.include_usage")
        n = read_count(body, "n", bound=MAX_CHOICES) or 1
        best_of = read_count(body, "best_of", bound=MAX_CHOICES) or 1
        return RequestFacts(
            model=model,
            stream=stream,
            # The largest cap given is the worst case, whichever of them the provider applies.
            max_output_tokens=(max(caps) or None) if caps else None,
            inject_stream_usage=inject,
            choices=max(n, best_of),
        )

    def upstream_body(self, body: dict[str, Any], facts: RequestFacts, upstream_model: str | None) -> dict[str, Any]:
        body = dict(body)
        if upstream_model is not None and "model" in body:
            body["model"] = upstream_model
        if facts.inject_stream_usage:
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return body

    def usage_from_body(self, endpoint: Endpoint, body: Any) -> Usage:
        obj = require_dict(body, "response")
        if endpoint.operation == "responses":
            return parse_responses_usage(_usage_object(obj), obj.get("service_tier"), obj.get("tool_usage"))
        return parse_openai_usage(_usage_object(obj), obj.get("service_tier"))

    def stream_meter(self, endpoint: Endpoint, facts: RequestFacts, sse: bool) -> StreamMeter:
        if endpoint.operation == "responses":
            return ResponsesStreamMeter()
        return ChatStreamMeter(hide_usage=facts.inject_stream_usage)


class OpenAIUpstream(Upstream):
    """`openai` and `openai-compatible` providers: the client's path appended to `base_url`, Bearer auth."""

    family = "openai"

    def url(self, match: EndpointMatch, path: str, query: str, upstream_model: str) -> str:
        if path.startswith("/openai/v1/"):
            path = path.removeprefix("/openai")
        return join_url(self.config.base_url, path, query)

    def auth_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._secret}"} if self._secret else {}


def parse_chat_stream(events: Iterable[SSEEvent], hide_usage: bool = False) -> Usage:
    """The usage a whole chat/completions stream reported (for tests and tools; the gateway meters incrementally)."""
    meter = ChatStreamMeter(hide_usage)
    for event in events:
        meter.observe(event)
    return meter.usage()


def parse_responses_stream(events: Iterable[SSEEvent]) -> Usage:
    meter = ResponsesStreamMeter()
    for event in events:
        meter.observe(event)
    return meter.usage()
