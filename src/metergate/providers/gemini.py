"""The Gemini API (generativelanguage.googleapis.com): generateContent, streamGenerateContent, embeddings.

Usage rules: `promptTokenCount` already includes `cachedContentTokenCount`; billed output is
`candidatesTokenCount + thoughtsTokenCount`; `toolUsePromptTokenCount` is billed as input. Streamed chunks
carry running totals, so the last `usageMetadata` seen is the usage, never a sum. `:streamGenerateContent`
without `alt=sse` answers one JSON array written incrementally. Embedding responses carry an
`EmbeddingUsageMetadata` (`promptTokenCount`, with `promptTokenDetails` per modality: singular "Token", unlike
generateContent); responses from before that field existed carry none, and then the gateway asks the free
`:countTokens` method for the same content instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from metergate.endpoints import Endpoint, EndpointMatch
from metergate.errors import bad_request, bounded
from metergate.providers.base import (
    MAX_CHOICES,
    MAX_OUTPUT_TOKENS,
    ApiAdapter,
    RequestFacts,
    SSEStreamMeter,
    StreamMeter,
    Upstream,
    field_error,
    join_url,
    read_count,
    require_dict,
)
from metergate.query import query_items, query_value
from metergate.sse import SSEEvent
from metergate.usage import Usage, UsageError, count, tier_of

_USAGE_KEY = b'"usageMetadata"'
# Streamed JSON arrays are kept whole to be parsed at the end; beyond this size only the tail is kept.
_ARRAY_TAIL_BYTES = 4 * 1024 * 1024


def parse_gemini_usage(meta: Mapping[str, Any]) -> Usage:
    prompt = count(meta.get("promptTokenCount"), "promptTokenCount")
    cached = count(meta.get("cachedContentTokenCount"), "cachedContentTokenCount")
    candidates = count(meta.get("candidatesTokenCount"), "candidatesTokenCount")
    thoughts = count(meta.get("thoughtsTokenCount"), "thoughtsTokenCount")
    tool_prompt = count(meta.get("toolUsePromptTokenCount"), "toolUsePromptTokenCount")
    if cached > prompt:
        raise UsageError(f"cachedContentTokenCount exceeds promptTokenCount ({cached} > {prompt})")
    audio_in = 0
    details = meta.get("promptTokensDetails") or []
    if not isinstance(details, list):
        raise UsageError("promptTokensDetails is not a list")
    for item in details:
        if isinstance(item, Mapping) and item.get("modality") == "AUDIO":
            audio_in += count(item.get("tokenCount"), "promptTokensDetails.tokenCount")
    return Usage(
        input_tokens=prompt + tool_prompt,
        output_tokens=candidates + thoughts,
        cache_read_tokens=cached,
        reasoning_tokens=thoughts,
        input_audio_tokens=min(audio_in, prompt),
        service_tier=tier_of(meta.get("serviceTier")),
    )


def parse_gemini_embedding_usage(meta: Mapping[str, Any]) -> Usage:
    """An embedding's `usageMetadata`: input only, and without `promptTokenCount` there is nothing to bill from."""
    if meta.get("promptTokenCount") is None:
        raise UsageError("the embedding usageMetadata has no promptTokenCount")
    prompt = count(meta.get("promptTokenCount"), "promptTokenCount")
    details = meta.get("promptTokenDetails") or []
    if not isinstance(details, list):
        raise UsageError("promptTokenDetails is not a list")
    audio_in = sum(
        count(item.get("tokenCount"), "promptTokenDetails.tokenCount")
        for item in details
        if isinstance(item, Mapping) and item.get("modality") == "AUDIO"
    )
    return Usage(input_tokens=prompt, input_audio_tokens=min(audio_in, prompt))


def _usage_metadata(obj: Any) -> Mapping[str, Any] | None:
    if isinstance(obj, Mapping):
        meta = obj.get("usageMetadata")
        if isinstance(meta, Mapping):
            return meta
    return None


class GeminiSSEMeter(SSEStreamMeter):
    """`:streamGenerateContent?alt=sse`: the last chunk carrying usageMetadata holds the totals."""

    def __init__(self) -> None:
        super().__init__()
        self._last_usage_data: bytes | None = None

    def observe(self, event: SSEEvent) -> bytes | None:
        data = event.data
        if _USAGE_KEY in data:
            self._last_usage_data = data
        if b'"finishReason"' in data:
            self.finished = True
        elif data.startswith(b'{"error"'):
            self.upstream_error = "stream_error"
        return event.raw

    def usage(self) -> Usage:
        if self._last_usage_data is None:
            raise UsageError("the stream carried no usageMetadata")
        try:
            meta = _usage_metadata(orjson.loads(self._last_usage_data))
        except orjson.JSONDecodeError as exc:
            raise UsageError(f"malformed chunk: {exc}") from exc
        if meta is None:
            raise UsageError("usageMetadata is not an object")
        return parse_gemini_usage(meta)


