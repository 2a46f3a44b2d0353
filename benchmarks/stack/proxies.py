"""Minimal metering proxies on each candidate stack, doing the same work: parse the request JSON, forward it,
read the response, parse its usage, relay it (streams chunk by chunk). Used by `compare.py`."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import orjson

UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:9001")
CLIENT = os.environ.get("CLIENT", "aiohttp")  # aiohttp | httpx | httpx2
HOP = {"host", "content-length", "connection", "transfer-encoding", "keep-alive", "authorization"}
_aiohttp_session: Any = None
_httpx_client: Any = None


async def aiohttp_session() -> Any:
    global _aiohttp_session
    if _aiohttp_session is None:
        import aiohttp

        _aiohttp_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    return _aiohttp_session


def httpx_client() -> Any:
    global _httpx_client
    if _httpx_client is None:
        httpx = importlib.import_module(CLIENT)
        _httpx_client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=1000))
    return _httpx_client


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            await send({"type": m["type"] + ".complete"})
            if m["type"] == "lifespan.shutdown":
                return
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    stream = orjson.loads(body).get("stream")
    headers = {k.decode(): v.decode() for k, v in scope["headers"] if k.decode() not in HOP}
    headers["authorization"] = "Bearer upstream-key"
    url = UPSTREAM + scope["path"]
    if CLIENT != "aiohttp":
        client = httpx_client()
        r = await client.send(client.build_request("POST", url, content=body, headers=headers), stream=True)
        if stream:
            await send(
                {
                    "type": "http.response.start",
                    "status": r.status_code,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            async for chunk in r.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            data = await r.aread()
            orjson.loads(data)["usage"]
            await send(
                {
                    "type": "http.response.start",
                    "status": r.status_code,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": data})
        await r.aclose()
        return
    session = await aiohttp_session()
    async with session.post(url, data=body, headers=headers) as r:
        if stream:
            await send(
                {
                    "type": "http.response.start",
                    "status": r.status,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            async for chunk in r.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            data = await r.read()
            orjson.loads(data)["usage"]
            await send(
                {"type": "http.response.start", "status": r.status, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": data})


def aiohttp_server_app() -> Any:
    from aiohttp import web

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        stream = orjson.loads(body).get("stream")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        headers["authorization"] = "Bearer upstream-key"
        session = await aiohttp_session()
        async with session.post(UPSTREAM + request.path, data=body, headers=headers) as r:
            if stream:
                resp = web.StreamResponse(status=r.status, headers={"content-type": "text/event-stream"})
                await resp.prepare(request)
                async for chunk in r.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
            data = await r.read()
            orjson.loads(data)["usage"]
            return web.Response(body=data, status=r.status, headers={"content-type": "application/json"})

    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", handler)
    return app


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "uvicorn":
        import uvicorn

        uvicorn.run(
            asgi_app,
            host="127.0.0.1",
            port=port,
            loop="uvloop",
            http="httptools",
            log_level="warning",
            access_log=False,
        )
    elif kind == "aiohttp":
        import uvloop
        from aiohttp import web

        uvloop.install()
        web.run_app(aiohttp_server_app(), host="127.0.0.1", port=port, access_log=None, print=None)
