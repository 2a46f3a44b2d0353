"""Simulated OpenAI image and audio endpoints, and Gemini's Imagen `:predict`.

Shapes follow responses recorded against the live APIs (tests/corpus/openai/images-*, audio-*): GPT image models
report token usage, DALL-E reports nothing (billed per image); whisper-1 reports `{type: duration, seconds}` in JSON
formats and nothing in text formats; the gpt-4o transcribe models report tokens under `input_token_details`;
speech is binary audio (tts-1: billed per character) or, with `stream_format: sse`, events ending in
`speech.audio.done` with usage. Audio SSE uses CRLF framing, as OpenAI's audio endpoints do.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson

from metergate.simulator import openai
from metergate.simulator.plan import AUDIO_SECONDS, Bill, Billed, Plan
from metergate.simulator.resources import parse_multipart
from metergate.simulator.wire import Wire, rand_id

_PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 24).decode()
_AUDIO_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
IMAGE_TOKENS_PER_INPUT_IMAGE = 194  # a 1024x1024 input image, as recorded


def fields_of(headers: dict[str, str], raw: bytes) -> tuple[dict[str, Any], dict[str, tuple[str, bytes, str]]]:
    """A media request's fields: JSON, or a multipart form's text fields and files."""
    content_type = headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        fields, files = parse_multipart(content_type, raw)
        return dict(fields), files
    body = orjson.loads(raw) if raw else {}
    return (body if isinstance(body, dict) else {}), {}


def _int(value: Any, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return default


async def images(fields: dict[str, Any], files: dict[str, Any], plan: Plan, bill: Bill, wire: Wire) -> None:
    model = str(fields.get("model") or "dall-e-2")
    bill.model = model
    n = _int(fields.get("n"), 1)
    size = str(fields.get("size") or "1024x1024")
    created = int(time.time())
    if model.startswith("dall-e"):
        quality = "standard" if model.startswith("dall-e-2") else str(fields.get("quality") or "standard")
        bill.planned = Billed()
        bill.units = {f"image/{size}/{quality}": n}
        data = [{"url": f"https://sim-images.example/{rand_id(16)}.png"} for _ in range(n)]
        if model.startswith("dall-e-3"):
            data = [{**d, "revised_prompt": str(fields.get("prompt", ""))} for d in data]
        await wire.json(200, {"created": created, "data": data})
        bill.completed = True
        return
    input_images = sum(1 for name in files if name.startswith("image")) + (1 if "mask" in files else 0)
    text = plan.billed.input
    image_in = input_images * IMAGE_TOKENS_PER_INPUT_IMAGE
    per_image = plan.billed.output
    bill.planned = Billed(input=text + image_in, output=per_image * n, input_image=image_in, output_image=per_image * n)
    bill.reported = bill.planned.copy()
    if openai_flag(fields.get("stream")):
        await wire.start("text/event-stream; charset=utf-8")
        kind = "image_edit" if files else "image_generation"
        for i in range(n):
            partial = {"type": f"{kind}.partial_image", "b64_json": _PNG, "partial_image_index": 0, "size": size}
            await wire.write(f"event: {kind}.partial_image\ndata: ".encode() + orjson.dumps(partial) + b"\n\n")
            usage = {
                "total_tokens": (text + image_in if i == 0 else 0) + per_image,
                "input_tokens": text + image_in if i == 0 else 0,
                "output_tokens": per_image,
                "input_tokens_details": {
                    "text_tokens": text if i == 0 else 0,
                    "image_tokens": image_in if i == 0 else 0,
                },
            }
            done = {"type": f"{kind}.completed", "b64_json": _PNG, "created_at": created, "size": size, "usage": usage}
            await wire.write(f"event: {kind}.completed\ndata: ".encode() + orjson.dumps(done) + b"\n\n")
        await wire.end()
        bill.completed = True
        return
    body = {
        "created": created,
        "background": "opaque",
        "data": [{"b64_json": _PNG} for _ in range(n)],
        "output_format": "png",
        "quality": "medium",
        "size": size,
        "usage": {
            "input_tokens": text + image_in,
            "input_tokens_details": {"image_tokens": image_in, "text_tokens": text},
            "output_tokens": per_image * n,
            "output_tokens_details": {"image_tokens": per_image * n, "text_tokens": 0},
            "total_tokens": text + image_in + per_image * n,
        },
    }
    await wire.json(200, body)
    bill.completed = True


async def transcription(
    fields: dict[str, Any],
    files: dict[str, Any],
    plan: Plan,
    bill: Bill,
    wire: Wire,
    headers: dict[str, str],
    *,
    translate: bool,
) -> None:
    model = str(fields.get("model") or "")
    bill.model = model
    upload = files.get("file")
    audio = upload[1] if upload else b""
    seconds = _int(headers.get(AUDIO_SECONDS), max(1, len(audio) // 16000))
    fmt = str(fields.get("response_format") or "json")
    text = "Hello, world! This is a test."
    if model.startswith("whisper"):
        bill.planned = Billed()
        bill.units = {"audio_second": seconds}
        reported = fmt in ("json", "verbose_json") and not translate
        bill.usage_readable = reported
        if fmt in ("text", "srt", "vtt"):
            body = {
                "text": text + "\n",
                "srt": f"1\n00:00:00,000 --> 00:00:0{min(seconds, 9)},000\n{text}\n\n\n",
                "vtt": f"WEBVTT\n\n00:00:00.000 --> 00:00:02.000\n{text}\n\n",
            }[fmt]
            await wire.raw(200, body.encode(), "text/plain; charset=utf-8")
        else:
            out: dict[str, Any] = {"text": text}
            if fmt == "verbose_json":
                out = {
                    "task": "translate" if translate else "transcribe",
                    "language": "english",
                    "duration": float(seconds),
                    "text": text,
                    "segments": [],
                }
            if reported:
                out["usage"] = {"type": "duration", "seconds": seconds}
            await wire.json(200, out)
        bill.completed = True
        return
    audio_tokens = plan.billed.input
    usage = {
        "type": "tokens",
        "total_tokens": audio_tokens + plan.billed.output,
        "input_tokens": audio_tokens,
        "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
        "output_tokens": plan.billed.output,
    }
    bill.planned = Billed(input=audio_tokens, output=plan.billed.output, input_audio=audio_tokens)
    bill.reported = bill.planned.copy()
    if openai_flag(fields.get("stream")):
        await wire.start("text/event-stream; charset=utf-8")
        for word in text.split(" "):
            await wire.write(
                b"data: " + orjson.dumps({"type": "transcript.text.delta", "delta": word + " "}) + b"\r\n\r\n"
            )
        done = {"type": "transcript.text.done", "text": text, "usage": usage}
        await wire.write(b"data: " + orjson.dumps(done) + b"\r\n\r\n")
        await wire.write(b"data: [DONE]\r\n\r\n")
        await wire.end()
    else:
        await wire.json(200, {"text": text, "usage": usage})
    bill.completed = True


async def speech(fields: dict[str, Any], plan: Plan, bill: Bill, wire: Wire) -> None:
    model = str(fields.get("model") or "")
    bill.model = model
    text = str(fields.get("input") or "")
    fmt = str(fields.get("response_format") or "mp3")
    audio = (b"ID3\x04" if fmt == "mp3" else b"") + bytes((i * 7) % 256 for i in range(64 * max(1, len(text))))
    if model.startswith("tts-1"):
        bill.planned = Billed()
        bill.units = {"character": len(text)}
        await wire.raw(200, audio, _AUDIO_TYPES.get(fmt, "audio/mpeg"))
        bill.completed = True
        return
    bill.planned = Billed(input=plan.billed.input, output=plan.billed.output, output_audio=plan.billed.output)
    if fields.get("stream_format") != "sse":
        bill.usage_readable = False  # billed in tokens, reported nowhere in the binary form
        await wire.raw(200, audio, _AUDIO_TYPES.get(fmt, "audio/mpeg"))
        bill.completed = True
        return
    bill.reported = bill.planned.copy()
    await wire.start("text/event-stream; charset=utf-8")
    for i in range(0, len(audio), 4096):
        delta = {"type": "speech.audio.delta", "audio": base64.b64encode(audio[i : i + 4096]).decode()}
        await wire.write(b"data: " + orjson.dumps(delta) + b"\r\n\r\n")
    usage = {
        "input_tokens": plan.billed.input,
        "output_tokens": plan.billed.output,
        "total_tokens": plan.billed.input + plan.billed.output,
    }
    await wire.write(b"data: " + orjson.dumps({"type": "speech.audio.done", "usage": usage}) + b"\r\n\r\n")
    await wire.write(b"data: [DONE]\r\n\r\n")
    await wire.end()
    bill.completed = True


async def imagen_predict(body: dict[str, Any], model: str, bill: Bill, wire: Wire) -> None:
    params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    n = _int((params or {}).get("sampleCount"), 4)
    bill.planned = Billed()
    bill.units = {"image": n}
    predictions = [{"mimeType": "image/png", "bytesBase64Encoded": _PNG} for _ in range(n)]
    await wire.json(200, {"predictions": predictions}, indent=True)
    bill.completed = True


def openai_flag(value: Any) -> bool:
    return value is True or value == "true"


ERROR = openai.error
