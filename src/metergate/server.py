"""Running the gateway: build its parts from a config, serve two listeners, shut down without losing counts.

SIGTERM (or SIGINT) stops accepting connections, lets in-flight requests finish for at most
`server.shutdown_timeout_s`, waits for post-response metering, flushes sinks, and only then closes the metrics
listener, so a final scrape can still see everything counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import uvicorn
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from metergate.admin import AdminApi
from metergate.admission import AdmissionChain
from metergate.attribution import AttributionPolicy
from metergate.auth import KeyRing, Principal
from metergate.batches import BatchMeter, LedgerBatchStore, MemoryBatchStore, batch_guards, batch_taps
from metergate.budgets import BudgetGuard
from metergate.config import Config, ConfigError, ServerConfig, parse_hostport
from metergate.connections import ConnectionLimits, ConnectionStats, guarded_protocol, raise_open_file_limit
from metergate.console import Console
from metergate.dispatch import Dispatcher
from metergate.edge import ApiApp, EdgeLimits, MetricsApp
from metergate.exchange import Recorder, UpstreamClients
from metergate.gateway import Gateway
from metergate.labels import LabelPolicy
from metergate.ledger import Ledger, LedgerError
from metergate.metrics import Meter
from metergate.passthrough import Passthrough
from metergate.pricing import PriceBook
from metergate.providers import build_upstream
from metergate.ratelimits import RateLimiter
from metergate.realtime import RealtimeRelay
from metergate.reconcile.periodic import PeriodicReconciler
from metergate.rewrite import UploadSessions, url_taps
from metergate.routing import Router

log = logging.getLogger("metergate")


class Service:
    """Something started before the listeners open and stopped after they close."""

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


@dataclass
class Runtime:
    """Everything a running gateway is made of."""

    config: Config
    dispatcher: Dispatcher
    meter: Meter
    guard: BudgetGuard
    ledger: Ledger | None = None
    admin: AdminApi | None = None
    # Started in order before the listeners, stopped in reverse after them (the ledger flushes last).
    services: list[Service] = field(default_factory=list)
    realtime: RealtimeRelay | None = None
    console: Console | None = None


class _LedgerService(Service):
    def __init__(self, ledger: Ledger, timeout_s: float) -> None:
        self.ledger, self.timeout_s = ledger, timeout_s

    async def start(self) -> None:
        await self.ledger.start()

    async def stop(self) -> None:
        await self.ledger.stop(self.timeout_s)


class _LimiterService(Service):
    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def start(self) -> None:
        await self.limiter.start()

    async def stop(self) -> None:
        await self.limiter.stop()


class _GuardService(Service):
    def __init__(self, guard: BudgetGuard) -> None:
        self.guard = guard

    async def start(self) -> None:
        await self.guard.start()

    async def stop(self) -> None:
        await self.guard.stop()


class _ClientsService(Service):
    """The upstream connection pools: opened last, closed first (after post-response work finished)."""

    def __init__(self, clients: UpstreamClients, relay: Gateway) -> None:
        self.clients, self.relay = clients, relay

    async def start(self) -> None:
        await self.clients.start()

    async def stop(self) -> None:
        await self.relay.close()
        await self.clients.close()


class _BatchesService(Service):
    def __init__(self, batches: BatchMeter) -> None:
        self.batches = batches

    async def start(self) -> None:
        await self.batches.start()

    async def stop(self) -> None:
        await self.batches.stop()


class _ReconcilerService(Service):
    def __init__(self, reconciler: PeriodicReconciler) -> None:
        self.reconciler = reconciler

    async def start(self) -> None:
        await self.reconciler.start()

    async def stop(self) -> None:
        await self.reconciler.stop()


class KeySync(Service):
    """Keys created with `metergate keys create` or the admin API reach every replica within `interval_s`."""

    def __init__(self, ledger: Ledger, keys: KeyRing, labels: LabelPolicy, interval_s: float = 5.0) -> None:
        self.ledger, self.keys, self.labels, self.interval_s = ledger, keys, labels, interval_s
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        try:
            active = await self.ledger.active_keys()
        except LedgerError:
            return  # keep the keys we know until the ledger answers again
        for key in active:
            self.labels.allow(key.team, key.app)
        self.keys.replace_dynamic({k.sha256: k.principal() for k in active})

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="metergate-key-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def build_runtime(config: Config) -> Runtime:
    missing = config.missing_secrets()
    if missing:
        raise ConfigError("\n".join(missing))
    prices = PriceBook(config.prices)
    labels = LabelPolicy(config, prices)
    meter = Meter()
    upstreams = {name: build_upstream(name, p) for name, p in config.providers.items()}
    ledger = Ledger(config.ledger) if config.ledger is not None else None
    guard = BudgetGuard(config, prices, ledger)
    keys = KeyRing(config)
    limiter = RateLimiter(config)
    admission = AdmissionChain(limiter, guard)
    recorder = Recorder(labels, prices, meter, sinks=[ledger.sink] if ledger is not None else [], admission=admission)
    clients = UpstreamClients(config, upstreams)
    router = Router(config.routes, upstreams)
    attribution = AttributionPolicy(config.attribution.tags)
    relay = Gateway(config, prices, labels, router, clients, recorder, attribution)
    uploads = UploadSessions(keys)
    batch_store = LedgerBatchStore(ledger) if ledger is not None else MemoryBatchStore()
    batches = BatchMeter(
        recorder, labels, clients, upstreams, batch_store, config.batches.poll_interval_s, guard.clock.time
    )
    taps = {**url_taps(uploads), **batch_taps(batches)}
    forwarder = Passthrough(config, labels, router, clients, recorder, taps=taps, before=batch_guards(batches))
    dispatcher = Dispatcher(
        keys,
        recorder,
        {
            "relay": relay,
            "free": forwarder,
            "deferred": forwarder,
            "unmetered": forwarder,
            "refuse": forwarder,
            "realtime": forwarder,
        },
        clock=guard.clock.time,
        sessions=uploads.authenticate,
        attribution=attribution,
    )
    meter.add_collector(guard.collect)
    meter.add_collector(attribution.collect)
    meter.add_collector(limiter.collect)
    services: list[Service] = []
    if ledger is not None:
        meter.add_collector(ledger.collect)
        services.append(_LedgerService(ledger, config.server.shutdown_timeout_s or 30.0))
    services.append(_GuardService(guard))
    services.append(_LimiterService(limiter))
    services.append(_ClientsService(clients, relay))
    services.append(_BatchesService(batches))

    def key_changed(sha256: str, principal: Principal | None) -> None:
        if principal is None:
            keys.remove(sha256)
        else:
            labels.allow(principal.team, principal.app)
            keys.add(sha256, principal)

    if ledger is not None:
        services.append(KeySync(ledger, keys, labels))
        reconciler = PeriodicReconciler(config, ledger, prices)
        if reconciler.providers:
            meter.add_collector(reconciler.collect)
            services.append(_ReconcilerService(reconciler))
    admin = AdminApi(guard, ledger, key_changed, meter)
    console = Console(admin.sessions, config.server.timezone, config.server.public_url)
    realtime = RealtimeRelay(
        config, keys, labels, router, clients, recorder, guard, dispatcher.next_id, guard.clock.time, attribution
    )
    return Runtime(config, dispatcher, meter, guard, ledger, admin, services, realtime, console)


class SignalFreeServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its owner (which may run several servers in one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(listen: str) -> socket.socket:
    """A listening socket, bound before anything else starts so a taken port is a clear error, not a traceback."""
    host, port = parse_hostport(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(f"metergate: cannot listen on {listen}: {exc.strerror}") from None
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


class ListenError(Exception):
    pass


def _uvicorn_config(
    app: object,
    listen: str,
    graceful_s: float,
    protocol: type[asyncio.Protocol],
    keepalive_s: float,
    ws_max_bytes: int = 1024 * 1024,
) -> uvicorn.Config:
    host, port = parse_hostport(listen)
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        loop="none",
        http=protocol,
        lifespan="off",
        access_log=False,
        log_level="warning",
        server_header=False,
        date_header=False,
        proxy_headers=False,  # the client address is not used; skip uvicorn's X-Forwarded-For middleware
        timeout_graceful_shutdown=math.ceil(graceful_s),
        timeout_keep_alive=math.ceil(keepalive_s),
        backlog=4096,
        ws="websockets-sansio",
        ws_max_size=ws_max_bytes,
    )


def connection_limits(server: ServerConfig, listener_share: float = 1.0) -> ConnectionLimits:
    """The configured limits, with the connection cap lowered to what the open-file limit allows: each request in
    flight holds a client socket and an upstream socket."""
    files = raise_open_file_limit()
    fits = max(16, (files - 64) // 2)
    cap = max(16, int(server.max_connections * listener_share))
    if cap > fits:
        log.warning("server.max_connections lowered to %d: the open-file limit is %d", fits, files)
        cap = fits
    return ConnectionLimits(
        max_header_bytes=server.max_header_bytes,
        max_headers=server.max_headers,
        header_timeout_s=server.header_timeout_s,
        body_timeout_s=server.body_timeout_s,
        max_connections=cap,
    )


def _connection_metrics(stats: dict[str, ConnectionStats]) -> Callable[[], Iterator[Metric]]:
    def collect() -> Iterator[Metric]:
        open_ = GaugeMetricFamily("metergate_connections_open", "Open client connections.", labels=["listener"])
        refused = CounterMetricFamily(
            "metergate_connections_refused",
            "Connections closed or requests refused by a connection limit (see README, Limits).",
            labels=["listener", "reason"],
        )
        for listener, st in stats.items():
            open_.add_metric([listener], st.open)
            for reason, n in list(st.refused.items()):
                refused.add_metric([listener, reason], n)
        yield open_
        yield refused

    return collect


async def serve(
    runtime: Runtime,
    *,
    on_ready: Callable[[], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    config = runtime.config
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    draining = False
    api_socket = bind(config.server.listen)
    try:
        metrics_socket = bind(config.server.metrics_listen)
    except ListenError:
        api_socket.close()
        raise
    server = config.server
    api_protocol, api_stats = guarded_protocol(connection_limits(server))
    # The metrics listener serves one scraper or a few: a small share of the cap is plenty.
    metrics_protocol, metrics_stats = guarded_protocol(connection_limits(server, 1 / 16))
    runtime.meter.add_collector(_connection_metrics({"api": api_stats, "metrics": metrics_stats}))
    edge = EdgeLimits(
        max_body_bytes=server.max_body_bytes,
        max_stream_body_bytes=server.max_stream_body_bytes,
        write_timeout_s=server.write_timeout_s,
    )
    api = SignalFreeServer(
        _uvicorn_config(
            ApiApp(runtime.dispatcher, edge, runtime.admin, runtime.realtime, runtime.console),
            server.listen,
            server.shutdown_timeout_s,
            api_protocol,
            server.keepalive_timeout_s,
            server.max_ws_message_bytes,
        )
    )
    metrics = SignalFreeServer(
        _uvicorn_config(
            MetricsApp(runtime.meter, lambda: not draining),
            server.metrics_listen,
            5,
            metrics_protocol,
            server.keepalive_timeout_s,
        )
    )
    for service in runtime.services:
        await service.start()
    metrics_task = asyncio.create_task(metrics.serve(sockets=[metrics_socket]))
    api_task = asyncio.create_task(api.serve(sockets=[api_socket]))
    while not (api.started and metrics.started):
        if api_task.done() or metrics_task.done():
            await _stop_both(api, metrics, api_task, metrics_task)
            raise ListenError(f"metergate: cannot serve on {config.server.listen} / {config.server.metrics_listen}")
        await asyncio.sleep(0.01)
    log.info(
        "metergate serving the LLM API on %s and /metrics on %s",
        config.server.listen,
        config.server.metrics_listen,
    )
    if on_ready is not None:
        result = on_ready()
        if result is not None:
            await result
    stop_wait = asyncio.create_task(stop.wait())
    await asyncio.wait({stop_wait, api_task}, return_when=asyncio.FIRST_COMPLETED)
    draining = True
    log.info("metergate shutting down: draining %d in-flight requests", runtime.dispatcher.in_flight)
    api.should_exit = True
    await api_task
    for service in reversed(runtime.services):
        await service.stop()
    metrics.should_exit = True
    await metrics_task
    stop_wait.cancel()


async def _stop_both(api: SignalFreeServer, metrics: SignalFreeServer, *tasks: asyncio.Task[None]) -> None:
    api.should_exit = metrics.should_exit = True
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task


def run(coro: Awaitable[None]) -> None:
    """Run the gateway's event loop, on uvloop where available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform metergate supports
        asyncio.run(coro)  # type: ignore[arg-type]
    else:
        uvloop.run(coro)  # type: ignore[arg-type]
