"""OpenAI's image and audio endpoints: images (generations, edits, variations), transcriptions, translations, speech.

How each is billed, and where the figures are (research notes kept with issue 10, recorded responses in
tests/corpus/openai):
- GPT image models report token usage (`input_tokens_details` text/image split; `output_tokens_details` only in
  newer responses: without it every output token is an image token). DALL-E models report nothing and are billed
  per image by model, size and quality: the unit `image/<size>/<quality>`, counted from the images returned.
- whisper-1 reports `usage: {type: "duration", seconds}` in JSON formats: billed per second. The gpt-4o transcribe
  models report `usage: {type: "tokens", input_token_details: {text_tokens, audio_tokens}}` (note: `token`, not
  `tokens`). Plain-text formats (text, srt, vtt) and translations report nothing.
- tts-1 and tts-1-hd bill each character of `input`, known from the request; gpt-4o-mini-tts bills tokens, reported
  only in its SSE form (`speech.audio.done`). Streamed images report usage in `image_*.completed`, streamed
  transcriptions in `transcript.text.done`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from metergate.endpoints import Endpoint
from metergate.errors import bad_request
from metergate.providers.base import (
    MAX_CHOICES,
    RequestFacts,
    SSEStreamMeter,
    StreamMeter,
    read_model,
    usage_details,
)
from metergate.sse import SSEEvent
from metergate.usage import Usage, UsageError, UsageMissing, UsageNotReported, count, settle, total_of

IMAGE_OPS = frozenset({"images", "image_edit", "image_variation"})
AUDIO_OPS = frozenset({"transcription", "translation", "speech"})
MEDIA_OPS = IMAGE_OPS | AUDIO_OPS
# Routes whose requests are multipart/form-data (they upload a file).
FORM_OPS = frozenset({"image_edit", "image_variation", "transcription", "translation"})
# The form fields the gateway reads from multipart requests (image edits and variations, transcriptions).
FORM_FIELDS = frozenset({"model", "n", "size", "quality", "response_format", "stream"})
# DALL-E models bill per image; the GPT image models bill tokens.
PER_IMAGE_MODELS = ("dall-e-2", "dall-e-3")
# Characters-billed speech models.
PER_CHARACTER_MODELS = ("tts-1", "tts-1-hd")
_MAX_INPUT_CHARS = 1_000_000
_STREAM_USAGE_EVENTS = frozenset(
    {"image_generation.completed", "image_edit.completed", "transcript.text.done", "speech.audio.done"}
)


def media_request_facts(
    endpoint: Endpoint, body: Mapping[str, Any], path_model: str | None, upload_bytes: int = 0
) -> RequestFacts:
    """Facts of a media request; `body` is the JSON body or the multipart form's text fields (strings)."""
    op = endpoint.operation
    # An image request must name its model: the API's default depends on which other parameters are sent (DALL-E
    # 2, or a GPT image model when a parameter only they take is present), and guessing wrong prices a $0.25
    # image at nothing.
    model = path_model if path_model is not None else read_model(body.get("model"))
    stream = _flag(body.get("stream"), "stream")
    facts = RequestFacts(model=model, stream=stream, max_output_tokens=None, end_user=body.get("user"))
    if op in IMAGE_OPS:
        facts.choices = _int(body.get("n"), "n", MAX_CHOICES) or 1
        size = body.get("size")
        quality = body.get("quality")
        facts.image_size = str(size) if isinstance(size, str) and size != "auto" else None
        facts.image_quality = str(quality) if isinstance(quality, str) and quality != "auto" else None
        if model.startswith(PER_IMAGE_MODELS):
            facts.request_units = {image_unit(model, facts): facts.choices}  # the worst case: every image asked for
    if op in ("transcription", "translation"):
        fmt = body.get("response_format")
        facts.response_format = fmt if isinstance(fmt, str) else "json"
        if model.startswith("whisper"):
            # Billed by the second; the worst case: audio no denser than 8 kbit/s (1,000 bytes a second).
            facts.request_units = {"audio_second": max(1, upload_bytes // 1000)}
            if op == "translation" or facts.response_format in ("text", "srt", "vtt"):
                facts.unmetered = f"whisper {op}s in {facts.response_format} report no usage"
    if op == "speech":
        text = body.get("input")
        if not isinstance(text, str):
            raise bad_request("input: expected a string", "invalid_field")
        if model.startswith(PER_CHARACTER_MODELS):
            # Billed per character of the input (code points): known before the provider answers.
            facts.request_units = {"character": min(len(text), _MAX_INPUT_CHARS)}
        fmt = body.get("stream_format")
        facts.stream = fmt == "sse"
        if not facts.request_units and not facts.stream:
            facts.unmetered = f"{model} reports its usage only with stream_format: sse"
    return facts


def media_usage(endpoint: Endpoint, data: bytes, content_type: str, facts: RequestFacts | None) -> Usage:
    """Usage of a complete media response (JSON, text or audio)."""
    op = endpoint.operation
    if op == "speech":
        return _request_units(facts, "speech")
    if "json" not in content_type:
        raise UsageNotReported(f"a {content_type or 'non-JSON'} response carries no usage")
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"the response is not JSON: {exc}") from None
    if not isinstance(body, Mapping):
        raise UsageError("the response is not a JSON object")
    if op in IMAGE_OPS:
        return image_usage(body, facts)
    return transcription_usage(body)


def image_usage(body: Mapping[str, Any], facts: RequestFacts | None) -> Usage:
    """An images response: token usage (GPT image models), else one `image/<size>/<quality>` unit per image."""
    usage = body.get("usage")
    if isinstance(usage, Mapping):
        return parse_image_tokens(usage)
    data = body.get("data")
    images = sum(1 for item in data if isinstance(item, Mapping)) if isinstance(data, list) else 0
    model = facts.model if facts is not None else ""
    if not model.startswith(PER_IMAGE_MODELS):
        raise UsageMissing("the images response has no usage")
    result = Usage()
    result.add_units(image_unit(model, facts), images)
    return result


def image_unit(model: str, facts: RequestFacts | None) -> str:
    """The per-image unit of a DALL-E request: `image/<size>/<quality>`, with the API's defaults filled in."""
    size = (facts.image_size if facts else None) or "1024x1024"
    quality = (facts.image_quality if facts else None) or "standard"
    if model.startswith("dall-e-2"):
        quality = "standard"  # DALL-E 2 has one quality
    return f"image/{size}/{quality}"


def parse_image_tokens(usage: Mapping[str, Any]) -> Usage:
    in_details = usage_details(usage, "input_tokens_details")
    out_details = usage.get("output_tokens_details")
    output = count(usage.get("output_tokens"), "output_tokens")
    if isinstance(out_details, Mapping):
        output_image = count(out_details.get("image_tokens"), "output_tokens_details.image_tokens")
    else:
        output_image = output  # older responses and streamed events: every output token is an image token
    return settle(
        Usage(
            input_tokens=count(usage.get("input_tokens"), "input_tokens"),
            output_tokens=output,
            input_image_tokens=count(in_details.get("image_tokens"), "input_tokens_details.image_tokens"),
            output_image_tokens=output_image,
        )
    )


def transcription_usage(body: Mapping[str, Any]) -> Usage:
    usage = body.get("usage")
    if usage is None:
        raise UsageNotReported("the transcription carries no usage")
    if not isinstance(usage, Mapping):
        raise UsageError("usage is not an object")
    return parse_audio_usage(usage)


def parse_audio_usage(usage: Mapping[str, Any]) -> Usage:
    """`{type: duration, seconds}` (whisper) or `{type: tokens, input_token_details...}` (gpt-4o transcribe),
    and the plain `{input_tokens, output_tokens}` of speech streams."""
    if usage.get("type") == "duration":
        seconds = usage.get("seconds")
        if isinstance(seconds, float):
            seconds = round(seconds)  # whole seconds, as the API reports them
        result = Usage()
        result.add_units("audio_second", count(seconds, "usage.seconds"))
        return result
    details = usage_details(usage, "input_token_details")
    audio = count(details.get("audio_tokens"), "input_token_details.audio_tokens")
    return settle(
        Usage(
            input_tokens=count(usage.get("input_tokens"), "input_tokens"),
            output_tokens=count(usage.get("output_tokens"), "output_tokens"),
            input_audio_tokens=audio,
        )
    )


def _request_units(facts: RequestFacts | None, what: str) -> Usage:
    if facts is None or not facts.request_units:
        raise UsageNotReported(f"the {what} response carries no usage (ask for stream_format: sse to meter it)")
    result = Usage()
    for unit, n in facts.request_units.items():
        result.add_units(unit, n)
    return result


class MediaStreamMeter(SSEStreamMeter):
    """SSE streams of images, transcriptions and speech: usage in each `*.completed` / `*.done` event (one per
    image when several are asked for), summed."""

    def __init__(self, images: int = 1) -> None:
        super().__init__()
        self._usages: list[Usage] = []
        self._error: UsageError | None = None
        self._images_due = images  # image streams end after one `completed` event per image asked for

    def observe(self, event: SSEEvent) -> bytes | None:
        data = event.data
        if data == b"[DONE]":
            self.finished = True
            return event.raw
        if b'"usage"' not in data and b'"error"' not in data:
            return event.raw
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            self._error = UsageError(f"malformed event: {exc}")
            return event.raw
        if not isinstance(obj, Mapping):
            return event.raw
        kind = obj.get("type")
        if kind == "error" or ("error" in obj and kind is None):
            self.upstream_error = "error"
        if kind in _STREAM_USAGE_EVENTS and isinstance(obj.get("usage"), Mapping):
            try:
                usage = obj["usage"]
                parsed = parse_image_tokens(usage) if str(kind).startswith("image") else parse_audio_usage(usage)
                self._usages.append(parsed)
            except UsageError as exc:
                self._error = exc
            if str(kind).startswith("image"):
                self._images_due -= 1
                self.finished = self._images_due <= 0
            else:
                self.finished = True
        return event.raw

    def usage(self) -> Usage:
        if self._error is not None:
            raise self._error
        if not self._usages:
            raise UsageMissing("the stream ended without a usage event")
        return total_of(self._usages)


class RequestUnitsMeter(StreamMeter):
    """A streamed binary response (speech audio) billed by what the request asked for: relayed untouched."""

    def __init__(self, facts: RequestFacts) -> None:
        super().__init__()
        self._facts = facts
        self.finished = bool(facts.request_units)  # nothing to wait for: the bill is known

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def usage(self) -> Usage:
        return _request_units(self._facts, "speech")


def media_stream_meter(endpoint: Endpoint, facts: RequestFacts, sse: bool) -> StreamMeter:
    if endpoint.operation == "speech" and not sse:
        return RequestUnitsMeter(facts)
    return MediaStreamMeter(facts.choices if endpoint.operation in IMAGE_OPS else 1)


def _flag(value: object, name: str) -> bool:
    """A boolean from JSON (true/false) or a form field ("true"/"false")."""
    if value is None or value is False or value == "false":
        return False
    if value is True or value == "true":
        return True
    raise bad_request(f"{name}: expected true or false", "invalid_field")


def _int(value: object, name: str, bound: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_request(f"{name}: expected a non-negative integer", "invalid_field")
    return min(value, bound)