class GeminiArrayMeter(StreamMeter):
    """`:streamGenerateContent` without `alt=sse`: one JSON array, relayed as it arrives, parsed at the end."""

    def __init__(self) -> None:
        super().__init__()
        self._body = bytearray()

    def feed(self, chunk: bytes) -> bytes:
        if b'"finishReason"' in chunk:
            self.finished = True
        self._body += chunk
        if len(self._body) > 2 * _ARRAY_TAIL_BYTES:
            del self._body[:-_ARRAY_TAIL_BYTES]
        return chunk

    def usage(self) -> Usage:
        body = bytes(self._body)
        try:
            chunks = orjson.loads(body)
        except orjson.JSONDecodeError:
            # Cut short (or trimmed): the last complete usageMetadata object still tells what was billed so far.
            return parse_gemini_usage(_last_usage_in_text(body))
        if not isinstance(chunks, list):
            chunks = [chunks]
        meta = None
        for chunk in chunks:
            if isinstance(chunk, Mapping) and "error" in chunk:
                self.upstream_error = "stream_error"
            meta = _usage_metadata(chunk) or meta
            if isinstance(chunk, Mapping) and _has_finish_reason(chunk):
                self.finished = True
        if meta is None:
            raise UsageError("the stream carried no usageMetadata")
        return parse_gemini_usage(meta)


_ALLOWED_QUERY = frozenset({"alt", "key", "prettyPrint", "$.xgafv"})


def _proto_field(obj: Mapping[str, Any], camel: str, snake: str) -> Any:
    """A field that protobuf JSON accepts under two names; refused when given under both."""
    if camel in obj and snake in obj:
        raise bad_request(f"{camel} and {snake} are the same field; give it once", "invalid_field")
    return obj.get(camel, obj.get(snake))


def _check_batch_models(body: Mapping[str, Any], path_model: str) -> None:
    """Each request of a batchEmbedContents names its model; it must be the one in the path, which is the one
    routed and priced."""
    requests = body.get("requests")
    if not isinstance(requests, list):
        return
    for i, request in enumerate(requests):
        if isinstance(request, dict) and request.get("model") not in (None, f"models/{path_model}"):
            raise bad_request(
                f"requests[{i}].model: must be models/{path_model}, the model in the path", "invalid_field"
            )


def _has_finish_reason(chunk: Mapping[str, Any]) -> bool:
    candidates = chunk.get("candidates")
    return isinstance(candidates, list) and any(isinstance(c, Mapping) and c.get("finishReason") for c in candidates)


def _last_usage_in_text(body: bytes) -> Mapping[str, Any]:
    text = body.decode("utf-8", "replace")
    decoder = json.JSONDecoder()
    pos = text.rfind('"usageMetadata"')
    while pos != -1:
        start = text.find("{", pos)
        try:
            meta, _ = decoder.raw_decode(text, start)
        except (json.JSONDecodeError, ValueError):
            pos = text.rfind('"usageMetadata"', 0, pos)
            continue
        if isinstance(meta, Mapping):
            return meta
        pos = text.rfind('"usageMetadata"', 0, pos)
    raise UsageError("the stream carried no complete usageMetadata")


