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
import re
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
from metergate.usage import Usage, UsageError, UsageMissing, count, settle, tier_of

_USAGE_KEY = b'"usageMetadata"'
# Streamed JSON arrays are kept whole to be parsed at the end; beyond this size only the tail is kept.
_ARRAY_TAIL_BYTES = 4 * 1024 * 1024


_MODALITIES = ("TEXT", "AUDIO", "IMAGE", "VIDEO", "DOCUMENT")


def _by_modality(meta: Mapping[str, Any], name: str) -> dict[str, int]:
    """A `*TokensDetails` list as token counts per modality (Google prices DOCUMENT pages as images)."""
    details = meta.get(name) or []
    if not isinstance(details, list):
        raise UsageError(f"{name} is not a list")
    counts = dict.fromkeys(_MODALITIES, 0)
    for item in details:
        if isinstance(item, Mapping):
            modality = item.get("modality")
            key = "IMAGE" if modality == "DOCUMENT" else modality if modality in counts else "TEXT"
            counts[key] += count(item.get("tokenCount"), f"{name}.tokenCount")
    return counts


def parse_gemini_usage(meta: Mapping[str, Any], model: str | None = None, queries: Iterable[object] = ()) -> Usage:
    """`usageMetadata` of generateContent, and the grounding searches of the response (`webSearchQueries`).

    Every modality list is a breakdown of its total: `promptTokensDetails` of `promptTokenCount` (cached tokens
    included), `cacheTokensDetails` of `cachedContentTokenCount`, `candidatesTokensDetails` of
    `candidatesTokenCount`. Uncached audio is prompt AUDIO minus cached AUDIO; what no list names is text. Tool
    results (`toolUsePromptTokenCount`, grounding, URL context, code execution) are input.
    """
    prompt = count(meta.get("promptTokenCount"), "promptTokenCount")
    cached = count(meta.get("cachedContentTokenCount"), "cachedContentTokenCount")
    candidates = count(meta.get("candidatesTokenCount"), "candidatesTokenCount")
    thoughts = count(meta.get("thoughtsTokenCount"), "thoughtsTokenCount")
    tool_prompt = count(meta.get("toolUsePromptTokenCount"), "toolUsePromptTokenCount")
    prompt_m = _by_modality(meta, "promptTokensDetails")
    tool_m = _by_modality(meta, "toolUsePromptTokensDetails")
    cache_m = _by_modality(meta, "cacheTokensDetails")
    out_m = _by_modality(meta, "candidatesTokensDetails")
    # Some responses leave candidatesTokenCount out while listing the candidates' modalities.
    candidates = max(candidates, sum(out_m.values()))
    tier = meta.get("serviceTier")
    usage = Usage(
        input_tokens=prompt + tool_prompt,
        output_tokens=candidates + thoughts,
        cache_read_tokens=cached,
        reasoning_tokens=thoughts,
        input_audio_tokens=prompt_m["AUDIO"] + tool_m["AUDIO"],
        cache_audio_read_tokens=cache_m["AUDIO"],
        input_image_tokens=prompt_m["IMAGE"] + tool_m["IMAGE"],
        cache_image_read_tokens=cache_m["IMAGE"],
        output_audio_tokens=out_m["AUDIO"],
        output_image_tokens=out_m["IMAGE"],
        service_tier=tier_of(tier),
    )
    usage.add_units("web_search", grounding_units(model, queries))
    return settle(usage)


def grounding_units(model: str | None, queries: Iterable[object]) -> int:
    """Billed Grounding with Google Search units: Gemini 3 and later bill each unique non-empty query; earlier
    models bill one grounded prompt per request that searched (ai.google.dev/gemini-api/docs/pricing)."""
    unique = {q for q in queries if isinstance(q, str) and q.strip()}
    if not unique:
        return 0
    per_query = model is not None and re.match(r"^(models/)?gemini-([3-9]|\d\d)", model) is not None
    return len(unique) if per_query else 1


def search_queries(chunk: Any) -> list[object]:
    """The `webSearchQueries` of every candidate's grounding metadata in a response or stream chunk."""
    found: list[object] = []
    candidates = chunk.get("candidates") if isinstance(chunk, Mapping) else None
    if isinstance(candidates, list):
        for candidate in candidates:
            grounding = candidate.get("groundingMetadata") if isinstance(candidate, Mapping) else None
            queries = grounding.get("webSearchQueries") if isinstance(grounding, Mapping) else None
            if isinstance(queries, list):
                found.extend(queries[:1000])
    return found


def _model_version(chunk: Any) -> str | None:
    version = chunk.get("modelVersion") if isinstance(chunk, Mapping) else None
    return version if isinstance(version, str) and len(version) <= 256 else None


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
    """`:streamGenerateContent?alt=sse`: each chunk's usageMetadata is a running snapshot, so every field takes its
    latest value (never a sum); a field a later chunk leaves out keeps its last value (Vertex chunks may carry only
    `trafficType`). Grounding queries are collected from every chunk."""

    usage_marker = b"usageMetadata"
    usage_path = ("usageMetadata",)

    def __init__(self, model: str | None = None) -> None:
        super().__init__()
        self._meta: dict[str, Any] = {}
        self._seen_usage = False
        self._queries: list[object] = []
        self._model = model
        self._error: UsageError | None = None

    def observe(self, event: SSEEvent) -> bytes | None:
        data = event.data
        if _USAGE_KEY in data or b'"webSearchQueries"' in data:
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                self._error = UsageError(f"malformed chunk: {exc}")
            else:
                meta = _usage_metadata(chunk)
                if meta is not None:
                    self._seen_usage = True
                    self._meta.update((k, v) for k, v in meta.items() if v is not None)
                if len(self._queries) < 10_000:
                    self._queries.extend(search_queries(chunk))
                self._model = _model_version(chunk) or self._model
        if b'"finishReason"' in data:
            self.finished = True
        elif data.startswith(b'{"error"'):
            self.upstream_error = "stream_error"
        return event.raw

    def usage(self) -> Usage:
        if not self._seen_usage:
            raise self._error or UsageMissing("the stream carried no usageMetadata")
        if self._error is not None and not self.finished:
            raise self._error
        return parse_gemini_usage(self._meta, self._model, self._queries)


