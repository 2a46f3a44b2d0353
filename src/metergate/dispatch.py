"""Every HTTP request's first stop: which route it is for, who sent it, and which handler serves it.

Authentication and the checks every route shares (an ambiguous path, a method-override header) happen here once;
the handler for the route's kind (`Endpoint.handling`) does the rest. A new kind of request is a new handler in
the table, never a branch inside another handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from itertools import count as counter
from typing import Protocol

from metergate.attribution import AttributionPolicy
from metergate.auth import KeyRing, Principal
from metergate.costfield import COST_HEADER_OPT_IN, wants_cost
from metergate.endpoints import Handling, match_endpoint
from metergate.errors import GatewayError
from metergate.exchange import InboundRequest, Recorder, RequestContext, Responder, send_error
from metergate.inbound import refuse_request

log = logging.getLogger("metergate.gateway")


class Handler(Protocol):
    async def handle(self, req: InboundRequest, out: Responder, ctx: RequestContext) -> None: ...


class Dispatcher:
    def __init__(
        self,
        keys: KeyRing,
        recorder: Recorder,
        handlers: Mapping[Handling, Handler],
        clock: Callable[[], float] = time.time,
        sessions: Callable[[InboundRequest], Principal | None] | None = None,
        attribution: AttributionPolicy | None = None,
    ) -> None:
        self.keys = keys
        self.attribution = attribution or AttributionPolicy(())
        # Requests that authenticate by a session the gateway opened (Gemini upload chunks carry no key).
        self.sessions = sessions
        self.recorder = recorder
        self.handlers = handlers
        self.clock = clock  # wall time; corrected to the shared ledger's clock when replicas share one
        self._ids = counter(1)
        self._id_prefix = os.urandom(4).hex()
        self.in_flight = 0

    def context(self, req: InboundRequest) -> RequestContext:
        return RequestContext(
            request_id=self.next_id(),
            started=time.perf_counter(),
            started_at=self.clock(),
            match=match_endpoint(req.method, req.path, req.headers, req.query),
            request_body=req.body,
        )

    def next_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    async def handle(self, req: InboundRequest, out: Responder) -> None:
        ctx = self.context(req)
        self.in_flight += 1
        try:
            ctx.principal = self.keys.authenticate(req.headers, req.query)
            if ctx.principal is None and self.sessions is not None:
                ctx.principal = self.sessions(req)
            if ctx.principal is None:
                err = GatewayError(
                    401, "unauthorized", "Invalid or missing API key: use a key issued by the metergate gateway."
                )
                await self.recorder.fail(out, ctx, err)
                return
            # A path that matched a fixed route is one of the gateway's own: only headers remain to check.
            refusal = req.refusal or refuse_request(req.path, req.headers, checked_path=ctx.match.static)
            if refusal is not None:
                await self.recorder.fail(out, ctx, refusal)
                return
            ctx.attribution = self.attribution.attribute(ctx.principal, req.headers)
            ctx.include_cost = ctx.principal.include_cost or wants_cost(req.headers.get(COST_HEADER_OPT_IN))
            await self.handlers[ctx.match.endpoint.handling].handle(req, out, ctx)
        except asyncio.CancelledError:
            # Shutdown gave up waiting for this request: record what is known before the task ends.
            self.recorder.emit_unfinished(ctx, 499, "cancelled")
            raise
        except Exception:
            log.exception("request %s failed inside the gateway", ctx.request_id)
            self.recorder.emit_unfinished(ctx, 500, "gateway_error")
            if not out.started:
                with contextlib.suppress(Exception):
                    err = GatewayError(500, "gateway_error", "metergate failed on this request.")
                    await send_error(out, ctx, err)
        finally:
            self.in_flight -= 1