class GeminiApi(ApiAdapter):
    family = "gemini"

    def vet_request(self, endpoint: Endpoint, query: str, headers: Mapping[str, str]) -> None:
        # Google APIs honour system parameters that reshape the answer: `fields`/X-Goog-FieldMask can drop
        # usageMetadata, `alt=proto` or `callback` make it unreadable. Only parameters that leave it intact pass.
        if "x-goog-fieldmask" in headers:
            raise bad_request("The X-Goog-FieldMask header is not accepted by metergate.", "invalid_query")
        seen: set[str] = set()
        for name, item in query_items(query):
            if name not in _ALLOWED_QUERY:
                raise bad_request(
                    f"The query parameter {bounded(name, 40)!r} is not accepted by metergate on this route "
                    f"(accepted: {', '.join(sorted(_ALLOWED_QUERY))}).",
                    "invalid_query",
                )
            if name in seen and name != "key":
                raise bad_request(f"The query parameter {name!r} is repeated.", "invalid_query")
            seen.add(name)
            if name == "alt" and query_value(item) not in ("json", "sse"):
                raise bad_request("alt: expected json or sse", "invalid_query")

    def request_facts(self, endpoint: Endpoint, body: dict[str, Any], path_model: str | None) -> RequestFacts:
        assert path_model is not None  # Gemini routes always carry the model in the path
        # Protobuf's JSON mapping accepts each field in lowerCamelCase and in its proto name, and integers as
        # strings: the gateway reads what the API reads, and refuses a field given twice.
        config = _proto_field(body, "generationConfig", "generation_config")
        if config is None:
            config = {}
        elif not isinstance(config, dict):
            raise field_error("generationConfig", "an object")
        cap_name = "maxOutputTokens" if "maxOutputTokens" in config else "max_output_tokens"
        count_name = "candidateCount" if "candidateCount" in config else "candidate_count"
        _proto_field(config, "maxOutputTokens", "max_output_tokens")
        _proto_field(config, "candidateCount", "candidate_count")
        cap = read_count(config, cap_name, f"generationConfig.{cap_name}", strings=True, bound=MAX_OUTPUT_TOKENS)
        candidates = read_count(config, count_name, f"generationConfig.{count_name}", strings=True, bound=MAX_CHOICES)
        if endpoint.operation == "batch_embed":
            _check_batch_models(body, path_model)
        return RequestFacts(
            model=path_model,
            stream=endpoint.operation == "stream_generate",
            max_output_tokens=cap or None,
            choices=candidates or 1,
        )

    def upstream_body(self, body: dict[str, Any], facts: RequestFacts, upstream_model: str | None) -> dict[str, Any]:
        requests = body.get("requests")
        if upstream_model is None or not isinstance(requests, list):
            return body
        renamed = [{**r, "model": f"models/{upstream_model}"} if isinstance(r, dict) else r for r in requests]
        return {**body, "requests": renamed}

    def usage_from_body(self, endpoint: Endpoint, body: Any) -> Usage:
        if isinstance(body, list):  # a non-SSE streamGenerateContent answer read whole
            metas = [m for chunk in body if (m := _usage_metadata(chunk)) is not None]
            if not metas:
                raise UsageError("the response has no usageMetadata")
            return parse_gemini_usage(metas[-1])
        meta = _usage_metadata(require_dict(body, "response"))
        if meta is None:
            raise UsageError("the response has no usageMetadata")
        if endpoint.operation in ("embed", "batch_embed"):
            return parse_gemini_embedding_usage(meta)
        return parse_gemini_usage(meta)

    def stream_meter(self, endpoint: Endpoint, facts: RequestFacts, sse: bool) -> StreamMeter:
        return GeminiSSEMeter() if sse else GeminiArrayMeter()

    @staticmethod
    def token_count_body(endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any] | None:
        """The `:countTokens` body measuring an embedding request's input, for responses that report no usage."""
        if endpoint.operation == "embed":
            content = body.get("content")
            return {"contents": [content]} if isinstance(content, dict) else None
        if endpoint.operation == "batch_embed":
            requests = body.get("requests")
            if not isinstance(requests, list):
                return None
            contents = [r.get("content") for r in requests if isinstance(r, dict)]
            return {"contents": contents} if contents and all(isinstance(c, dict) for c in contents) else None
        return None

    @staticmethod
    def usage_from_token_count(body: Any) -> Usage:
        total = require_dict(body, "countTokens response").get("totalTokens")
        return Usage(input_tokens=count(total, "totalTokens"))


class GeminiUpstream(Upstream):
    family = "gemini"

    def url(self, match: EndpointMatch, path: str, query: str, upstream_model: str) -> str:
        if match.path_model is not None and upstream_model != match.path_model:
            path = path.replace(f"/models/{match.path_model}:", f"/models/{upstream_model}:", 1)
        # The provider key travels in a header, never in a URL (the client's `?key=` was removed before).
        return join_url(self.config.base_url, path, query)

    def count_tokens_url(self, upstream_model: str, version: str) -> str:
        return f"{self.config.base_url}/{version}/models/{upstream_model}:countTokens"

    def auth_headers(self) -> dict[str, str]:
        return {"x-goog-api-key": self._secret} if self._secret else {}


def parse_gemini_stream(events: Iterable[SSEEvent]) -> Usage:
    meter = GeminiSSEMeter()
    for event in events:
        meter.observe(event)
    return meter.usage()