class GeminiArrayMeter(StreamMeter):
    """`:streamGenerateContent` without `alt=sse`: one JSON array, relayed as it arrives, parsed at the end."""

    def __init__(self, model: str | None = None) -> None:
        super().__init__()
        self._body = bytearray()
        self._model = model

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
            return parse_gemini_usage(_last_usage_in_text(body), self._model)
        if not isinstance(chunks, list):
            chunks = [chunks]
        for chunk in chunks:
            if isinstance(chunk, Mapping) and "error" in chunk:
                self.upstream_error = "stream_error"
            if isinstance(chunk, Mapping) and _has_finish_reason(chunk):
                self.finished = True
        return usage_of_chunks(chunks, self._model)


def usage_of_chunks(chunks: list[Any], model: str | None = None) -> Usage:
    """The usage of a streamed answer's chunks: every usageMetadata field at its latest value."""
    meta: dict[str, Any] = {}
    queries: list[object] = []
    seen = False
    for chunk in chunks:
        found = _usage_metadata(chunk)
        if found is not None:
            seen = True
            meta.update((k, v) for k, v in found.items() if v is not None)
        queries.extend(search_queries(chunk))
        model = _model_version(chunk) or model
    if not seen:
        raise UsageMissing("the stream carried no usageMetadata")
    return parse_gemini_usage(meta, model, queries)


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

    def vet_forwarded(self, endpoint: Endpoint, query: str, headers: Mapping[str, str]) -> None:
        # A forwarded response the gateway reads (a batch and its results) must come whole and as JSON: the same
        # system parameters that could hide usageMetadata could hide a batch's results.
        if "x-goog-fieldmask" in headers:
            raise bad_request(
                "The X-Goog-FieldMask header is not accepted by metergate on this route.", "invalid_query"
            )
        for name, item in query_items(query):
            bare = name.removeprefix("$")
            if bare in ("fields", "callback"):
                raise bad_request(
                    f"The query parameter {name!r} is not accepted by metergate on this route.", "invalid_query"
                )
            if bare == "alt" and query_value(item) not in ("json", "media", "sse"):
                raise bad_request("alt: expected json or media on this route", "invalid_query")

    def request_facts(
        self, endpoint: Endpoint, body: dict[str, Any], path_model: str | None, upload_bytes: int = 0
    ) -> RequestFacts:
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
        if endpoint.operation == "predict":
            # Imagen: `parameters.sampleCount` images (default 4 on the API; the reservation's worst case).
            params = body.get("parameters")
            params = params if isinstance(params, dict) else {}
            samples = read_count(params, "sampleCount", "parameters.sampleCount", strings=True, bound=MAX_CHOICES)
            return RequestFacts(model=path_model, stream=False, max_output_tokens=None, choices=samples or 4)
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

    def usage_from_body(self, endpoint: Endpoint, body: Any, facts: RequestFacts | None = None) -> Usage:
        model = facts.model if facts is not None else None
        if endpoint.operation == "predict":
            return imagen_usage(require_dict(body, "response"))
        if isinstance(body, list):  # a non-SSE streamGenerateContent answer read whole
            return usage_of_chunks(body, model)
        meta = _usage_metadata(require_dict(body, "response"))
        if meta is None:
            raise UsageError("the response has no usageMetadata")
        if endpoint.operation in ("embed", "batch_embed"):
            return parse_gemini_embedding_usage(meta)
        return parse_gemini_usage(meta, _model_version(body) or model, search_queries(body))

    def streams(self, endpoint: Endpoint, content_type: str) -> bool:
        return endpoint.operation == "stream_generate" or "text/event-stream" in content_type

    def stream_meter(self, endpoint: Endpoint, facts: RequestFacts, sse: bool) -> StreamMeter:
        return GeminiSSEMeter(facts.model) if sse else GeminiArrayMeter(facts.model)

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


def imagen_usage(body: Mapping[str, Any]) -> Usage:
    """Imagen `:predict` reports no usage: it bills each image it returns (filtered images carry no bytes)."""
    predictions = body.get("predictions")
    if predictions is None:
        predictions = []
    if not isinstance(predictions, list):
        raise UsageError("predictions is not a list")
    images = sum(1 for p in predictions if isinstance(p, Mapping) and p.get("bytesBase64Encoded"))
    usage = Usage()
    usage.add_units("image", images)
    return usage


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


def parse_gemini_stream(events: Iterable[SSEEvent], model: str | None = None) -> Usage:
    meter = GeminiSSEMeter(model)
    for event in events:
        meter.observe(event)
    return meter.usage()
