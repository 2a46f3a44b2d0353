"""The forwarder: every route the gateway does not meter as it passes (files, batches, vector stores, model lists,
fine-tuning...) goes to the provider untouched and comes back the same way, attributed and counted.

Bodies are streamed both ways, never held whole: a multi-gigabyte upload costs the gateway a few buffers. Nothing
here decodes a body as text or JSON, except the responses a `ResponseTap` must read: batch objects and results,
whose usage is billed later (`batches.py`), and responses carrying absolute provider URLs that the official SDKs
would follow with the client's gateway key, bypassing the meter (`rewrite.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from metergate.auth import query_without_key
from metergate.config import Config
from metergate.errors import GatewayError, bounded
from metergate.exchange import (
    REQUEST_ID_HEADER,
    InboundRequest,
    Recorder,
    RequestContext,
    Responder,
    UpstreamClients,
    forward_headers,
    relay_headers,
    upstream_error_type,
)
from metergate.labels import LabelPolicy
from metergate.providers import API_ADAPTERS, Upstream
from metergate.routing import Router
from metergate.usage import Usage

log = logging.getLogger("metergate.gateway")


class ResponseTap(Protocol):
    """Reads (and may rewrite) a forwarded response on its way to the client."""

    rewrites: bool  # the body relayed can differ from the provider's (then its length is recomputed)
    # The tap bills from the whole body (a batch being created): it is read to the end even when the client has
    # gone, for at most drain_timeout_s.
    drains: bool

    def response_headers(self, status: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]: ...

    def feed(self, chunk: bytes) -> bytes:
        """One chunk from the provider; returns what to relay now."""
        ...

    def finish(self, complete: bool) -> bytes:
        """The provider's body ended (`complete`: all of it arrived); returns what is left to relay."""
        ...


@dataclass(frozen=True, slots=True)
class TapRequest:
    """What a tap may need to know about the call it reads."""

    ctx: RequestContext
    req: InboundRequest
    upstream: Upstream
    public_url: str  # the gateway's base URL as the client reached it


TapFactory = Callable[[TapRequest], ResponseTap | None]
# Work that must happen before a call is forwarded (billing a batch's results before they are deleted); returns the
# refusal to answer instead, if the call must not go through yet.
PreForward = Callable[[TapRequest], Awaitable[GatewayError | None]]


