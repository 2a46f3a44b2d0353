"""The metered HTTP relay: one model call through the gateway: route, budget, forward, relay, meter.

The dispatcher (`dispatch.py`) hands each request here, authenticated, as an `InboundRequest` with a `Responder`
to write to, so this module knows nothing of ASGI and the edge knows nothing of providers, prices or metrics.

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
import re
import time
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any

import aiohttp
import orjson

from metergate.attribution import AttributionPolicy
from metergate.auth import query_without_key
from metergate.config import Config
from metergate.costfield import BODY_USAGE_PATH, body_with_cost
from metergate.errors import GatewayError, bounded, stream_error_event
from metergate.exchange import (
    COST_HEADER,
    JSON_HEADERS,
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
from metergate.forms import is_multipart, read_form, replace_field
from metergate.labels import LabelPolicy
from metergate.pricing import PriceBook
from metergate.providers import API_ADAPTERS, RequestFacts, StreamMeter, Upstream
from metergate.providers.base import MalformedResponse, SSEStreamMeter
from metergate.providers.gemini import GeminiApi, GeminiUpstream
from metergate.routing import Route, Router
from metergate.usage import INCOMPLETE, Usage, UsageError, UsageMissing, UsageNotReported, UsageRecord

log = logging.getLogger("metergate.gateway")


class Gateway:
    """The handler for `relay` routes: the calls whose usage and cost the gateway meters as they pass."""

    def __init__(
        self,
        config: Config,
        prices: PriceBook,
        labels: LabelPolicy,
        router: Router,
        clients: UpstreamClients,
        recorder: Recorder,
        attribution: AttributionPolicy | None = None,
    ) -> None:
        self.config = config
        self.attribution = attribution or AttributionPolicy(config.attribution.tags)
        self.prices = prices
        self.labels = labels
        self.router = router
        self.upstreams = clients.upstreams
        self.clients = clients
        self.recorder = recorder
        self._background: set[asyncio.Task[None]] = set()
        self._models_body: bytes | None = None

    async def close(self) -> None:
        """Wait for post-response work (token counts)."""
        if self._background:
            await asyncio.wait(self._background, timeout=self.config.server.shutdown_timeout_s or None)

    # --- one request -----------------------------------------------------------------------------------------

    async def handle(self, req: InboundRequest, out: Responder, ctx: RequestContext) -> None:
        endpoint = ctx.match.endpoint
        recorder = self.recorder
        try:
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
            fields = adapter.form_fields(endpoint)
            content_type = req.headers.get("content-type", "")
            if fields is not None and is_multipart(content_type):
                ctx.form = read_form(content_type, ctx.raw_body, fields)
                ctx.body = dict(ctx.form.fields)
            else:
                ctx.body = _json_object(ctx.raw_body)
            upload = ctx.form.file_bytes if ctx.form is not None else 0
            ctx.facts = facts = adapter.request_facts(endpoint, ctx.body, ctx.match.path_model, upload)
            if facts.unmetered is not None and self.config.server.unmetered_routes == "refuse":
                raise GatewayError(
                    403,
                    "unmetered_route",
                    f"This request's answer carries no usage ({facts.unmetered}), and this gateway refuses such calls.",
                )
            if facts.end_user is not None:
                ctx.attribution = self.attribution.with_body_user(ctx.attribution, facts.end_user)
            ctx.route = route = self.router.require(facts.model, ctx.match)
            ctx.upstream_body = self._upstream_body(ctx, route, facts)
            if endpoint.operation not in ("embed", "batch_embed"):
                ctx.body = None  # the parsed tree can be many times the body's size: keep it no longer than needed
        except GatewayError as err:
            await recorder.fail(out, ctx, err)
            return
        upstream = route.upstream
        principal = ctx.principal
        assert principal is not None
        ctx.provider_label = upstream.name
        # Azure deployments are labelled with the model they run, like every other provider's traffic.
        ctx.model_label = self.labels.model(
            upstream.name, upstream.config.pricing_provider_id, upstream.pricing_model(route.upstream_model)
        )
        if recorder.admission is not None:
            try:
                ctx.reservation = await recorder.admission.reserve(ctx)
            except GatewayError as err:
                await recorder.fail(out, ctx, err)
                return
        flight = (
            self.labels.team(principal.team),
            self.labels.app(principal.app),
            endpoint.label,
            upstream.name,
        )
        recorder.meter.request_started(*flight)
        try:
            await self._forward(req, out, ctx, upstream, route, facts)
        finally:
            recorder.meter.request_finished(*flight)

    # --- forwarding ------------------------------------------------------------------------------------------

    def _upstream_body(self, ctx: RequestContext, route: Route, facts: RequestFacts) -> bytes | None:
        """The body to send when it must differ from the client's (alias, usage request); None: send it as is."""
        assert ctx.body is not None
        wire_model = route.upstream.wire_model(route.upstream_model)
        new_model = wire_model if wire_model != facts.model else None
        if ctx.form is not None:
            # Multipart: only the model field's bytes change, the rest (files, boundaries) goes out as sent.
            if new_model is None or "model" not in ctx.form.spans or ctx.match.path_model is not None:
                return None
            assert ctx.raw_body is not None
            return replace_field(ctx.raw_body, ctx.form, "model", new_model)
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
        url = upstream.url(ctx.match, req.path, query_without_key(req.query), route.upstream_model)
        ctx.sent_upstream = True
        try:
            response = await self.clients.send(upstream, req.method, url, forward_headers(req.headers, upstream), body)
        except GatewayError as err:
            return await self.recorder.fail(out, ctx, err)
        async with response:
            content_type = response.headers.get("content-type", "")
            adapter = API_ADAPTERS[ctx.family]
            if response.status < 400 and adapter.streams(endpoint, content_type):
                sse = "text/event-stream" in content_type
                meter = ctx.stream_meter = adapter.stream_meter(endpoint, facts, sse)
                if ctx.include_cost and isinstance(meter, SSEStreamMeter):
                    meter.include_cost(lambda usage: self._cost_for(ctx, usage))
                return await self._relay_stream(out, ctx, response, meter)
            return await self._relay_body(out, ctx, response)

    async def _relay_body(self, out: Responder, ctx: RequestContext, response: aiohttp.ClientResponse) -> UsageRecord:
        endpoint = ctx.match.endpoint
        try:
            data = await response.read()
        except TimeoutError:
            return await self.recorder.fail(
                out, ctx, GatewayError(504, "upstream_timeout", "The upstream provider timed out.")
            )
        except (aiohttp.ClientError, OSError) as exc:
            return await self.recorder.fail(
                out,
                ctx,
                GatewayError(502, "upstream_reset", f"The upstream connection failed: {type(exc).__name__}"),
            )
        status = response.status
        usage = Usage()
        error_type = None
        count_later = not_reported = False
        if status >= 400:
            error_type = upstream_error_type(status)
        elif endpoint.billed:
            content_type = response.headers.get("content-type", "")
            try:
                usage = API_ADAPTERS[ctx.family].usage_from_response(endpoint, data, content_type, ctx.facts)
            except UsageNotReported as exc:
                # A response of a kind that never reports usage (a plain-text transcription): relayed as it is,
                # recorded as unmetered so it shows and alerts.
                not_reported = True
                log.info("request %s: %s", ctx.request_id, exc)
            except MalformedResponse as exc:
                return await self.recorder.fail(out, ctx, GatewayError(502, "upstream_malformed", str(exc)))
            except UsageError as exc:
                if ctx.family == "gemini" and endpoint.operation in ("embed", "batch_embed"):
                    count_later = True
                else:
                    return await self.recorder.fail(
                        out,
                        ctx,
                        GatewayError(
                            502,
                            "upstream_malformed_usage",
                            f"The upstream provider's usage could not be metered: {exc}",
                        ),
                    )
        record = self.recorder.record(ctx, status, usage, error_type, stream=False)
        record.metered = not not_reported
        headers = relay_headers(response)
        headers.append((REQUEST_ID_HEADER, ctx.request_id.encode()))
        if not count_later:
            headers.append((COST_HEADER, format(record.cost_usd, "f").encode()))
            if ctx.include_cost and status < 400 and record.priced:
                path = BODY_USAGE_PATH.get(ctx.family)
                data = (body_with_cost(data, path, float(record.cost_usd)) if path else None) or data
        await out.start(status, headers)
        await out.send(data)
        if out.disconnected:
            record.code = 499
            record.error_type = record.error_type or "client_disconnected"
        if count_later:
            self._spawn(self._count_then_record(ctx, record))
            return record
        record.latency_s = time.perf_counter() - ctx.started
        self.recorder.emit(record, ctx)
        return record

    def _cost_for(self, ctx: RequestContext, usage: Usage) -> float | None:
        """What the usage known so far costs, priced exactly as the request's record will be."""
        record = self.recorder.record(ctx, 200, replace(usage), None, stream=True)
        return float(record.cost_usd) if record.priced else None

    async def _relay_stream(
        self, out: Responder, ctx: RequestContext, response: aiohttp.ClientResponse, meter: StreamMeter
    ) -> UsageRecord:
        await out.start(response.status, [*relay_headers(response), (REQUEST_ID_HEADER, ctx.request_id.encode())])
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
        record = self.recorder.record(ctx, code, usage, error_type, stream=True)
        record.metered = metered
        record.latency_s = time.perf_counter() - ctx.started
        record.ttft_s = ctx.ttft
        self.recorder.emit(record, ctx)
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
                async with self.clients.session(upstream).post(
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
            self.recorder.price_into(record, ctx, usage)
        record.latency_s = time.perf_counter() - ctx.started
        self.recorder.emit(record, ctx)

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
                await self.recorder.fail(out, ctx, err)
                return
            body = orjson.dumps(found)
        await out.start(200, [*JSON_HEADERS, (REQUEST_ID_HEADER, ctx.request_id.encode())])
        await out.send(body)
        record = self.recorder.record(ctx, 200, Usage(), None, stream=False)
        record.latency_s = time.perf_counter() - ctx.started
        self.recorder.emit(record, ctx)

    def _build_models_body(self) -> bytes:
        seen: dict[str, str] = {}
        for route in self.config.routes:
            if route.named_model is not None:
                seen.setdefault(route.named_model, route.provider)
                continue
            if route.model is None:
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
_READ_KEYS = re.compile(
    rb'"(model|stream|stream_options|include_usage|n|best_of|max_tokens|max_completion_tokens|max_output_tokens'
    rb"|background|generationConfig|generation_config|maxOutputTokens|candidateCount|candidate_count"
    rb'|stream_format|size|quality)"\s*:'
)
_ESCAPED_ASCII = re.compile(rb"\\u00(?:6[1-9a-fA-F]|7[0-9aA])")  # an escaped a-z


def _repeats_a_read_key(body: bytes) -> bool:
    """Whether a key the gateway reads appears twice anywhere in the body (cheap, may say yes for keys in
    different objects; the exact check follows only then)."""
    seen: set[bytes] = set()
    for m in _READ_KEYS.finditer(body):
        key = m.group(1)
        if key in seen:
            return True
        seen.add(key)
    return False


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
    if _repeats_a_read_key(body) or (b"\\u00" in body and _ESCAPED_ASCII.search(body)):
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
