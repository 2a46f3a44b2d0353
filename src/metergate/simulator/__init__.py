"""Simulated LLM providers: the demo's upstreams and the ground truth the tests and benchmarks measure against."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

import uvicorn

from metergate.server import SignalFreeServer
from metergate.simulator.app import SimulatedProvider
from metergate.simulator.plan import Bill, Billed

DEFAULT_KEYS = {
    "openai": "sk-sim-openai",
    "azure": "sim-azure-key",
    "anthropic": "sk-ant-sim",
    "gemini": "sim-gemini-key",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def simulator_config(app: SimulatedProvider, host: str, port: int) -> uvicorn.Config:
    # The simulator drops connections on purpose; uvicorn's tracebacks for those are noise.
    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="none",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="critical",
        timeout_graceful_shutdown=1,
        backlog=4096,
        ws="websockets-sansio",
    )


class SimulatorThread:
    """Runs a simulated provider on 127.0.0.1 in a background thread (for tests and tools)."""

    def __init__(self, app: SimulatedProvider | None = None, port: int | None = None) -> None:
        self.app = app or SimulatedProvider(DEFAULT_KEYS)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = SignalFreeServer(simulator_config(self.app, "127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._run, name="simulated-provider", daemon=True)

    def _run(self) -> None:
        import uvloop

        uvloop.run(self._server.serve())

    def start(self) -> SimulatorThread:
        self._thread.start()
        for _ in range(500):
            if self._server.started:
                return self
            threading.Event().wait(0.01)
        raise RuntimeError("the simulated provider did not start")

    def stop(self) -> None:
        self._server.should_exit = True
        self._server.force_exit = True
        self._thread.join(timeout=5)


async def serve_simulator(app: SimulatedProvider, host: str, port: int) -> uvicorn.Server:
    """Start a simulated provider inside the running event loop (the demo); returns the started server."""
    server = SignalFreeServer(simulator_config(app, host, port))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    return server


__all__ = [
    "DEFAULT_KEYS",
    "Bill",
    "Billed",
    "SimulatedProvider",
    "SimulatorThread",
    "free_port",
    "serve_simulator",
]
