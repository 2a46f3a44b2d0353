"""One request through the gateway: authenticate, route, forward, relay, meter.

The HTTP edge (`edge.py`) hands each request here as an `InboundRequest` with a `Responder` to write to, so this
module knows nothing of ASGI and the edge knows nothing of providers, prices or metrics.

Accounting rules enforced here:
- a request is recorded exactly once, whatever happens (success, upstream error, bad input, disconnect);
- a streamed response is relayed chunk by chunk as it arrives and metered on the way;
- when the client hangs up mid-stream the upstream is still read, for at most `drain_timeout_s`, because the
  provider bills the whole generation and reports the usage only at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from itertools import count as counter
from typing import Any, Protocol

import aiohttp
import orjson
from yarl import URL

from metergate.auth import KeyRing, Principal, query_without_key
from metergate.config import Config
from metergate.endpoints import EndpointMatch, Family, match_endpoint, unknown_route
from metergate.errors import GatewayError, bounded, error_body, stream_error_event
from metergate.inbound import refuse_request
from metergate.labels import OTHER, UNAUTHENTICATED, LabelPolicy
from metergate.metrics import Meter
from metergate.pricing import PriceBook
from metergate.providers import API_ADAPTERS, RequestFacts, StreamMeter, Upstream
from metergate.providers.gemini import GeminiApi, GeminiUpstream
from metergate.routing import Route, Router
from metergate.usage import INCOMPLETE, Usage, UsageError, UsageMissing, UsageRecord

log = logging.getLogger("metergate.gateway")

# Request headers never forwarded: hop-by-hop, framing recomputed by the client library, the client's gateway
# key (replaced by the provider credential) and encodings (the gateway must read what it relays).
_DROP_REQUEST = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "accept-encoding",
        "authorization",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
    }
)
_DROP_RESPONSE = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "content-encoding",
        "upgrade",
        "trailer",
    }
)
_DROP_RESPONSE_BYTES = frozenset(h.encode() for h in _DROP_RESPONSE)
COST_HEADER = b"x-metergate-cost-usd"
REQUEST_ID_HEADER = b"x-metergate-request-id"
_JSON = [(b"content-type", b"application/json")]
_ZERO = Decimal(0)


class RequestBody(Protocol):
    """The request body, read on demand (implemented by the HTTP edge)."""

    @property
    def finished(self) -> bool:
        """Every byte of the body has been read (or there was none)."""
        ...

    async def read(self) -> bytes:
        """The whole body; raises GatewayError (413 too large, 408 too slow, 499 client gone)."""
        ...


@dataclass(slots=True)
class InboundRequest:
    method: str
    path: str  # exactly as sent: never percent-decoded, so the provider receives what was classified
    query: str  # exactly as sent
    headers: dict[str, str]  # lower-case names
    body: RequestBody
    refusal: GatewayError | None = None  # what the edge found wrong with the headers


class Responder(Protocol):
    """Where the gateway writes the response; implemented by the HTTP edge."""

    @property
    def disconnected(self) -> bool: ...

    @property
    def started(self) -> bool:
        """The response's status line is out; an error can no longer be a status code."""
        ...

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...

    async def send(self, body: bytes, more: bool = False) -> None: ...


class Admission(Protocol):
    """Budget enforcement: reserve a worst-case cost before forwarding, settle it with the real cost after."""

    async def reserve(self, ctx: RequestContext) -> object | None: ...

    def settle(self, reservation: object | None, record: UsageRecord) -> None: ...


RecordSink = Callable[[UsageRecord], None]


