"""The simulated provider as one ASGI app serving OpenAI, Azure OpenAI, Anthropic and Gemini routes.

It checks the provider credential like the real APIs do (so tests prove the gateway swaps keys), answers in each
API's wire format, and keeps a `Bill` per request: the ground truth metering is checked against.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import orjson

from metergate.simulator import anthropic, gemini, media, openai, realtime
from metergate.simulator.admin import AdminAPI, is_admin_path, presented_key
from metergate.simulator.billing import PriceList
from metergate.simulator.plan import REPLAY, RESPONSE_HEADER, TAG, Bill, Billed, make_plan
from metergate.simulator.resources import Request, Resources
from metergate.simulator.wire import Wire

ADMIN_KEYS = {"openai": "sk-admin-sim", "anthropic": "sk-ant-admin01-sim"}

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_GEMINI = re.compile(r"^/(v1beta|v1)/models/([^/:]+):(\w+)$")
_AZURE = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|completions|embeddings)$")
_GEMINI_GENERATION = frozenset(
    {"generateContent", "streamGenerateContent", "embedContent", "batchEmbedContents", "countTokens", "predict"}
)
_OPENAI_GENERATION = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"})
_OPENAI_MEDIA = {
    "/v1/images/generations": "images",
    "/v1/images/edits": "images",
    "/v1/images/variations": "images",
    "/v1/audio/transcriptions": "transcription",
    "/v1/audio/translations": "translation",
    "/v1/audio/speech": "speech",
}


def _family(path: str, headers: dict[str, str], query: str) -> str:
    """The API a request is for, the way the real hosts tell: by path, and by credential where paths are shared."""
    if path.startswith("/openai/"):
        return "azure"
    if path.startswith(("/v1beta/", "/v1alpha/", "/upload/", "/download/")) or "x-goog-api-key" in headers:
        return "gemini"
    if path.startswith("/v1/messages") or "anthropic-version" in headers or "x-api-key" in headers:
        return "anthropic"
    return "openai"


# What each API can express: fields a provider never reports are zero in its bills.
_REPORTABLE = {
    "openai": lambda b: Billed(b.input, b.output, b.cached, 0, 0, b.reasoning),
    "anthropic": lambda b: Billed(b.input, b.output, b.cached, b.cache_write, b.cache_write_1h, 0),
    "gemini": lambda b: Billed(b.input, b.output, b.cached, 0, 0, b.reasoning),
}


def replay_sse(family: str, lines: bytes) -> bytes:
    """SSE framing around recorded event payloads kept one per line (the providers' own framing)."""
    out = []
    for line in lines.splitlines():
        if not line.strip():
            continue
        if family == "anthropic":
            kind = orjson.loads(line).get("type", "")
            out.append(b"event: " + kind.encode() + b"\ndata: " + line + b"\n\n")
        elif family == "gemini":
            out.append(b"data: " + line + b"\r\n\r\n")
        else:
            out.append(b"data: " + line + b"\n\n")
    if family not in ("anthropic", "gemini"):
        out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def _field_mask(query: str) -> set[str] | None:
    """Google's `fields` system parameter: only the named top-level fields are returned."""
    values = parse_qs(query).get("fields")
    return {f.strip() for v in values for f in v.split(",")} if values else None


class SimulatedProvider:
    """An ASGI app; `bills` lists what it billed, newest last."""

    def __init__(
        self, keys: dict[str, str] | None = None, *, max_bills: int | None = None, corpus: Path | None = None
    ) -> None:
        # family -> the credential it accepts ("openai", "azure", "anthropic", "gemini"); None accepts any.
        self.keys = keys
        self.bills: deque[Bill] = deque(maxlen=max_bills)
        self.deployments: dict[str, str] = {}  # Azure deployment -> model
        self.models = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
        # Recorded provider responses, answered byte for byte to requests naming one in `x-sim-replay`.
        self.corpus = corpus.resolve() if corpus is not None else None
        self.resources = Resources(self)
        self.received: deque[Request] = deque(maxlen=1000)  # resource requests (files, batches...) as they arrived
        self.handshakes: deque[dict[str, Any]] = deque(maxlen=1000)  # Realtime WebSocket handshakes
        # Other keys accepted besides `keys` (traffic that bypasses the gateway), by family.
        self.extra_keys: dict[str, list[str]] = {}
        # The admin APIs (simulator/admin.py): the admin key per family, prices, failures to answer with.
        self.admin_keys = dict(ADMIN_KEYS)
        self.price_list = PriceList()
        self.admin_failures: deque[int] = deque()  # statuses for the next admin calls (429 comes with retry-after)
        self.admin_calls: deque[str] = deque(maxlen=1000)
        self.cost_places: int | None = None  # Anthropic cost amounts rounded to this many decimals of a cent
        self.admin = AdminAPI(self)

    def accept_key(self, family: str, secret: str) -> None:
        """Accept another API key for a family: traffic sent straight to the provider, around the gateway."""
        self.extra_keys.setdefault(family, []).append(secret)

    def accepted_keys(self, family: str) -> list[str]:
        main = (self.keys or {}).get(family)
        return ([main] if main else []) + self.extra_keys.get(family, [])

    def billed(self, tag: str | None = None) -> list[Bill]:
        return [b for b in list(self.bills) if tag is None or b.tag == tag]

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket":
            await realtime.session(self, scope, receive, send)
            return
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:  # as received: bytes kept (Latin-1), repeated headers joined
            key, text = name.decode("latin-1").lower(), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        await self._dispatch(scope["method"], scope["path"], scope["query_string"].decode(), headers, raw, send)

    async def _dispatch(
        self, method: str, path: str, query: str, headers: dict[str, str], raw: bytes, send: Send
    ) -> None:
        wire = Wire(send)
        gm = _GEMINI.match(path)
        am = _AZURE.match(path)
        family = _family(path, headers, query)
        api, model = "", ""
        if method != "POST":
            pass  # model calls are POSTs: anything else is a resource (or unknown)
        elif gm and gm.group(3) in _GEMINI_GENERATION:
            family, api, model = "gemini", f"gemini.{gm.group(3)}", gm.group(2)
        elif am:
            family, api, model = "azure", f"azure.{am.group(2)}", self.deployments.get(am.group(1), am.group(1))
        elif path.startswith("/openai/"):
            family, api = "azure", "azure." + path.removeprefix("/openai/").removeprefix("v1/")
        elif path in ("/v1/messages", "/v1/messages/count_tokens"):
            family, api = "anthropic", "anthropic." + ("count_tokens" if path.endswith("count_tokens") else "messages")
        elif path in _OPENAI_GENERATION:
            family, api = "openai", "openai." + path[4:].replace("/", ".")
        elif path in _OPENAI_MEDIA:
            family, api = "openai", "openai.media." + _OPENAI_MEDIA[path]
        if is_admin_path(path):
            await self.admin.handle(family, method, path, query, headers, wire)
            return
        if not self._authorized(family, headers, query):
            await self._error(wire, family, 401, "Invalid API key.")
            return
        if REPLAY in headers and self.corpus is not None:
            await self._replay(family, path, headers, wire)
            return
        if not api:
            if method == "GET" and path == "/v1/models" and family == "openai":
                await wire.json(200, openai.models_list(self.models))
                return
            request = Request(family, method, path, query, headers, raw, wire)
            self.received.append(request)
            if not await self.resources.handle(family, request):
                self.bills.append(
                    Bill(api=f"unknown:{method} {path}", model="", tag=headers.get(TAG), stream=False, status=404)
                )
                await self._error(wire, family, 404, f"Unknown path {method} {path}")
            return
        files: dict[str, Any] = {}
        received = b""
        try:
            if api.startswith("openai.media."):
                body, files = media.fields_of(headers, raw)
                received = raw
                raw = orjson.dumps(body)  # the plan's seed: the fields, not the uploaded file
            else:
                body = orjson.loads(raw) if raw else {}
        except (orjson.JSONDecodeError, ValueError):
            await self._error(wire, family, 400, "Request body is not valid JSON.")
            return
        if not isinstance(body, dict):
            await self._error(wire, family, 400, "Request body must be a JSON object.")
            return
        bill = await self.generate(family, api, model, query, headers, raw, body, wire, send, files=files)
        if files and bill is not None:
            bill.body = received

    async def generate(
        self,
        family: str,
        api: str,
        model: str,
        query: str,
        headers: dict[str, str],
        raw: bytes,
        body: dict[str, Any],
        wire: Wire,
        send: Send | None = None,
        files: dict[str, Any] | None = None,
    ) -> Bill | None:
        """One model call: plan what to bill, bill it, answer it (on `wire`, or a capture wire for batches)."""
        model = model or str(body.get("model", ""))
        cap = body.get("max_completion_tokens", body.get("max_output_tokens", body.get("max_tokens")))
        config = body.get("generationConfig")
        if isinstance(config, dict):
            cap = config.get("maxOutputTokens", cap)
        embedding = api.endswith(("embeddings", "embedContent", "batchEmbedContents"))
        plan = make_plan(headers, raw, cap if isinstance(cap, int) else None, embedding=embedding)
        stream = plan.flag(body.get("stream")) or api == "gemini.streamGenerateContent"
        plan.billed = _REPORTABLE["openai" if family == "azure" else family](plan.billed)
        bill = Bill(
            api=api, model=model, tag=plan.tag, stream=stream, planned=plan.billed.copy(), headers=headers, query=query
        )
        self.bills.append(bill)
        if plan.delay_s:
            await asyncio.sleep(plan.delay_s)
        if plan.fail == "hang":
            await asyncio.sleep(3600)
            return bill
        if plan.redirect_to is not None:
            bill.status, bill.planned = 307, Billed()
            await wire.json(307, openai.error(307, "Moved."), {"location": plan.redirect_to})
            return bill
        status = plan.fail_status
        if status is not None:
            bill.status = status
            bill.planned = Billed()
            await self._error(wire, family, status, f"Simulated failure {status}.")
            return bill
        if send is not None:
            extra = {}
            if RESPONSE_HEADER in headers:
                name, _, value = headers[RESPONSE_HEADER].partition("=")
                extra[name] = unquote(value)
            wire = Wire(send, plan.chunk_delay_s, extra)
        if api.startswith("openai.media."):
            await self._media(api, body, files or {}, plan, bill, wire, headers)
            return bill
        await self._answer(family, api, model, query, body, plan, bill, wire)
        return bill

    async def _media(
        self,
        api: str,
        fields: dict[str, Any],
        files: dict[str, Any],
        plan: Any,
        bill: Bill,
        wire: Wire,
        headers: dict[str, str],
    ) -> None:
        kind = api.removeprefix("openai.media.")
        if kind == "images":
            await media.images(fields, files, plan, bill, wire)
        elif kind in ("transcription", "translation"):
            await media.transcription(fields, files, plan, bill, wire, headers, translate=kind == "translation")
        else:
            await media.speech(fields, plan, bill, wire)

    async def _answer(
        self,
        family: str,
        api: str,
        model: str,
        query: str,
        body: dict[str, Any],
        plan: Any,
        bill: Bill,
        wire: Wire,
    ) -> None:
        azure = family == "azure"
        if api in ("openai.chat.completions", "azure.chat/completions"):
            await openai.chat(body, plan, bill, wire, azure=azure)
        elif api in ("openai.completions", "azure.completions"):
            await openai.chat(body, plan, bill, wire, azure=azure, legacy=True)
        elif api in ("openai.responses", "azure.responses"):
            await openai.responses(body, plan, bill, wire)
        elif api in ("openai.embeddings", "azure.embeddings"):
            await openai.embeddings(body, plan, bill, wire)
        elif api == "anthropic.messages":
            await anthropic.messages(body, plan, bill, wire, legacy_delta=plan.legacy_delta)
        elif api == "anthropic.count_tokens":
            await anthropic.count_tokens(body, plan, bill, wire)
        elif api == "gemini.generateContent":
            await gemini.generate(body, model, plan, bill, wire, sse=False, fields=_field_mask(query))
        elif api == "gemini.streamGenerateContent":
            await gemini.generate(body, model, plan, bill, wire, sse="alt=sse" in query, fields=_field_mask(query))
        elif api in ("gemini.embedContent", "gemini.batchEmbedContents"):
            await gemini.embed(body, plan, bill, wire, batch=api == "gemini.batchEmbedContents")
        elif api == "gemini.predict":
            await media.imagen_predict(body, model, bill, wire)
        elif api == "gemini.countTokens":
            await gemini.count_tokens(body, plan, bill, wire)
        else:
            bill.status = 404
            bill.planned = Billed()
            await self._error(wire, "openai" if family == "azure" else family, 404, f"Unknown API {api}")

    async def _replay(self, family: str, path: str, headers: dict[str, str], wire: Wire) -> None:
        """Answer with a recorded response: the file's bytes as recorded (see tests/corpus/README.md for the files
        that were re-serialised or whose SSE framing is rebuilt from recorded payloads)."""
        assert self.corpus is not None
        target = (self.corpus / headers[REPLAY]).resolve()
        if not target.is_relative_to(self.corpus) or not target.is_file():
            await wire.json(404, openai.error(404, f"no recording {headers[REPLAY]}"))
            return
        self.bills.append(Bill(api=f"replay:{path}", model="", tag=headers.get(TAG), stream=False, headers=headers))
        body = target.read_bytes()
        name = target.name
        if name.endswith(".chunks.jsonl"):
            body = replay_sse(family, body)
        kind = "text/event-stream" if name.endswith((".sse", ".chunks.jsonl")) else "application/json"
        await wire.start(kind)
        await wire.write(body)
        await wire.end()

    def _authorized(self, family: str, headers: dict[str, str], query: str) -> bool:
        if self.keys is None or self.keys.get(family) is None:
            return True
        if family == "azure":
            presented = headers.get("api-key", "")
        elif family == "gemini":
            presented = headers.get("x-goog-api-key", "")
        else:
            presented = presented_key(family, headers)
        return presented in self.accepted_keys(family)

    async def error(self, wire: Wire, family: str, status: int, message: str) -> None:
        await self._error(wire, family, status, message)

    async def _error(self, wire: Wire, family: str, status: int, message: str) -> None:
        if family == "anthropic":
            await wire.json(status, anthropic.error(status, message))
        elif family == "gemini":
            # Gemini answers a bad key with 400 INVALID_ARGUMENT rather than 401.
            code = 400 if status == 401 else status
            await wire.json(code, gemini.error(code, message), indent=True)
        else:
            await wire.json(status, openai.ERRORS.get(status, openai.error(status, message)))
