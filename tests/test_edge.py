"""The ASGI edge on its own: disconnect detection on any ASGI server, body limits."""

from __future__ import annotations

import asyncio
from typing import Any

from metergate.edge import AsgiResponder


def test_disconnect_is_noticed_without_uvicorn_internals() -> None:
    async def main() -> None:
        gone = asyncio.Event()
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:  # a plain function: no uvicorn cycle behind it
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        responder = AsgiResponder(receive, send)
        await responder.start(200, [])
        assert not responder.disconnected
        gone.set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert responder.disconnected
        await responder.send(b"", more=False)
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]

    asyncio.run(main())


def test_uvicorn_cycle_flag_is_read_directly() -> None:
    class Cycle:
        disconnected = False

        async def receive(self) -> dict[str, Any]:
            raise AssertionError("the fast path never waits on receive()")

    async def main() -> None:
        cycle = Cycle()

        async def send(message: dict[str, Any]) -> None:
            return None

        responder = AsgiResponder(cycle.receive, send)
        assert not responder.disconnected
        cycle.disconnected = True
        assert responder.disconnected
        responder.close()

    asyncio.run(main())