@dataclass(slots=True)
class RequestContext:
    """What is known about a request so far; filled in as it moves through the gateway."""

    request_id: str
    started: float  # perf_counter
    started_at: float  # unix time
    match: EndpointMatch
    principal: Principal | None = None
    facts: RequestFacts | None = None
    route: Route | None = None
    model_label: str = OTHER
    provider_label: str = OTHER
    body: dict[str, Any] | None = None
    raw_body: bytes | None = None
    upstream_body: bytes | None = None  # set when the body sent upstream differs from the client's
    request_body: RequestBody | None = None
    ttft: float | None = None
    reservation: object | None = None
    sent_upstream: bool = False  # the provider may have billed something from here on
    stream_meter: StreamMeter | None = None
    emitted: bool = False

    @property
    def family(self) -> Family:
        return self.match.endpoint.family


class Gateway:
    def __init__(
        self,
        config: Config,
        keys: KeyRing,
        prices: PriceBook,
        labels: LabelPolicy,
        upstreams: dict[str, Upstream],
        meter: Meter,
        sinks: list[RecordSink] | None = None,
        admission: Admission | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.keys = keys
        self.prices = prices
        self.labels = labels
        self.upstreams = upstreams
        self.router = Router(config.routes, upstreams)
        self.meter = meter
        self.sinks = sinks or []
        self.admission = admission
        self.clock = clock  # wall time; corrected to the shared ledger's clock when replicas share one
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._ids = counter(1)
        self._id_prefix = os.urandom(4).hex()
        self._background: set[asyncio.Task[None]] = set()
        self._models_body: bytes | None = None
        self.in_flight = 0

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        server = self.config.server
        for name, upstream in self.upstreams.items():
            connector = aiohttp.TCPConnector(
                limit=upstream.config.max_connections, ttl_dns_cache=300, enable_cleanup_closed=True
            )
            self._sessions[name] = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=True,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=upstream.config.connect_timeout_s or server.connect_timeout_s,
                    sock_read=upstream.config.timeout_s or server.upstream_timeout_s,
                ),
                skip_auto_headers=("User-Agent",),
            )

    async def close(self) -> None:
        """Wait for post-response work (token counts), then close upstream connections."""
        if self._background:
            await asyncio.wait(self._background, timeout=self.config.server.shutdown_timeout_s or None)
        for session in self._sessions.values():
            await session.close()

    # --- one request -----------------------------------------------------------------------------------------

    async def handle(self, req: InboundRequest, out: Responder) -> None:
        match = match_endpoint(req.method, req.path) or unknown_route(req.path)
        ctx = RequestContext(
            request_id=f"{self._id_prefix}-{next(self._ids)}",
            started=time.perf_counter(),
            started_at=self.clock(),
            match=match,
        )
        self.in_flight += 1
        try:
            await self._handle(req, out, ctx)
        except asyncio.CancelledError:
            # Shutdown gave up waiting for this request: record what is known before the task ends.
            self._emit_unfinished(ctx, 499, "cancelled")
            raise
        except Exception:
            log.exception("request %s failed inside the gateway", ctx.request_id)
            self._emit_unfinished(ctx, 500, "gateway_error")
            if not out.started:
                with contextlib.suppress(Exception):
                    err = GatewayError(500, "gateway_error", "metergate failed on this request.")
                    await self._send_error(out, ctx, err)
        finally:
            self.in_flight -= 1

    async def _handle(self, req: InboundRequest, out: Responder, ctx: RequestContext) -> None:
        endpoint = ctx.match.endpoint
        ctx.request_body = req.body
        ctx.principal = self.keys.authenticate(req.headers, req.query)
        if ctx.principal is None:
            err = GatewayError(
                401, "unauthorized", "Invalid or missing API key: use a key issued by the metergate gateway."
            )
            await self._fail(out, ctx, err)
            return
        try:
            # A path that matched a fixed route is one of the gateway's own: only headers remain to check.
            refusal = req.refusal or refuse_request(req.path, req.headers, checked_path=ctx.match.static)
            if refusal is not None:
                raise refusal
            if endpoint.operation == "unknown":
                raise GatewayError(404, "unknown_route", f"Unknown route: {req.method} {bounded(req.path)}")
            if endpoint.operation in ("models", "model"):
                await self._list_models(out, ctx, ctx.match.path_model)
                return
            adapter = API_ADAPTERS[ctx.family]
            adapter.vet_request(endpoint, req.query, req.headers)
            ctx.raw_body = await req.body.read()
            encoding = req.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise GatewayError(
                    415, "unsupported_encoding", "metergate reads the request body: send it uncompressed."
                )
            ctx.body = _json_object(ctx.raw_body)
            ctx.facts = facts = adapter.request_facts(endpoint, ctx.body, ctx.match.path_model)
            ctx.route = route = self._route(ctx, facts.model)
            ctx.upstream_body = self._upstream_body(ctx, route, facts)
            if endpoint.operation not in ("embed", "batch_embed"):
                ctx.body = None  # the parsed tree can be many times the body's size: keep it no longer than needed
        except GatewayError as err:
            await self._fail(out, ctx, err)
            return
        upstream = route.upstream
        principal = ctx.principal
        ctx.provider_label = upstream.name
        # Azure deployments are labelled with the model they run, like every other provider's traffic.
        ctx.model_label = self.labels.model(
            upstream.name, upstream.config.pricing_provider_id, upstream.pricing_model(route.upstream_model)
        )
        if self.admission is not None:
            try:
                ctx.reservation = await self.admission.reserve(ctx)
            except GatewayError as err:
                await self._fail(out, ctx, err)
                return
        flight = (
            self.labels.team(principal.team),
            self.labels.app(principal.app),
            endpoint.label,
            upstream.name,
        )
        self.meter.request_started(*flight)
        try:
            await self._forward(req, out, ctx, upstream, route, facts)
        finally:
            self.meter.request_finished(*flight)

    def _route(self, ctx: RequestContext, model: str) -> Route:
        route = self.router.resolve(model, ctx.match)
        if route is None:
            raise GatewayError(
                404,
                "unknown_model",
                f"The model `{model}` does not exist or is not routed by this gateway.",
                code="model_not_found",
            )
        return route

    # --- forwarding ------------------------------------------------------------------------------------------

    def _upstream_body(self, ctx: RequestContext, route: Route, facts: RequestFacts) -> bytes | None:
        """The body to send when it must differ from the client's (alias, usage request); None: send it as is."""
        assert ctx.body is not None
        wire_model = route.upstream.wire_model(route.upstream_model)
        new_model = wire_model if wire_model != facts.model else None
        if new_model is None and not facts.inject_stream_usage:
            return None
        try:
            return orjson.dumps(API_ADAPTERS[ctx.family].upstream_body(ctx.body, facts, new_model))
        except orjson.JSONEncodeError:
            # orjson writes at most 254 levels; the provider would read what the gateway could not rewrite.
            raise GatewayError(
                400, "invalid_json", "The request body is nested too deeply for the gateway to forward."
            ) from None

    async def _forward(
        self,
        req: InboundRequest,
        out: Responder,
        ctx: RequestContext,
        upstream: Upstream,
        route: Route,
        facts: RequestFacts,
    ) -> UsageRecord:
        endpoint = ctx.match.endpoint
        body = ctx.upstream_body if ctx.upstream_body is not None else ctx.raw_body
        # Path and query go out byte for byte (encoded=True): re-encoding could change what the provider reads.
        url = URL(upstream.url(ctx.match, req.path, query_without_key(req.query), route.upstream_model), encoded=True)
        headers = [
            (k, v) for k, v in req.headers.items() if k not in _DROP_REQUEST and not k.startswith("x-metergate-")
        ]
        headers.append(("accept-encoding", "identity"))
        headers.extend(upstream.auth_headers().items())
        session = self._sessions[upstream.name]
        ctx.sent_upstream = True
        try:
            # Never follow a redirect: it would carry the provider credential to whatever host the 3xx names.
            response = await session.request(req.method, url, data=body, headers=headers, allow_redirects=False)
        except TimeoutError:
            return await self._fail(out, ctx, GatewayError(504, "upstream_timeout", "The upstream provider timed out."))
        except aiohttp.ClientConnectorError as exc:
            return await self._fail(
                out,
                ctx,
                GatewayError(
                    502,
                    "upstream_unreachable",
                    f"The upstream provider is unreachable: {exc.strerror or exc}",
                ),
            )
        except (aiohttp.ClientError, OSError) as exc:
            return await self._fail(
                out,
                ctx,
                GatewayError(502, "upstream_reset", f"The upstream connection failed: {type(exc).__name__}"),
            )
        if 300 <= response.status < 400 and "location" in response.headers:
            response.release()
            return await self._fail(
                out,
                ctx,
                GatewayError(
                    502,
                    "upstream_redirect",
                    f"The upstream provider answered {response.status} with a redirect, which the gateway does not "
                    "follow.",
                ),
            )
        async with response:
            content_type = response.headers.get("content-type", "")
            streamed = response.status < 400 and (
                "text/event-stream" in content_type or endpoint.operation == "stream_generate"
            )
            if streamed:
                sse = "text/event-stream" in content_type
                meter = ctx.stream_meter = API_ADAPTERS[ctx.family].stream_meter(endpoint, facts, sse)
                return await self._relay_stream(out, ctx, response, meter)
            return await self._relay_body(out, ctx, response)

    async def _relay_body(self, out: Responder, ctx: RequestContext, response: aiohttp.ClientResponse) -> UsageRecord:
        endpoint = ctx.match.endpoint
        try:
            data = await response.read()
        except TimeoutError:
            return await self._fail(out, ctx, GatewayError(504, "upstream_timeout", "The upstream provider timed out."))
        except (aiohttp.ClientError, OSError) as exc:
            return await self._fail(
                out,
                ctx,
                GatewayError(502, "upstream_reset", f"The upstream connection failed: {type(exc).__name__}"),
            )
        status = response.status
        usage = Usage()
        error_type = None
        count_later = False
        if status >= 400:
            error_type = _upstream_error_type(status)
        elif endpoint.billed:
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError:
                return await self._fail(
                    out,
                    ctx,
                    GatewayError(
                        502,
                        "upstream_malformed",
                        "The upstream provider returned a response that is not JSON.",
                    ),
                )
            try:
                usage = API_ADAPTERS[ctx.family].usage_from_body(endpoint, parsed, ctx.facts)
            except UsageError as exc:
                if ctx.family == "gemini" and endpoint.operation in ("embed", "batch_embed"):
                    count_later = True
                else:
                    return await self._fail(
                        out,
                        ctx,
                        GatewayError(
                            502,
                            "upstream_malformed_usage",
                            f"The upstream provider's usage could not be metered: {exc}",
                        ),
                    )
        record = self._record(ctx, status, usage, error_type, stream=False)
        headers = _relay_headers(response)
        headers.append((REQUEST_ID_HEADER, ctx.request_id.encode()))
        if not count_later:
            headers.append((COST_HEADER, format(record.cost_usd, "f").encode()))
        await out.start(status, headers)
        await out.send(data)
        if out.disconnected:
            record.code = 499
            record.error_type = record.error_type or "client_disconnected"
        if count_later:
            self._spawn(self._count_then_record(ctx, record))
            return record
        record.latency_s = time.perf_counter() - ctx.started
        self._emit(record, ctx)
        return record

    async def _relay_stream(
        self, out: Responder, ctx: RequestContext, response: aiohttp.ClientResponse, meter: StreamMeter
    ) -> UsageRecord:
        await out.start(response.status, [*_relay_headers(response), (REQUEST_ID_HEADER, ctx.request_id.encode())])
        error_type: str | None = None
        error_message = ""
        content = response.content
        loop = asyncio.get_running_loop()
        drain_deadline: float | None = None  # set when the client hangs up before the provider finished
        try:
            while True:
                if drain_deadline is None:
                    chunk = await content.readany()
                else:
                    async with asyncio.timeout_at(drain_deadline):
                        chunk = await content.readany()
                if not chunk:
                    break
                if ctx.ttft is None:
                    ctx.ttft = time.perf_counter() - ctx.started
                relayed = meter.feed(chunk)
                if drain_deadline is None:
                    if relayed:
                        await out.send(relayed, more=True)
                    if out.disconnected and not meter.finished:
                        drain_deadline = loop.time() + self.config.server.drain_timeout_s
        except TimeoutError:
            if drain_deadline is not None and loop.time() >= drain_deadline:
                error_type = "drain_timeout"
                log.warning("request %s: gave up reading the upstream after the client left", ctx.request_id)
            else:
                error_type, error_message = "upstream_timeout", "The upstream provider timed out mid-stream."
        except (aiohttp.ClientError, OSError) as exc:
            error_type, error_message = "upstream_reset", f"The upstream stream broke: {type(exc).__name__}"
        tail = meter.flush()
        metered = True
        try:
            usage = meter.usage()
        except UsageError as exc:
            usage, metered = Usage(), False
            if error_type is None:
                # The stream itself ended cleanly: the client has its whole answer, which the gateway never
                # damages. The request is recorded as unmetered (llm_unmetered_requests_total) for alerting.
                error_type = "usage_missing" if isinstance(exc, UsageMissing) else "upstream_malformed_usage"
            log.warning("request %s: usage not metered: %s", ctx.request_id, bounded(str(exc)))
        else:
            if not meter.finished:
                # The provider's closing figures never came (the client left and the drain gave up, the stream
                # broke): what it reported so far is a lower bound, and budgets keep the rest reserved.
                usage.flag(INCOMPLETE)
            metered = INCOMPLETE not in usage.flags
        code = response.status
        if error_type in (None, "usage_missing") and meter.upstream_error is not None:
            error_type = "upstream_stream_error"
        if drain_deadline is not None:
            code = 499
            error_type = error_type or "client_disconnected"
        else:
            if error_type == "upstream_timeout":
                code = 504
            elif error_type == "upstream_reset":
                code = 502
            if error_message:
                await out.send(stream_error_event(ctx.family, ctx.match.endpoint.operation, error_message), more=True)
            if tail:
                await out.send(tail, more=True)
            await out.send(b"")
        record = self._record(ctx, code, usage, error_type, stream=True)
        record.metered = metered
        record.latency_s = time.perf_counter() - ctx.started
        record.ttft_s = ctx.ttft
        self._emit(record, ctx)
        return record

    async def _count_then_record(self, ctx: RequestContext, record: UsageRecord) -> None:
        """A Gemini embedding response without usage (older API): ask the free countTokens for the same content."""
        assert ctx.route is not None and ctx.body is not None
        upstream = ctx.route.upstream
        body = GeminiApi.token_count_body(ctx.match.endpoint, ctx.body)
        usage: Usage | None = None
        if body is not None and isinstance(upstream, GeminiUpstream):
            version = ctx.match.endpoint.label.split("/")[1]
            url = upstream.count_tokens_url(ctx.route.upstream_model, version)
            try:
                async with self._sessions[upstream.name].post(
                    url, json=body, headers=upstream.auth_headers(), allow_redirects=False
                ) as resp:
                    if resp.status == 200:
                        usage = GeminiApi.usage_from_token_count(await resp.json(content_type=None))
            except (aiohttp.ClientError, OSError, TimeoutError, UsageError, ValueError) as exc:
                log.warning("request %s: countTokens failed: %s", ctx.request_id, exc)
        if usage is None:
            record.metered = False
            record.error_type = record.error_type or "usage_missing"
        else:
            self._price_into(record, ctx, usage)
        record.latency_s = time.perf_counter() - ctx.started
        self._emit(record, ctx)

    # --- recording -------------------------------------------------------------------------------------------

    def _record(
        self, ctx: RequestContext, code: int, usage: Usage, error_type: str | None, stream: bool
    ) -> UsageRecord:
        principal = ctx.principal
        team = self.labels.team(principal.team) if principal else UNAUTHENTICATED
        app = self.labels.app(principal.app) if principal else UNAUTHENTICATED
        route = ctx.route
        record = UsageRecord(
            request_id=ctx.request_id,
            started_at=ctx.started_at,
            team=team,
            app=app,
            key_id=principal.key_id if principal else "",
            provider=ctx.provider_label,
            model=ctx.model_label,
            upstream_model=route.upstream_model if route else (ctx.facts.model if ctx.facts else ""),
            endpoint=ctx.match.endpoint.label,
            code=code,
            stream=stream,
            error_type=error_type,
        )
        self._price_into(record, ctx, usage)
        return record

    def _price_into(self, record: UsageRecord, ctx: RequestContext, usage: Usage) -> None:
        record.usage = usage
        route = ctx.route
        if route is None or usage.is_empty():
            record.set_cost(_ZERO)
            return
        upstream = route.upstream
        quote = self.prices.quote(
            upstream.name,
            upstream.config.pricing_provider_id,
            upstream.pricing_model(route.upstream_model),
            _served_from(usage, upstream),
            datetime.fromtimestamp(ctx.started_at, UTC),
        )
        record.set_cost(quote.usd, quote.complete, quote.notes)

    def _emit(self, record: UsageRecord, ctx: RequestContext) -> None:
        """Count a finished request everywhere it must be counted, exactly once."""
        if ctx.emitted:
            return
        ctx.emitted = True
        self.meter.record(record)
        if self.admission is not None:
            self.admission.settle(ctx.reservation, record)
        if ctx.principal is None:
            # No key, nothing sent upstream, nobody to bill: counted in the metrics, never a ledger row (a flood of
            # them would otherwise fill the database, or the spool during an outage, at no cost to the sender).
            return
        for sink in self.sinks:
            try:
                sink(record)
            except Exception:  # a broken sink must not lose the record for the others
                log.exception("record sink failed for request %s", record.request_id)

    async def _fail(self, out: Responder, ctx: RequestContext, err: GatewayError) -> UsageRecord:
        record = self._record(ctx, err.status, Usage(), err.error_type, stream=bool(ctx.facts and ctx.facts.stream))
        # Once the request went out, the provider may have billed work whose usage never reached us.
        record.metered = not ctx.sent_upstream
        record.latency_s = time.perf_counter() - ctx.started
        self._emit(record, ctx)  # before writing: a client gone mid-write must not lose the record
        await self._send_error(out, ctx, err)
        return record

    def _emit_unfinished(self, ctx: RequestContext, code: int, error_type: str) -> None:
        """Record a request the gateway could not finish, with whatever usage the provider reported so far."""
        if ctx.emitted:
            return
        usage = Usage()
        if ctx.stream_meter is not None:
            with contextlib.suppress(UsageError):
                usage = ctx.stream_meter.usage()
        record = self._record(ctx, code, usage, error_type, stream=bool(ctx.facts and ctx.facts.stream))
        # Unfinished after the request went out: the provider's final bill is unknown.
        record.metered = not ctx.sent_upstream
        record.latency_s = time.perf_counter() - ctx.started
        record.ttft_s = ctx.ttft
        self._emit(record, ctx)

    async def _send_error(self, out: Responder, ctx: RequestContext, err: GatewayError) -> None:
        headers = [*_JSON, *((k.encode(), v.encode()) for k, v in err.headers.items())]
        headers.append((REQUEST_ID_HEADER, ctx.request_id.encode()))
        if ctx.request_body is not None and not ctx.request_body.finished:
            # Answered without reading the body: closing beats reading the rest of an unwanted upload.
            headers.append((b"connection", b"close"))
        await out.start(err.status, headers)
        await out.send(error_body(ctx.family, err))

    async def _list_models(self, out: Responder, ctx: RequestContext, model_id: str | None) -> None:
        """The model list, or one model of it (OpenAI's models.retrieve)."""
        if self._models_body is None:
            self._models_body = self._build_models_body()
        body = self._models_body
        if model_id is not None:
            found = next((m for m in orjson.loads(body)["data"] if m["id"] == model_id), None)
            if found is None:
                err = GatewayError(
                    404, "unknown_model", f"The model `{model_id}` is not served here.", code="model_not_found"
                )
                await self._fail(out, ctx, err)
                return
            body = orjson.dumps(found)
        await out.start(200, [*_JSON, (REQUEST_ID_HEADER, ctx.request_id.encode())])
        await out.send(body)
        record = self._record(ctx, 200, Usage(), None, stream=False)
        record.latency_s = time.perf_counter() - ctx.started
        self._emit(record, ctx)

    def _build_models_body(self) -> bytes:
        seen: dict[str, str] = {}
        for route in self.config.routes:
            if not route.is_glob:
                seen.setdefault(route.model, route.provider)
                continue
            upstream = self.upstreams[route.provider]
            if upstream.family != "openai":
                continue
            for model_id in self.prices.catalogue_models(upstream.config.pricing_provider_id):
                if route.matches(model_id):
                    seen.setdefault(model_id, route.provider)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": p} for m, p in seen.items()]
        return orjson.dumps({"object": "list", "data": data})

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


