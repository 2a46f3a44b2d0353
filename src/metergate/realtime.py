"""OpenAI Realtime sessions over WebSocket (`/v1/realtime`), metered while they run.

The client's WebSocket is relayed to the provider's, frame for frame, with the gateway key replaced by the
provider credential. Every `response.done` the provider sends carries that response's usage (text, audio and image
tokens, cached ones included): it is priced and recorded as it passes, not at the end of the session, and so is
every input audio transcription (`conversation.item.input_audio_transcription.completed`, billed at the
transcription model's price). A client that hangs up while a response is being generated was still billed for
it: the provider's side is read on, for at most `drain_timeout_s`, until that response's usage arrives.

Budgets: a session is refused (HTTP 429 before the upgrade) once a block budget is spent, and a session that
spends it is told so with an `error` event and closed (1008), so it cannot keep spending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import aiohttp
import orjson

from metergate.attribution import AttributionPolicy
from metergate.auth import KeyRing, Principal
from metergate.config import Config
from metergate.endpoints import match_endpoint
from metergate.errors import GatewayError, error_body
from metergate.exchange import DROP_REQUEST, Recorder, RequestContext, UpstreamClients
from metergate.inbound import refuse_request
from metergate.labels import LabelPolicy
from metergate.providers.base import read_model, usage_details
from metergate.providers.openai_media import parse_audio_usage
from metergate.query import query_items, query_value, without
from metergate.routing import Router
from metergate.usage import Usage, UsageError, count, settle

log = logging.getLogger("metergate.realtime")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
        "origin",
    }
)
_INSECURE_KEY = "openai-insecure-api-key."  # browsers put the key in a subprotocol


class BudgetCheck(Protocol):
    """Whether the block budgets of a request's sender still allow spending (implemented by budgets.BudgetGuard)."""

    def refusal(self, ctx: RequestContext) -> GatewayError | None: ...


@dataclass(slots=True)
class _Session:
    ctx: RequestContext
    principal: Principal
    model: str  # the session's model (session.created names the one the provider runs)
    transcription_model: str | None = None
    responses: int = 0
    open_responses: int = 0  # response.created seen, response.done not yet
    response_started: float | None = None
    closed_for_budget: bool = False
    budget_message: str = ""
    client_gone: bool = False


