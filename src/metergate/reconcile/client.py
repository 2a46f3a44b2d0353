"""An admin API client: JSON GETs with the provider's paging, and the retries its rate limits ask for."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC
from typing import Any

import aiohttp
import orjson

from metergate.reconcile.bill import ReconcileError

MAX_PAGES = 1000  # a paging loop that never ends is a broken API, not a long report
MAX_BODY = 16 * 1024 * 1024  # one page; a 31-day page grouped by model and key is far smaller
RETRIED = frozenset({408, 409, 429, 500, 502, 503, 504, 529})

Params = Sequence[tuple[str, str]]


def retry_after_s(headers: Any, attempt: int) -> float:
    """The wait a 429/5xx asks for (`retry-after-ms`, `retry-after` in seconds or as an HTTP date), else an
    exponential backoff from 0.5 s."""
    ms = headers.get("retry-after-ms")
    if ms:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000)
    value = headers.get("retry-after")
    if value:
        with contextlib.suppress(ValueError):
            return max(0.0, float(value))
        with contextlib.suppress(ValueError, TypeError):
            moment = email.utils.parsedate_to_datetime(value)
            if moment.tzinfo is None:  # "-0000": UTC, said without a zone
                moment = moment.replace(tzinfo=UTC)
            return max(0.0, moment.timestamp() - time.time())
    return 0.5 * float(1 << min(attempt, 10))


async def _read_body(resp: aiohttp.ClientResponse, what: str) -> bytes:
    """The whole body, refused past MAX_BODY (`content.read(n)` would return only what is buffered)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_BODY:
            raise ReconcileError(f"{what}: answer larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def error_message(body: bytes) -> str:
    """The message of an OpenAI or Anthropic error body, bounded; the raw start of anything else."""
    try:
        data = orjson.loads(body)
        message = data["error"]["message"]
        if isinstance(message, str):
            return message[:300]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    return body[:200].decode("utf-8", "replace")


class AdminClient:
    """GETs from one provider's admin API. Every failure is a `ReconcileError` naming the call and the cause."""

    def __init__(
        self,
        provider: str,
        base_url: str,
        headers: dict[str, str],
        *,
        timeout_s: float,
        max_retries: int,
        max_wait_s: float,
    ) -> None:
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        self.headers = headers
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_retries = max_retries
        self.max_wait_s = max_wait_s
        self.calls = 0
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        self._session = aiohttp.ClientSession(timeout=self.timeout, headers=self.headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, path: str, params: Params) -> dict[str, Any]:
        assert self._session is not None, "use AdminClient as an async context manager"
        url = self.base_url + path
        what = f"{self.provider}: GET {path}"
        for attempt in range(self.max_retries + 1):
            self.calls += 1
            try:
                async with self._session.get(url, params=list(params)) as resp:
                    body = await _read_body(resp, what)
                    if resp.status == 200:
                        try:
                            # a large page is parsed off the event loop: in `serve` it shares the loop with traffic
                            data = (
                                await asyncio.to_thread(orjson.loads, body)
                                if len(body) > 1 << 20
                                else orjson.loads(body)
                            )
                        except orjson.JSONDecodeError:
                            raise ReconcileError(f"{what}: the answer is not JSON") from None
                        if not isinstance(data, dict):
                            raise ReconcileError(f"{what}: the answer is not a JSON object")
                        return data
                    if resp.status not in RETRIED or attempt == self.max_retries:
                        hint = " (is the admin key an admin key?)" if resp.status in (401, 403) else ""
                        raise ReconcileError(f"{what}: HTTP {resp.status}: {error_message(body)}{hint}")
                    wait = retry_after_s(resp.headers, attempt)
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempt == self.max_retries:
                    raise ReconcileError(f"{what}: {type(exc).__name__}: {exc or 'timed out'}") from None
                wait = retry_after_s({}, attempt)
            if wait > self.max_wait_s:
                raise ReconcileError(f"{what}: rate limited; the provider asks to wait {wait:.0f} s")
            await asyncio.sleep(wait)
        raise ReconcileError(f"{what}: gave up")  # unreachable: the last attempt returns or raises

    async def pages(self, path: str, params: Params) -> AsyncIterator[dict[str, Any]]:
        """Every page of a bucketed report: `next_page` passed back as `page` until `has_more` is false."""
        token: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            page = await self.get(path, [*params, *([("page", token)] if token else [])])
            yield page
            token = page.get("next_page")
            if not page.get("has_more") or not token:
                return
            if not isinstance(token, str) or token in seen:
                raise ReconcileError(f"{self.provider}: GET {path}: the next page repeats an earlier one")
            seen.add(token)
        raise ReconcileError(f"{self.provider}: GET {path}: more than {MAX_PAGES} pages")

    async def listing(self, path: str, params: Params, cursor: str) -> AsyncIterator[dict[str, Any]]:
        """Every item of a list endpoint paged by object id (`after` or `after_id` = the last id seen)."""
        after: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            page = await self.get(path, [*params, *([(cursor, after)] if after else [])])
            items = page.get("data")
            if not isinstance(items, list):
                raise ReconcileError(f"{self.provider}: GET {path}: no data list in the answer")
            for item in items:
                if isinstance(item, dict):
                    yield item
            last = page.get("last_id") or (items[-1].get("id") if items and isinstance(items[-1], dict) else None)
            if not page.get("has_more") or not last:
                return
            if str(last) in seen:
                raise ReconcileError(f"{self.provider}: GET {path}: the next page repeats an earlier one")
            after = str(last)
            seen.add(after)
        raise ReconcileError(f"{self.provider}: GET {path}: more than {MAX_PAGES} pages")
