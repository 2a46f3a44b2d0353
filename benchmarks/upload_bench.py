"""Streamed uploads and downloads through the gateway: its memory stays flat whatever the file size.

Starts a sink provider (an aiohttp server that reads uploads chunk by chunk and answers downloads from a generator,
holding nothing), and one `metergate serve` in front of it, then sends a file upload (multipart, `POST /v1/files`)
and a file download (`GET /v1/files/{id}/content`) of `--mb` megabytes through the gateway while sampling the
gateway's resident memory (VmRSS) every 10 ms. Prints the RSS before, the peak during each transfer, the growth,
and the throughput next to the same transfer sent to the provider directly.

    .venv/bin/python benchmarks/upload_bench.py            # 200 MB
    .venv/bin/python benchmarks/upload_bench.py --mb 1000

Target (issue 10): a 200 MB upload grows the gateway's RSS by less than 50 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from aiohttp import web

from metergate.simulator import free_port

KEY = "mg-bench-upload"
CHUNK = 256 * 1024


async def sink_app() -> web.Application:
    async def upload(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            size += len(chunk)
        return web.json_response({"id": "file-bench", "object": "file", "bytes": size, "purpose": "user_data"})

    async def download(request: web.Request) -> web.StreamResponse:
        size = int(request.headers.get("x-bench-bytes", "0"))
        response = web.StreamResponse(headers={"content-type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        block = b"\x5a" * CHUNK
        sent = 0
        while sent < size:
            part = block[: min(CHUNK, size - sent)]
            await response.write(part)
            sent += len(part)
        return response

    app = web.Application(client_max_size=1 << 40)
    app.router.add_post("/v1/files", upload)
    app.router.add_get("/v1/files/{file_id}/content", download)
    return app


def run_sink(port: int) -> None:
    async def main() -> None:
        runner = web.AppRunner(await sink_app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(main())


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """The peak RSS of a process while a transfer runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss(self.pid))
            time.sleep(0.01)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def multipart(size: int) -> tuple[str, AsyncIterator[bytes], int]:
    boundary = "benchboundary7d3f"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    async def body() -> AsyncIterator[bytes]:
        yield head
        block = b"\xa5" * CHUNK
        sent = 0
        while sent < size:
            part = block[: min(CHUNK, size - sent)]
            yield part
            sent += len(part)
        yield tail

    return f"multipart/form-data; boundary={boundary}", body(), len(head) + size + len(tail)


async def upload(base: str, size: int, headers: dict[str, str]) -> tuple[float, int]:
    content_type, body, length = multipart(size)
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        r = await client.post(
            f"{base}/v1/files",
            content=body,
            headers={**headers, "content-type": content_type, "content-length": str(length)},
        )
        r.raise_for_status()
        return time.perf_counter() - start, r.json()["bytes"]


async def download(base: str, size: int, headers: dict[str, str]) -> tuple[float, int]:
    got = 0
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        async with client.stream(
            "GET", f"{base}/v1/files/file-bench/content", headers={**headers, "x-bench-bytes": str(size)}
        ) as r:
            r.raise_for_status()
            async for chunk in r.aiter_raw():
                got += len(chunk)
        return time.perf_counter() - start, got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=200)
    args = parser.parse_args()
    size = args.mb * 1024 * 1024
    sink_port, listen, metrics = free_port(), free_port(), free_port()
    threading.Thread(target=run_sink, args=(sink_port,), daemon=True).start()
    sink = f"http://127.0.0.1:{sink_port}"
    with tempfile.TemporaryDirectory() as tmp:
        import hashlib

        config = Path(tmp) / "gw.yaml"
        config.write_text(
            textwrap.dedent(
                f"""\
                server: {{listen: "127.0.0.1:{listen}", metrics_listen: "127.0.0.1:{metrics}"}}
                providers:
                  openai: {{type: openai, base_url: "{sink}"}}
                routes:
                  - {{model: "*", provider: openai}}
                keys:
                  - {{sha256: "{hashlib.sha256(KEY.encode()).hexdigest()}", team: bench, app: upload}}
                """
            )
        )
        gateway = subprocess.Popen([sys.executable, "-m", "metergate", "serve", "--config", str(config)])
        try:
            for _ in range(200):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{metrics}/readyz", timeout=1).status_code == 200:
                        break
                time.sleep(0.05)
            auth = {"authorization": f"Bearer {KEY}"}
            gw = f"http://127.0.0.1:{listen}"
            asyncio.run(upload(gw, 1024 * 1024, auth))  # warm up: the first request loads lazily imported code
            base = rss(gateway.pid)
            print(f"gateway RSS before: {base / 2**20:.1f} MB; transfer: {args.mb} MB")
            for name, fn in (("upload", upload), ("download", download)):
                direct_s, _ = asyncio.run(fn(sink, size, {}))
                with Sampler(gateway.pid) as sampler:
                    via_s, moved = asyncio.run(fn(gw, size, auth))
                assert moved >= size, (name, moved, size)  # an upload counts its multipart framing too
                print(
                    f"{name:8s} peak RSS {sampler.peak / 2**20:7.1f} MB  growth {(sampler.peak - base) / 2**20:6.1f} MB"
                    f"  direct {size / direct_s / 2**20:7.1f} MB/s  via gateway {size / via_s / 2**20:7.1f} MB/s"
                    f"  ({via_s / direct_s:.2f}x the time)"
                )
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
    os._exit(0)


if __name__ == "__main__":
    main()