# Parsed, a body of empty objects takes ~30 times its size in memory: past this many the body is refused.
MAX_JSON_CONTAINERS = 1_000_000
# A key the gateway reads, given twice: parsers disagree on which one counts (last here, first in some), so such a
# body is refused rather than priced as one model and run as another. Escaped ASCII in a key can hide a repeat.
_READ_KEYS = (b'"model"', b'"stream"')
_ESCAPED_ASCII = re.compile(rb"\\u00(?:6[1-9a-fA-F]|7[0-9aA])")  # an escaped a-z


def _json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise GatewayError(400, "invalid_json", "The request body is empty; expected a JSON object.")
    if len(body) > 1_000_000 and body.count(b"{") + body.count(b"[") > MAX_JSON_CONTAINERS:
        raise GatewayError(
            400, "invalid_json", f"The request body holds more than {MAX_JSON_CONTAINERS:,} JSON objects and arrays."
        )
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, "invalid_json", f"The request body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise GatewayError(400, "invalid_json", "The request body must be a JSON object.")
    if any(body.count(key) > 1 for key in _READ_KEYS) or (b"\\u00" in body and _ESCAPED_ASCII.search(body)):
        _refuse_repeated_keys(body)
    return parsed


def _refuse_repeated_keys(body: bytes) -> None:
    """Refuses a body where one object gives the same key twice (the slow, exact check, run only when a cheap
    scan says it may happen)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in items:
            if key in seen:
                raise GatewayError(400, "invalid_json", f"The request body gives the key {bounded(key, 40)!r} twice.")
            seen.add(key)
        return dict(items)

    # orjson accepted the body: a difference in what the two parsers allow is not about repeated keys.
    with contextlib.suppress(ValueError, RecursionError):
        json.loads(body, object_pairs_hook=pairs)


def _relay_headers(response: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    # The raw bytes as the provider sent them: decoding and re-encoding could fail on a non-Latin-1 value.
    return [(k.lower(), v) for k, v in response.raw_headers if k.lower() not in _DROP_RESPONSE_BYTES]


def _served_from(usage: Usage, upstream: Upstream) -> Usage:
    """The usage with the serving region the upstream implies, when the response cannot say it (OpenAI data
    residency endpoints: us., eu., ae.api.openai.com)."""
    region = upstream.region
    if region is None or usage.region is not None:
        return usage
    return replace(
        usage, region=region, parts=tuple(replace(p, usage=replace(p.usage, region=region)) for p in usage.parts)
    )


def _upstream_error_type(status: int) -> str:
    if status == 429:
        return "upstream_rate_limited"
    return "upstream_client_error" if status < 500 else "upstream_server_error"
