"""The OpenAI API: Chat Completions, legacy Completions, Responses and Embeddings.

Usage rules: `prompt_tokens` already includes `prompt_tokens_details.cached_tokens` and `completion_tokens`
already includes `completion_tokens_details.reasoning_tokens`; the details are subsets, never added on top.
Chat and legacy completion streams carry usage only when `stream_options.include_usage` is set, in one extra
chunk with `choices: []` and a non-null `usage` just before `data: [DONE]`. Responses streams carry it in the
terminal `response.completed` / `response.incomplete` / `response.failed` event.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
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
    usage_details,
)
from metergate.providers.openai_media import (
    FORM_FIELDS,
    FORM_OPS,
    MEDIA_OPS,
    media_request_facts,
    media_stream_meter,
    media_usage,
    parse_image_tokens,
)
from metergate.sse import SSEEvent
from metergate.usage import Usage, UsageError, UsageMissing, UsagePart, count, settle, tier_of, total_of

_USAGE_KEY = b'"usage"'
# The image model the Responses image_generation tool runs when the request does not name one.
DEFAULT_IMAGE_MODEL = "gpt-image-1"
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
    prompt_details = usage_details(usage, "prompt_tokens_details")
    completion_details = usage_details(usage, "completion_tokens_details")
    cached = count(prompt_details.get("cached_tokens"), "prompt_tokens_details.cached_tokens")
    if not cached and "prompt_cache_hit_tokens" in usage:
        # DeepSeek and some OpenAI-compatible servers report cache hits at the top level, also within prompt_tokens.
        cached = count(usage.get("prompt_cache_hit_tokens"), "prompt_cache_hit_tokens")
    reasoning = count(completion_details.get("reasoning_tokens"), "completion_tokens_details.reasoning_tokens")
    total = usage.get("total_tokens")
    if reasoning and total == prompt + completion + reasoning and total != prompt + completion:
        completion += reasoning  # reasoning reported beside completion_tokens, not within it
    return settle(
        Usage(
            input_tokens=prompt,
            output_tokens=completion,
            cache_read_tokens=cached,
            cache_write_tokens=count(
                prompt_details.get("cache_write_tokens"), "prompt_tokens_details.cache_write_tokens"
            ),
            reasoning_tokens=reasoning,
            input_audio_tokens=count(prompt_details.get("audio_tokens"), "prompt_tokens_details.audio_tokens"),
            input_image_tokens=count(prompt_details.get("image_tokens"), "prompt_tokens_details.image_tokens"),
            output_audio_tokens=count(completion_details.get("audio_tokens"), "completion_tokens_details.audio_tokens"),
            service_tier=tier_of(service_tier),
        )
    )


def parse_responses_usage(usage: Mapping[str, Any], service_tier: object = None, tool_usage: object = None) -> Usage:
    """A Responses API `usage` object (the response's own model), with the web searches `tool_usage` counts."""
    in_details = usage_details(usage, "input_tokens_details")
    out_details = usage_details(usage, "output_tokens_details")
    result = settle(
        Usage(
            input_tokens=count(usage.get("input_tokens"), "input_tokens"),
            output_tokens=count(usage.get("output_tokens"), "output_tokens"),
            cache_read_tokens=count(in_details.get("cached_tokens"), "input_tokens_details.cached_tokens"),
            cache_write_tokens=count(in_details.get("cache_write_tokens"), "input_tokens_details.cache_write_tokens"),
            reasoning_tokens=count(out_details.get("reasoning_tokens"), "output_tokens_details.reasoning_tokens"),
            service_tier=tier_of(service_tier),
        )
    )
    web = tool_usage.get("web_search") if isinstance(tool_usage, Mapping) else None
    if isinstance(web, Mapping):
        result.add_units("web_search", count(web.get("num_requests"), "tool_usage.web_search.num_requests"))
    return result


def parse_response(response: Mapping[str, Any], image_model: str = DEFAULT_IMAGE_MODEL) -> Usage:
    """A whole Responses API response object: its usage, and what its built-in tools billed.

    - web searches: `tool_usage.web_search.num_requests` where present; older responses carry no `tool_usage`, and
      then each `web_search_call` output item whose action is a search is one billed call (opening or searching a
      page is not billed);
    - file searches: one per `file_search_call` item; code interpreter: one session per distinct `container_id`;
    - image generation: `tool_usage.image_gen` holds the image model's tokens, billed at that model's rates (a
      separate part); without it, each `image_generation_call` is an image that cannot be priced from tokens.
    """
    tool_usage = response.get("tool_usage")
    main = parse_responses_usage(_usage_object(response), response.get("service_tier"), tool_usage)
    output = response.get("output")
    items = [i for i in output if isinstance(i, Mapping)] if isinstance(output, list) else []
    if not isinstance(tool_usage, Mapping) or not isinstance(tool_usage.get("web_search"), Mapping):
        main.add_units("web_search", sum(1 for i in items if _is_billed_search(i)))
    main.add_units("file_search", sum(1 for i in items if i.get("type") == "file_search_call"))
    containers = {i.get("container_id") for i in items if i.get("type") == "code_interpreter_call"}
    main.add_units("code_interpreter_session", len(containers))
    image_gen = tool_usage.get("image_gen") if isinstance(tool_usage, Mapping) else None
    if not isinstance(image_gen, Mapping):
        main.add_units("image_generation_call", sum(1 for i in items if i.get("type") == "image_generation_call"))
        return main
    image = parse_image_tokens(image_gen)
    if image.is_empty():
        return main
    image.service_tier = main.service_tier
    total = total_of([main, image])
    total.units, total.service_tier, total.flags = main.units, main.service_tier, main.flags + image.flags
    total.parts = (UsagePart("message", None, replace(main, units=None)), UsagePart("image_gen", image_model, image))
    return total


def _is_billed_search(item: Mapping[str, Any]) -> bool:
    if item.get("type") != "web_search_call" or item.get("status") == "failed":
        return False
    action = item.get("action")
    return not isinstance(action, Mapping) or action.get("type") in (None, "search")


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
    usage_marker = b'"usage"'
    usage_path = ("usage",)

    def __init__(self, hide_usage: bool) -> None:
        super().__init__()
        self._hide = hide_usage
        self._usage: Usage | None = None
        self._error: UsageError | None = None
        self._done = b""

    def include_cost(self, cost_of: Callable[[Usage], float | None]) -> None:
        # The cost is in the usage chunk: a caller who asked for it gets that chunk, as with include_usage.
        super().include_cost(cost_of)
        self._hide = False

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
            # OpenAI's usage chunk (no choices) follows the last content chunk: the stream's bill is complete.
            # Servers that put running usage in every chunk (vLLM continuous_usage_stats) finish at [DONE].
            self.finished = self.finished or chunk.get("choices") == []
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
        raise self._error or UsageMissing("the stream ended without a usage chunk")


class ResponsesStreamMeter(SSEStreamMeter):
    usage_marker = b'"usage"'
    usage_path = ("response", "usage")

    def __init__(self, image_model: str = DEFAULT_IMAGE_MODEL) -> None:
        super().__init__()
        self._image_model = image_model
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
            self._usage = parse_response(response, self._image_model)
        except orjson.JSONDecodeError as exc:
            self._error = UsageError(f"malformed terminal event: {exc}")
        except UsageError as exc:
            self._error = exc
        return event.raw

    def usage(self) -> Usage:
        if self._usage is not None:
            return self._usage
        raise self._error or UsageMissing("the stream ended without response.completed")


def openai_end_user(body: dict[str, Any]) -> object:
    """The end user an OpenAI request names: `user`, else its successor `safety_identifier`."""
    user = body.get("user")
    return user if user is not None else body.get("safety_identifier")


class OpenAIApi(ApiAdapter):
    family = "openai"

    def form_fields(self, endpoint: Endpoint) -> frozenset[str] | None:
        return FORM_FIELDS if endpoint.operation in FORM_OPS else None

    def request_facts(
        self, endpoint: Endpoint, body: dict[str, Any], path_model: str | None, upload_bytes: int = 0
    ) -> RequestFacts:
        if endpoint.operation in MEDIA_OPS:
            return media_request_facts(endpoint, body, path_model, upload_bytes)
        # Azure deployment paths name the deployment in the path and may leave `model` out of the body.
        model = path_model if path_model is not None else read_model(body.get("model"))
        stream = read_flag(body, "stream")
        if endpoint.operation == "responses" and read_flag(body, "background"):
            # A background response runs on after the call ends (for minutes, streamed or not) and is read back
            # later through routes that carry no usage: until the gateway meters that read-back, it would be
            # unmetered spend.
            raise bad_request(
                "background: background responses are not supported through metergate yet; "
                "send the request without background",
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
        image_model = None
        tools = body.get("tools")
        if endpoint.operation == "responses" and isinstance(tools, list):
            for tool in tools:
                if isinstance(tool, dict) and tool.get("type") == "image_generation" and tool.get("model") is not None:
                    image_model = read_model(tool.get("model"), "tools[].model")
        return RequestFacts(
            image_model=image_model,
            model=model,
            stream=stream,
            # The largest cap given is the worst case, whichever of them the provider applies.
            max_output_tokens=(max(caps) or None) if caps else None,
            inject_stream_usage=inject,
            choices=max(n, best_of),
            end_user=openai_end_user(body),
        )

    def upstream_body(self, body: dict[str, Any], facts: RequestFacts, upstream_model: str | None) -> dict[str, Any]:
        body = dict(body)
        if upstream_model is not None and "model" in body:
            body["model"] = upstream_model
        if facts.inject_stream_usage:
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return body

    def usage_from_body(self, endpoint: Endpoint, body: Any, facts: RequestFacts | None = None) -> Usage:
        obj = require_dict(body, "response")
        if endpoint.operation == "responses":
            return parse_response(obj, _image_model(facts))
        return parse_openai_usage(_usage_object(obj), obj.get("service_tier"))

    def usage_from_response(
        self, endpoint: Endpoint, data: bytes, content_type: str, facts: RequestFacts | None = None
    ) -> Usage:
        if endpoint.operation in MEDIA_OPS:
            return media_usage(endpoint, data, content_type, facts)
        return super().usage_from_response(endpoint, data, content_type, facts)

    def streams(self, endpoint: Endpoint, content_type: str) -> bool:
        # Speech audio is relayed as it is generated, never held: its bill is known from the request.
        return "text/event-stream" in content_type or (endpoint.operation == "speech" and "json" not in content_type)

    def stream_meter(self, endpoint: Endpoint, facts: RequestFacts, sse: bool) -> StreamMeter:
        if endpoint.operation in MEDIA_OPS:
            return media_stream_meter(endpoint, facts, sse)
        if endpoint.operation == "responses":
            return ResponsesStreamMeter(_image_model(facts))
        return ChatStreamMeter(hide_usage=facts.inject_stream_usage)


def _image_model(facts: RequestFacts | None) -> str:
    return facts.image_model if facts is not None and facts.image_model else DEFAULT_IMAGE_MODEL


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