class Passthrough:
    """The handler for `free`, `deferred`, `unmetered` and `refuse` routes."""

    def __init__(
        self,
        config: Config,
        labels: LabelPolicy,
        router: Router,
        clients: UpstreamClients,
        recorder: Recorder,
        taps: Mapping[str, TapFactory] | None = None,
        before: Mapping[str, PreForward] | None = None,
    ) -> None:
        self.config = config
        self.labels = labels
        self.router = router
        self.clients = clients
        self.recorder = recorder
        self.taps = dict(taps or {})
        self.before = dict(before or {})

    async def handle(self, req: InboundRequest, out: Responder, ctx: RequestContext) -> None:
        endpoint = ctx.match.endpoint
        recorder = self.recorder
        try:
            upstream = self._admit(req, ctx)
        except GatewayError as err:
            await recorder.fail(out, ctx, err)
            return
        ctx.provider_label = upstream.name
        model = ctx.match.params.get("model")
        if model:
            ctx.model_label = self.labels.model(upstream.name, upstream.config.pricing_provider_id, model)
        if recorder.admission is not None and endpoint.handling != "free":
            # Calls that spend (now or later, through the batch they create) are refused past a block budget.
            try:
                ctx.reservation = await recorder.admission.reserve(ctx)
            except GatewayError as err:
                await recorder.fail(out, ctx, err)
                return
        assert ctx.principal is not None
        flight = (
            self.labels.team(ctx.principal.team),
            self.labels.app(ctx.principal.app),
            endpoint.label,
            upstream.name,
        )
        recorder.meter.request_started(*flight)
        try:
            await self._forward(req, out, ctx, upstream)
        finally:
            recorder.meter.request_finished(*flight)

    def _admit(self, req: InboundRequest, ctx: RequestContext) -> Upstream:
        """The provider to forward to, or the reason the call is not forwarded."""
        endpoint = ctx.match.endpoint
        server = self.config.server
        if endpoint.handling == "refuse":
            raise GatewayError(
                403,
                "forbidden_route",
                f"metergate does not forward {endpoint.label}: organisation administration needs the provider's own "
                "admin credentials, never a gateway key.",
            )
        if endpoint.operation == "unknown" and server.unknown_paths == "refuse":
            raise GatewayError(404, "unknown_route", f"Unknown route: {req.method} {bounded(req.path)}")
        if endpoint.handling == "unmetered" and endpoint.operation != "unknown" and server.unmetered_routes == "refuse":
            raise GatewayError(
                403,
                "unmetered_route",
                f"{endpoint.label} is billed in a way metergate cannot meter, and this gateway refuses such calls.",
            )
        if endpoint.tap is not None:
            API_ADAPTERS[ctx.family].vet_forwarded(endpoint, req.query, req.headers)
        model = ctx.match.params.get("model")
        # A route naming a model (a Gemini batch, Veo) goes only where the routes send that model.
        upstream = (
            self.router.require(model, ctx.match).upstream if model else self.router.for_path(req.path, ctx.match)
        )
        if upstream is None:
            raise GatewayError(
                404,
                "no_provider",
                f"No configured provider serves the {ctx.family} API for {bounded(req.path)}.",
            )
        return upstream

    async def _forward(self, req: InboundRequest, out: Responder, ctx: RequestContext, upstream: Upstream) -> None:
        endpoint = ctx.match.endpoint
        request = TapRequest(ctx, req, upstream, self._public_url(req))
        hook = self.before.get(f"{req.method} {endpoint.tap}") if endpoint.tap else None
        if hook is not None and (refusal := await hook(request)) is not None:
            await self.recorder.fail(out, ctx, refusal)
            return
        factory = self.taps.get(endpoint.tap) if endpoint.tap else None
        tap = factory(request) if factory is not None else None
        # A tap reads the body: ask for it uncompressed. Otherwise the client's own encoding goes through untouched.
        headers = forward_headers(req.headers, upstream, identity=tap is not None)
        body = None
        if not req.body.finished:
            body = req.body.stream()
            if req.body.declared_length is not None:
                # Kept so the provider sees the same framing (and can refuse an oversized upload at once).
                headers.append(("content-length", str(req.body.declared_length)))
        url = upstream.url(ctx.match, req.path, query_without_key(req.query), "")
        ctx.sent_upstream = True
        try:
            response = await self.clients.send(upstream, req.method, url, headers, body, decompress=tap is not None)
        except GatewayError as err:
            await self.recorder.fail(out, ctx, req.body.error or err)
            return
        async with response:
            await self._relay(out, ctx, response, tap, req)

    async def _relay(
        self,
        out: Responder,
        ctx: RequestContext,
        response: aiohttp.ClientResponse,
        tap: ResponseTap | None,
        req: InboundRequest,
    ) -> None:
        status = response.status
        headers = relay_headers(response, verbatim=tap is None or not tap.rewrites)
        if tap is not None:
            headers = tap.response_headers(status, headers)
        headers.append((REQUEST_ID_HEADER, ctx.request_id.encode()))
        if not req.body.finished:
            headers.append((b"connection", b"close"))  # the provider answered before reading the whole upload
        await out.start(status, headers)
        error_type = upstream_error_type(status) if status >= 400 else None
        complete = False
        drain = tap is not None and tap.drains
        deadline: float | None = None
        try:
            async for chunk in response.content.iter_any():
                if ctx.ttft is None:
                    ctx.ttft = time.perf_counter() - ctx.started
                if tap is not None:
                    chunk = tap.feed(chunk)
                if deadline is None:
                    if chunk:
                        await out.send(chunk, more=True)
                    if out.disconnected:
                        if not drain:
                            break
                        deadline = time.monotonic() + self.config.server.drain_timeout_s
                elif time.monotonic() > deadline:
                    break
            else:
                complete = True
        except TimeoutError:
            error_type = "upstream_timeout"
        except (aiohttp.ClientError, OSError) as exc:
            error_type = "upstream_reset"
            log.warning("request %s: the upstream response broke: %s", ctx.request_id, type(exc).__name__)
        tail = tap.finish(complete) if tap is not None else b""
        await out.send(tail)
        code = status
        if out.disconnected and (deadline is not None or not complete):
            code, error_type = 499, error_type or "client_disconnected"
        elif error_type in ("upstream_timeout", "upstream_reset"):
            code = 504 if error_type == "upstream_timeout" else 502
        record = self.recorder.record(ctx, code, Usage(), error_type, stream=False)
        # What the provider bills for these calls is not in their response: say so, so it shows and alerts.
        record.metered = ctx.match.endpoint.handling != "unmetered" or status >= 400
        record.latency_s = time.perf_counter() - ctx.started
        record.ttft_s = ctx.ttft
        self.recorder.emit(record, ctx)

    def _public_url(self, req: InboundRequest) -> str:
        configured = self.config.server.public_url
        if configured is not None:
            return configured
        host = req.headers.get("host", "")
        if not host or not _HOST_CHARS.issuperset(host):
            host = self.config.server.listen
        return f"http://{host}"


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[]")
