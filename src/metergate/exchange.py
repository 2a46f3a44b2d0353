"""What every kind of request shares: the request and response interfaces the HTTP edge implements, the context a
request accumulates, recording (price, count, settle, store: exactly once), and the upstream HTTP clients.

The handlers (`gateway.py` for the metered relay, `passthrough.py` for forwarded routes, `realtime.py` for
WebSocket sessions, `batches.py` for batch results) are built on these and never on each other.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

import aiohttp
from yarl import URL

from metergate.attribution import NO_ATTRIBUTION, Attribution
from metergate.auth import Principal
from metergate.config import Config
from metergate.endpoints import EndpointMatch, Family
from metergate.errors import GatewayError, error_body
from metergate.forms import Form
from metergate.labels import OTHER, UNAUTHENTICATED, LabelPolicy
from metergate.metrics import Meter
from metergate.pricing import PriceBook
from metergate.providers import RequestFacts, StreamMeter, Upstream
from metergate.routing import Route
from metergate.usage import Usage, UsageError, UsageRecord

log = logging.getLogger("metergate.gateway")

# Request headers never forwarded: hop-by-hop, framing recomputed by the client library, and the client's gateway
# key (replaced by the provider credential).
DROP_REQUEST = frozenset(
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
        # Which organisation or project a provider credential acts for is the operator's choice (its own provider
        # entry), never a client's: with a multi-project credential these would let a key pick who is billed.
        "openai-organization",
        "openai-project",
        "x-goog-user-project",
    }
)
_DROP_RESPONSE = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "trailer"})
# Dropped too when the gateway may change the body it relays (it decompresses, or rewrites).
_DROP_REWRITTEN = frozenset({"content-length", "content-encoding"})
_DROP_RESPONSE_BYTES = frozenset(h.encode() for h in _DROP_RESPONSE | _DROP_REWRITTEN)
_DROP_VERBATIM_BYTES = frozenset(h.encode() for h in _DROP_RESPONSE)
COST_HEADER = b"x-metergate-cost-usd"
REQUEST_ID_HEADER = b"x-metergate-request-id"
JSON_HEADERS = [(b"content-type", b"application/json")]
_ZERO = Decimal(0)


class RequestBody(Protocol):
    """The request body, read on demand (implemented by the HTTP edge)."""

    @property
    def finished(self) -> bool:
        """Every byte of the body has been read (or there was none)."""
        ...

    @property
    def declared_length(self) -> int | None:
        """The Content-Length the client sent, if any."""
        ...

    @property
    def error(self) -> GatewayError | None:
        """What `stream` raised, if it did (the HTTP client forwarding it reports only a broken upload)."""
        ...

    async def read(self) -> bytes:
        """The whole body, for the gateway to parse; raises GatewayError (413 too large, 408 too slow, 499 client
        gone)."""
        ...

    def stream(self) -> AsyncIterator[bytes]:
        """The body chunk by chunk as it arrives, for forwarding without holding it; raises like `read` (with the
        larger limit for streamed bodies)."""
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
    """Where a handler writes the response; implemented by the HTTP edge."""

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
    """What is known about a request so far; filled in as it moves through a handler."""

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
    form: Form | None = None  # a multipart request's text fields, where they sit
    raw_body: bytes | None = None
    upstream_body: bytes | None = None  # set when the body sent upstream differs from the client's
    request_body: RequestBody | None = None
    ttft: float | None = None
    reservation: object | None = None
    attribution: Attribution = NO_ATTRIBUTION
    include_cost: bool = False  # the caller opted in to the cost in the response (costfield.py)
    sent_upstream: bool = False  # the provider may have billed something from here on
    stream_meter: StreamMeter | None = None
    emitted: bool = False

    @property
    def family(self) -> Family:
        return self.match.endpoint.family


class Recorder:
    """Turns what a handler learned into one UsageRecord, priced, and counts it everywhere exactly once: metrics,
    budgets, then the ledger (and any other sink)."""

    def __init__(
        self,
        labels: LabelPolicy,
        prices: PriceBook,
        meter: Meter,
        sinks: list[RecordSink] | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.labels = labels
        self.prices = prices
        self.meter = meter
        self.sinks = sinks or []
        self.admission = admission

    def record(self, ctx: RequestContext, code: int, usage: Usage, error_type: str | None, stream: bool) -> UsageRecord:
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
            user=ctx.attribution.user,
            tags=ctx.attribution.tags,
        )
        self.price_into(record, ctx, usage)
        return record

    def price_into(self, record: UsageRecord, ctx: RequestContext, usage: Usage) -> None:
        route = ctx.route
        if route is None or usage.is_empty():
            record.usage = usage
            record.set_cost(_ZERO)
            return
        self.price_usage(record, route.upstream, route.upstream_model, usage, ctx.started_at)

    def price_usage(self, record: UsageRecord, upstream: Upstream, model: str, usage: Usage, at: float) -> None:
        """Price `usage` of `model` at `upstream`, as of unix time `at`, into the record."""
        record.usage = usage
        quote = self.prices.quote(
            upstream.name,
            upstream.config.pricing_provider_id,
            upstream.pricing_model(model),
            served_from(usage, upstream),
            datetime.fromtimestamp(at, UTC),
        )
        record.set_cost(quote.usd, quote.complete, quote.notes)

    def emit(self, record: UsageRecord, ctx: RequestContext | None = None, reservation: object | None = None) -> None:
        """Count a finished request everywhere it must be counted, exactly once (per context)."""
        if ctx is not None:
            if ctx.emitted:
                return
            ctx.emitted = True
            reservation = ctx.reservation
        self.meter.record(record)
        if self.admission is not None:
            self.admission.settle(reservation, record)
        if not record.key_id and record.team == UNAUTHENTICATED:
            # No key, nothing sent upstream, nobody to bill: counted in the metrics, never a ledger row (a flood of
            # them would otherwise fill the database, or the spool during an outage, at no cost to the sender).
            return
        for sink in self.sinks:
            try:
                sink(record)
            except Exception:  # a broken sink must not lose the record for the others
                log.exception("record sink failed for request %s", record.request_id)

    async def fail(self, out: Responder, ctx: RequestContext, err: GatewayError) -> UsageRecord:
        """Record a request the gateway answers with an error of its own, then answer it."""
        record = self.record(ctx, err.status, Usage(), err.error_type, stream=bool(ctx.facts and ctx.facts.stream))
        # Once the request went out, the provider may have billed work whose usage never reached us.
        record.metered = not ctx.sent_upstream
        record.latency_s = time.perf_counter() - ctx.started
        self.emit(record, ctx)  # before writing: a client gone mid-write must not lose the record
        await send_error(out, ctx, err)
        return record

    def emit_unfinished(self, ctx: RequestContext, code: int, error_type: str) -> None:
        """Record a request the gateway could not finish, with whatever usage the provider reported so far."""
        if ctx.emitted:
            return
        usage = Usage()
        if ctx.stream_meter is not None:
            with contextlib.suppress(UsageError):
                usage = ctx.stream_meter.usage()
        record = self.record(ctx, code, usage, error_type, stream=bool(ctx.facts and ctx.facts.stream))
        # Unfinished after the request went out: the provider's final bill is unknown.
        record.metered = not ctx.sent_upstream
        record.latency_s = time.perf_counter() - ctx.started
        record.ttft_s = ctx.ttft
        self.emit(record, ctx)


async def send_error(out: Responder, ctx: RequestContext, err: GatewayError) -> None:
    headers = [*JSON_HEADERS, *((k.encode(), v.encode()) for k, v in err.headers.items())]
    headers.append((REQUEST_ID_HEADER, ctx.request_id.encode()))
    if ctx.request_body is not None and not ctx.request_body.finished:
        # Answered without reading the body: closing beats reading the rest of an unwanted upload.
        headers.append((b"connection", b"close"))
    await out.start(err.status, headers)
    await out.send(error_body(ctx.family, err))


class UpstreamClients:
    """One HTTP connection pool per configured provider."""

    def __init__(self, config: Config, upstreams: Mapping[str, Upstream]) -> None:
        self.config = config
        self.upstreams = upstreams
        self._sessions: dict[str, aiohttp.ClientSession] = {}

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

    def session(self, upstream: Upstream) -> aiohttp.ClientSession:
        return self._sessions[upstream.name]

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()

    async def send(
        self,
        upstream: Upstream,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        data: Any = None,
        *,
        decompress: bool = True,
    ) -> aiohttp.ClientResponse:
        """Send one request upstream; connection failures and redirects become the gateway's own errors.

        The URL goes out byte for byte (encoded=True): re-encoding could change what the provider reads."""
        try:
            # Never follow a redirect: it would carry the provider credential to whatever host the 3xx names.
            response = await self.session(upstream).request(
                method,
                URL(url, encoded=True),
                data=data,
                headers=headers,
                allow_redirects=False,
                auto_decompress=decompress,
            )
        except TimeoutError:
            raise GatewayError(504, "upstream_timeout", "The upstream provider timed out.") from None
        except aiohttp.ClientConnectorError as exc:
            raise GatewayError(
                502, "upstream_unreachable", f"The upstream provider is unreachable: {exc.strerror or exc}"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise GatewayError(502, "upstream_reset", f"The upstream connection failed: {type(exc).__name__}") from None
        if 300 <= response.status < 400 and "location" in response.headers:
            response.release()
            raise GatewayError(
                502,
                "upstream_redirect",
                f"The upstream provider answered {response.status} with a redirect, which the gateway does not follow.",
            )
        return response


def forward_headers(headers: Mapping[str, str], upstream: Upstream, *, identity: bool = True) -> list[tuple[str, str]]:
    """The client's headers as the provider should see them: the gateway key replaced by the provider credential,
    hop-by-hop and metergate's own headers dropped. `identity`: ask for an uncompressed response (the gateway reads
    it); otherwise the client's own Accept-Encoding goes through with the body relayed as it comes."""
    out = [(k, v) for k, v in headers.items() if k not in DROP_REQUEST and not k.startswith("x-metergate-")]
    if identity:
        out.append(("accept-encoding", "identity"))
    elif "accept-encoding" in headers:
        out.append(("accept-encoding", headers["accept-encoding"]))
    out.extend(upstream.auth_headers().items())
    return out


def relay_headers(response: aiohttp.ClientResponse, *, verbatim: bool = False) -> list[tuple[bytes, bytes]]:
    """The provider's response headers to relay, as raw bytes (decoding and re-encoding could fail on a
    non-Latin-1 value). `verbatim`: the body is relayed byte for byte, so its length and encoding stay."""
    drop = _DROP_VERBATIM_BYTES if verbatim else _DROP_RESPONSE_BYTES
    return [(k.lower(), v) for k, v in response.raw_headers if k.lower() not in drop]


def served_from(usage: Usage, upstream: Upstream) -> Usage:
    """The usage with the serving region the upstream implies, when the response cannot say it (OpenAI data
    residency endpoints: us., eu., ae.api.openai.com)."""
    region = upstream.region
    if region is None or usage.region is not None:
        return usage
    return replace(
        usage, region=region, parts=tuple(replace(p, usage=replace(p.usage, region=region)) for p in usage.parts)
    )


def upstream_error_type(status: int) -> str:
    if status == 429:
        return "upstream_rate_limited"
    return "upstream_client_error" if status < 500 else "upstream_server_error"
