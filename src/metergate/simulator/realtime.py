"""A simulated OpenAI Realtime API over WebSocket (`/v1/realtime?model=...`).

Events follow the GA shapes recorded against the live API (tests/corpus/openai/realtime-*.ws.jsonl): the session
opens with `session.created`; `response.create` answers `response.created`, deltas, then `response.done` whose
`usage` splits input and output by modality, with cached tokens a subset per modality; committing input audio with
a transcription model configured answers `conversation.item.input_audio_transcription.completed` with its usage.
Each `response.done` is one Bill (api `openai.realtime`), and each transcription another (`openai.transcription`).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson

from metergate.simulator import openai
from metergate.simulator.plan import TAG, Bill, Billed, make_plan, split_text
from metergate.simulator.wire import rand_id

if TYPE_CHECKING:
    from metergate.simulator.app import SimulatedProvider

Message = MutableMapping[str, Any]


async def session(
    sim: SimulatedProvider,
    scope: Message,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    if (await receive())["type"] != "websocket.connect":
        return
    expected = (sim.keys or {}).get("openai")
    if scope["path"] != "/v1/realtime" or (
        expected is not None and headers.get("authorization") != f"Bearer {expected}"
    ):
        status = 404 if scope["path"] != "/v1/realtime" else 401
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        body = openai.ERRORS.get(status, openai.error(status, "Not found."))
        await send({"type": "websocket.http.response.body", "body": orjson.dumps(body)})
        return
    model = parse_qs(scope["query_string"].decode()).get("model", ["gpt-realtime"])[0]
    offered = list(scope.get("subprotocols") or [])
    sim.handshakes.append({"headers": headers, "subprotocols": offered, "query": scope["query_string"].decode()})
    await send({"type": "websocket.accept", "subprotocol": "realtime" if "realtime" in offered else None})
    state: dict[str, Any] = {
        "type": "realtime",
        "object": "realtime.session",
        "id": "sess_" + rand_id(22),
        "model": model,
        "output_modalities": ["audio"],
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "transcription": None}},
    }
    audio_bytes = 0
    tag = headers.get(TAG)

    async def event(obj: dict[str, Any]) -> None:
        await send(
            {"type": "websocket.send", "text": orjson.dumps({"event_id": "event_" + rand_id(22), **obj}).decode()}
        )

    await event({"type": "session.created", "session": state})
    responding: asyncio.Task[None] | None = None
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                continue
            try:
                client = orjson.loads(text)
            except orjson.JSONDecodeError:
                await event(
                    {
                        "type": "error",
                        "error": {"type": "invalid_request_error", "code": "invalid_json", "message": "Invalid JSON."},
                    }
                )
                continue
            kind = client.get("type")
            if kind == "session.update":
                update = client.get("session") or {}
                if isinstance(update.get("audio"), dict):
                    state["audio"] = {**state["audio"], **update["audio"]}
                state.update({k: v for k, v in update.items() if k != "audio"})
                await event({"type": "session.updated", "session": state})
            elif kind == "conversation.item.create":
                item = {"id": "item_" + rand_id(20), **(client.get("item") or {})}
                await event({"type": "conversation.item.added", "previous_item_id": None, "item": item})
            elif kind == "input_audio_buffer.append":
                audio_bytes += len(base64.b64decode(client.get("audio") or ""))
            elif kind == "input_audio_buffer.commit":
                item_id = "item_" + rand_id(20)
                await event({"type": "input_audio_buffer.committed", "previous_item_id": None, "item_id": item_id})
                transcription = (state["audio"].get("input") or {}).get("transcription")
                if isinstance(transcription, dict) and transcription.get("model"):
                    await _transcribe(sim, event, transcription["model"], audio_bytes, item_id, tag)
                audio_bytes = 0
            elif kind == "response.create":
                if responding is not None and not responding.done():
                    await event(
                        {
                            "type": "error",
                            "error": {
                                "type": "invalid_request_error",
                                "code": "conversation_already_has_active_response",
                                "message": "Conversation already has an active response in progress.",
                            },
                        }
                    )
                    continue
                plan = make_plan(headers, text.encode(), None)
                responding = asyncio.create_task(_respond(sim, event, state["model"], plan, tag, headers))
    finally:
        if responding is not None and not responding.done():
            responding.cancel()


async def _respond(
    sim: SimulatedProvider,
    event: Callable[[dict[str, Any]], Awaitable[None]],
    model: str,
    plan: Any,
    tag: str | None,
    headers: dict[str, str],
) -> None:
    b = plan.billed
    audio_in = b.input * 2 // 3
    cached = b.cached
    cached_audio = min(cached // 2, audio_in)
    cached_text = min(cached - cached_audio, b.input - audio_in)
    cached = cached_audio + cached_text
    audio_out = b.output * 3 // 4
    response_id = "resp_" + rand_id(22)
    await event(
        {
            "type": "response.created",
            "response": {
                "object": "realtime.response",
                "id": response_id,
                "status": "in_progress",
                "output": [],
                "usage": None,
            },
        }
    )
    for text, _ in split_text(b.output - audio_out, plan.chunks):
        if plan.chunk_delay_s:
            await asyncio.sleep(plan.chunk_delay_s)
        await event(
            {
                "type": "response.output_audio_transcript.delta",
                "response_id": response_id,
                "item_id": "item_x",
                "output_index": 0,
                "content_index": 0,
                "delta": text,
            }
        )
    usage = {
        "total_tokens": b.input + b.output,
        "input_tokens": b.input,
        "output_tokens": b.output,
        "input_token_details": {
            "text_tokens": b.input - audio_in,
            "audio_tokens": audio_in,
            "image_tokens": 0,
            "cached_tokens": cached,
            "cached_tokens_details": {"text_tokens": cached_text, "audio_tokens": cached_audio, "image_tokens": 0},
        },
        "output_token_details": {"text_tokens": b.output - audio_out, "audio_tokens": audio_out},
    }
    billed = Billed(
        input=b.input,
        output=b.output,
        cached=cached,
        input_audio=audio_in,
        output_audio=audio_out,
        cached_audio=cached_audio,
    )
    bill = Bill(
        api="openai.realtime",
        model=model,
        tag=tag,
        stream=True,
        planned=billed,
        reported=billed.copy(),
        headers=headers,
    )
    sim.bills.append(bill)
    await event(
        {
            "type": "response.done",
            "response": {
                "object": "realtime.response",
                "id": response_id,
                "status": "completed",
                "status_details": None,
                "output": [],
                "conversation_id": "conv_" + rand_id(20),
                "output_modalities": ["audio"],
                "max_output_tokens": "inf",
                "usage": usage,
            },
        }
    )
    bill.completed = True


async def _transcribe(
    sim: SimulatedProvider,
    event: Callable[[dict[str, Any]], Awaitable[None]],
    model: str,
    audio_bytes: int,
    item_id: str,
    tag: str | None,
) -> None:
    seconds = max(1, round(audio_bytes / 48000))  # 24 kHz 16-bit mono
    if "whisper" in model:
        usage: dict[str, Any] = {"type": "duration", "seconds": seconds}
        bill = Bill(api="openai.transcription", model=model, tag=tag, stream=True)
        bill.units = {"audio_second": seconds}
    else:
        tokens = 10 * seconds
        usage = {
            "type": "tokens",
            "total_tokens": tokens + 5,
            "input_tokens": tokens,
            "input_token_details": {"text_tokens": 0, "audio_tokens": tokens},
            "output_tokens": 5,
        }
        billed = Billed(input=tokens, output=5, input_audio=tokens)
        bill = Bill(
            api="openai.transcription", model=model, tag=tag, stream=True, planned=billed, reported=billed.copy()
        )
    sim.bills.append(bill)
    await event(
        {
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": item_id,
            "content_index": 0,
            "transcript": "hello",
            "usage": usage,
        }
    )
    bill.completed = True