class RealtimeRelay:
    def __init__(
        self,
        config: Config,
        keys: KeyRing,
        labels: LabelPolicy,
        router: Router,
        clients: UpstreamClients,
        recorder: Recorder,
        budgets: BudgetCheck,
        next_id: Callable[[], str],
        clock: Callable[[], float] = time.time,
        attribution: AttributionPolicy | None = None,
    ) -> None:
        self.config = config
        self.attribution = attribution or AttributionPolicy(config.attribution.tags)
        self.keys = keys
        self.labels = labels
        self.router = router
        self.clients = clients
        self.recorder = recorder
        self.budgets = budgets
        self.next_id = next_id
        self.clock = clock
        self.sessions = 0
        self._per_key: dict[str, int] = {}  # open sessions by key id

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        path = raw_path.decode("latin-1")
        query = scope["query_string"].decode("latin-1")
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        protocols = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        ctx = RequestContext(
            request_id=self.next_id(),
            started=time.perf_counter(),
            started_at=self.clock(),
            match=match_endpoint("GET", path, headers, query),
        )
        if (await receive())["type"] != "websocket.connect":
            return
        try:
            upstream_ws, session, offered = await self._open(ctx, path, query, headers, protocols)
        except GatewayError as err:
            await self._deny(ctx, scope, send, err)
            return
        await send({"type": "websocket.accept", "subprotocol": offered})
        self.sessions += 1
        principal = session.principal
        self._per_key[principal.key_id] = self._per_key.get(principal.key_id, 0) + 1
        flight = (
            self.labels.team(principal.team),
            self.labels.app(principal.app),
            ctx.match.endpoint.label,
            ctx.provider_label,
        )
        self.recorder.meter.request_started(*flight)
        try:
            await self._relay(session, upstream_ws, receive, send)
        finally:
            self.recorder.meter.request_finished(*flight)
            self.sessions -= 1
            left = self._per_key.get(principal.key_id, 1) - 1
            if left:
                self._per_key[principal.key_id] = left
            else:
                self._per_key.pop(principal.key_id, None)
            with contextlib.suppress(Exception):
                await upstream_ws.close()

    # --- opening ---------------------------------------------------------------------------------------------

    async def _open(
        self, ctx: RequestContext, path: str, query: str, headers: dict[str, str], protocols: list[str]
    ) -> tuple[aiohttp.ClientWebSocketResponse, _Session, str | None]:
        endpoint = ctx.match.endpoint
        insecure = next((p for p in protocols if p.startswith(_INSECURE_KEY)), None)
        auth_headers = dict(headers)
        if insecure is not None and "authorization" not in headers:
            auth_headers["authorization"] = "Bearer " + insecure[len(_INSECURE_KEY) :]
        principal = self.keys.authenticate(auth_headers, query)
        ctx.principal = principal
        if principal is None:
            raise GatewayError(
                401, "unauthorized", "Invalid or missing API key: use a key issued by the metergate gateway."
            )
        refusal = refuse_request(path, headers)
        if refusal is not None:
            raise refusal
        ctx.attribution = self.attribution.attribute(principal, headers)
        if endpoint.handling != "realtime":
            raise GatewayError(
                404,
                "unknown_route",
                f"metergate relays WebSocket sessions of the OpenAI Realtime API only, not {path[:200]}",
            )
        model = None
        for name, item in query_items(query):
            if name == "model":
                model = query_value(item)
        if model is None:
            raise GatewayError(
                400,
                "missing_model",
                "model: the Realtime session must name its model (?model=...)",
                code="missing_model",
            )
        model = read_model(model)
        ctx.route = route = self.router.require(model, ctx.match)
        upstream = route.upstream
        ctx.provider_label = upstream.name
        ctx.model_label = self.labels.model(upstream.name, upstream.config.pricing_provider_id, route.upstream_model)
        refusal = self.budgets.refusal(ctx)
        if refusal is not None:
            raise refusal
        if self._per_key.get(principal.key_id, 0) >= self.config.server.max_sessions_per_key:
            raise GatewayError(
                429,
                "too_many_sessions",
                f"This key already has {self.config.server.max_sessions_per_key} Realtime sessions open.",
                code="too_many_sessions",
            )
        if route.upstream_model != model:
            query = "&".join(
                f"model={route.upstream_model}" if name == "model" else item for name, item in query_items(query)
            )
        url = upstream.url(ctx.match, path, without(query, "key"), route.upstream_model)
        url = "ws" + url[4:] if url.startswith("http") else url
        forward = {
            k: v
            for k, v in headers.items()
            if k not in DROP_REQUEST and k not in _HANDSHAKE and not k.startswith("x-metergate-")
        }
        forward.update(upstream.auth_headers())
        offered = [p for p in protocols if not p.startswith(_INSECURE_KEY)]
        ctx.sent_upstream = True
        try:
            ws = await self.clients.session(upstream).ws_connect(
                url,
                headers=forward,
                protocols=offered,
                autoping=True,
                max_msg_size=self.config.server.max_ws_message_bytes,
                compress=0,
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise GatewayError(
                exc.status if 400 <= exc.status < 600 else 502,
                "upstream_client_error" if exc.status < 500 else "upstream_server_error",
                f"The upstream provider refused the Realtime session: HTTP {exc.status} {exc.message}",
            ) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise GatewayError(
                502, "upstream_unreachable", f"The upstream provider is unreachable: {type(exc).__name__}"
            ) from None
        session = _Session(ctx, principal, route.upstream_model)
        return ws, session, ws.protocol

    async def _deny(self, ctx: RequestContext, scope: Message, send: Send, err: GatewayError) -> None:
        record = self.recorder.record(ctx, err.status, Usage(), err.error_type, stream=True)
        record.metered = not ctx.sent_upstream
        record.latency_s = time.perf_counter() - ctx.started
        self.recorder.emit(record, ctx)
        if "websocket.http.response" in scope.get("extensions", {}):
            headers = [
                (b"content-type", b"application/json"),
                *((k.encode(), v.encode()) for k, v in err.headers.items()),
            ]
            await send({"type": "websocket.http.response.start", "status": err.status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": error_body("openai", err)})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": err.message[:120]})

    # --- relaying --------------------------------------------------------------------------------------------

    async def _relay(
        self, session: _Session, ws: aiohttp.ClientWebSocketResponse, receive: Receive, send: Send
    ) -> None:
        loop = asyncio.get_running_loop()
        drain: asyncio.TimerHandle | None = None

        async def client_to_upstream() -> None:
            nonlocal drain
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.disconnect":
                    session.client_gone = True
                    if not session.open_responses:
                        await ws.close()
                    else:
                        # A response the provider is generating is billed: read on until its usage arrives.
                        drain = loop.call_later(
                            self.config.server.drain_timeout_s, lambda: asyncio.ensure_future(ws.close())
                        )
                    return
                if kind != "websocket.receive":
                    continue
                if message.get("text") is not None:
                    await ws.send_str(message["text"])
                elif message.get("bytes") is not None:
                    await ws.send_bytes(message["bytes"])

        reader = asyncio.create_task(client_to_upstream())
        close_code = 1000
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    data: str = msg.data
                    self._observe(session, data)
                    if session.client_gone:
                        if not session.open_responses:
                            break  # the drained response's usage arrived
                        continue
                    with contextlib.suppress(Exception):
                        await send({"type": "websocket.send", "text": data})
                    if session.closed_for_budget:
                        # Told in the API's own error event, then closed: the session cannot keep spending.
                        close_code = 1008
                        with contextlib.suppress(Exception):
                            await send({"type": "websocket.send", "text": _budget_event(session)})
                        break
                elif msg.type == aiohttp.WSMsgType.BINARY and not session.client_gone:
                    with contextlib.suppress(Exception):
                        await send({"type": "websocket.send", "bytes": msg.data})
        finally:
            if drain is not None:
                drain.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        if session.open_responses:
            # The provider billed a response whose usage never arrived (it closed, or the drain gave up).
            self._unmetered(session, "drain_timeout" if session.client_gone else "upstream_closed")
        if not session.client_gone:
            upstream_code = ws.close_code if ws.close_code is not None else 1000
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": close_code if close_code != 1000 else upstream_code})

    # --- metering --------------------------------------------------------------------------------------------

    def _observe(self, session: _Session, data: str) -> None:
        head = data[:200]
        if '"response.created"' in head:
            session.open_responses += 1
            if session.response_started is None:
                session.response_started = time.perf_counter()
            return
        if '"session.created"' in head or '"session.updated"' in head:
            self._session_config(session, data)
            return
        if '"response.done"' in head:
            session.open_responses = max(0, session.open_responses - 1)
            self._response_done(session, data)
            return
        if '"conversation.item.input_audio_transcription.completed"' in head:
            self._transcription(session, data)

    def _session_config(self, session: _Session, data: str) -> None:
        with contextlib.suppress(orjson.JSONDecodeError):
            event = orjson.loads(data)
            config = event.get("session") if isinstance(event, dict) else None
            if not isinstance(config, dict):
                return
            model = config.get("model")
            if isinstance(model, str) and model:
                session.model = model[:256]
            transcription = _transcription_model(config)
            if transcription:
                session.transcription_model = transcription[:256]

    def _response_done(self, session: _Session, data: str) -> None:
        try:
            event = orjson.loads(data)
            response = event.get("response") or {}
            usage = parse_realtime_usage(response.get("usage") or {})
        except (orjson.JSONDecodeError, UsageError, AttributeError) as exc:
            log.warning("realtime %s: a response's usage could not be read: %s", session.ctx.request_id, exc)
            self._unmetered(session, "upstream_malformed_usage")
            return
        status = response.get("status") if isinstance(response, dict) else None
        self._record(session, session.model, usage, "response_" + str(status) if status == "failed" else None)

    def _transcription(self, session: _Session, data: str) -> None:
        try:
            event = orjson.loads(data)
            raw = event.get("usage")
            if raw is None:
                return
            usage = parse_audio_usage(raw)
        except (orjson.JSONDecodeError, UsageError, AttributeError) as exc:
            log.warning("realtime %s: a transcription's usage could not be read: %s", session.ctx.request_id, exc)
            return
        self._record(session, session.transcription_model or "gpt-realtime-whisper", usage, None)

    def _record(self, session: _Session, model: str, usage: Usage, error_type: str | None) -> None:
        """One billed response (or transcription) of the session: priced and counted now."""
        ctx = session.ctx
        session.responses += 1
        route = ctx.route
        assert route is not None
        upstream = route.upstream
        one = replace(
            ctx,
            request_id=f"{ctx.request_id}-{session.responses}",
            started_at=self.clock(),
            route=replace(route, upstream_model=model),
            model_label=self.labels.model(upstream.name, upstream.config.pricing_provider_id, model),
            emitted=False,
            reservation=None,
        )
        record = self.recorder.record(one, 200, usage, error_type, stream=True)
        started = session.response_started
        record.latency_s = time.perf_counter() - started if started is not None else 0.0
        session.response_started = time.perf_counter() if session.open_responses else None
        self.recorder.emit(record, one)
        refusal = self.budgets.refusal(one)
        if refusal is not None:
            session.closed_for_budget = True
            session.budget_message = refusal.message

    def _unmetered(self, session: _Session, error_type: str) -> None:
        ctx = session.ctx
        session.responses += 1
        one = replace(ctx, request_id=f"{ctx.request_id}-{session.responses}", emitted=False, reservation=None)
        record = self.recorder.record(one, 200, Usage(), error_type, stream=True)
        record.metered = False
        self.recorder.emit(record, one)


def _budget_event(session: _Session) -> str:
    return orjson.dumps(
        {
            "type": "error",
            "event_id": f"event_metergate_{session.ctx.request_id}",
            "error": {
                "type": "invalid_request_error",
                "code": "budget_exceeded",
                "message": session.budget_message,
                "param": None,
                "event_id": None,
            },
        }
    ).decode()


def _transcription_model(config: dict[str, Any]) -> str | None:
    """The input transcription model of a session: GA `audio.input.transcription.model`, or the beta
    `input_audio_transcription.model`."""
    audio = config.get("audio")
    if isinstance(audio, dict):
        inp = audio.get("input")
        transcription = inp.get("transcription") if isinstance(inp, dict) else None
        if isinstance(transcription, dict) and isinstance(transcription.get("model"), str):
            return str(transcription["model"])
    beta = config.get("input_audio_transcription")
    if isinstance(beta, dict) and isinstance(beta.get("model"), str):
        return str(beta["model"])
    return None


def parse_realtime_usage(usage: Any) -> Usage:
    """A Realtime `response.usage`: cached tokens are a subset of the input, per modality too."""
    if not isinstance(usage, dict):
        raise UsageError("usage is not an object")
    inp = usage_details(usage, "input_token_details")
    out = usage_details(usage, "output_token_details")
    cached_details = usage_details(inp, "cached_tokens_details")
    return settle(
        Usage(
            input_tokens=count(usage.get("input_tokens"), "input_tokens"),
            output_tokens=count(usage.get("output_tokens"), "output_tokens"),
            cache_read_tokens=count(inp.get("cached_tokens"), "input_token_details.cached_tokens"),
            input_audio_tokens=count(inp.get("audio_tokens"), "input_token_details.audio_tokens"),
            cache_audio_read_tokens=count(cached_details.get("audio_tokens"), "cached_tokens_details.audio_tokens"),
            input_image_tokens=count(inp.get("image_tokens"), "input_token_details.image_tokens"),
            cache_image_read_tokens=count(cached_details.get("image_tokens"), "cached_tokens_details.image_tokens"),
            output_audio_tokens=count(out.get("audio_tokens"), "output_token_details.audio_tokens"),
        )
    )
