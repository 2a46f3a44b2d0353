"""Batch jobs: OpenAI `/v1/batches`, Anthropic `/v1/messages/batches`, Gemini `:batchGenerateContent`.

A batch is created through the gateway and run by the provider later. Each of its requests is billed once, at the
batch price, to the key that created the batch, as soon as its result is known:
- when its results pass through the gateway (a client downloading the output file, the results JSONL, or a Gemini
  batch answered with inline responses), read as they stream by;
- and by polling the batch with the provider credential until it ends, then reading its results, so spend is
  recorded even when the results are fetched elsewhere (or never).
Billed items are claimed in the ledger (`batch_items`) before they are counted, so reading results twice, from two
replicas, or after a restart never bills twice. Without a ledger the claims live in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import aiohttp
import orjson

from metergate.endpoints import Endpoint, match_endpoint
from metergate.errors import GatewayError
from metergate.exchange import Recorder, UpstreamClients, forward_headers
from metergate.labels import LabelPolicy
from metergate.ledger import BatchRow, Ledger, LedgerError
from metergate.passthrough import PreForward, ResponseTap, TapFactory, TapRequest
from metergate.providers import API_ADAPTERS, RequestFacts, Upstream
from metergate.rewrite import JsonUrlTap
from metergate.usage import Usage, UsageError, UsageRecord

log = logging.getLogger("metergate.batches")

# A batch object is a few kilobytes; a Gemini batch with inline responses can be larger.
MAX_BATCH_OBJECT = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One batched request's result: its id within the batch, the model that ran it, what it was billed."""

    item: str
    model: str
    usage: Usage
    error: str | None = None  # the result was billed but its usage could not be read


class BatchFormat(ABC):
    """One API's batch objects and result lines."""

    family: str

    @abstractmethod
    def created(self, obj: Mapping[str, Any], params: Mapping[str, str]) -> tuple[str, str] | None:
        """(batch id, model if known) from a creation response."""

    @abstractmethod
    def state(self, obj: Mapping[str, Any]) -> tuple[str | None, bool, str | None]:
        """(batch id, ended, results file) from a batch object."""

    @abstractmethod
    def status_path(self, batch_id: str) -> str: ...

    @abstractmethod
    def results_path(self, batch: BatchRow) -> str | None:
        """Where the results are read, once the batch ended (None: nothing to read)."""

    @abstractmethod
    def parse_line(self, line: bytes, index: int) -> BatchItem | None:
        """One JSONL line of results; None for a request that was not billed (errored, expired, cancelled)."""

    def inline_items(self, obj: Mapping[str, Any]) -> list[BatchItem] | None:
        """Results carried by the batch object itself (Gemini inline responses); None when there are none."""
        return None


def _endpoint(method: str, path: str) -> Endpoint:
    return match_endpoint(method, path).endpoint


class OpenAIBatches(BatchFormat):
    family = "openai"
    _ENDED = frozenset({"completed", "expired", "cancelled", "failed"})
    _BY_OBJECT = {
        "chat.completion": _endpoint("POST", "/v1/chat/completions"),
        "text_completion": _endpoint("POST", "/v1/completions"),
        "response": _endpoint("POST", "/v1/responses"),
        "list": _endpoint("POST", "/v1/embeddings"),
    }

    def created(self, obj: Mapping[str, Any], params: Mapping[str, str]) -> tuple[str, str] | None:
        batch_id = obj.get("id")
        if not isinstance(batch_id, str) or obj.get("object") != "batch":
            return None
        model = obj.get("model")
        return batch_id, model if isinstance(model, str) else ""

    def state(self, obj: Mapping[str, Any]) -> tuple[str | None, bool, str | None]:
        if obj.get("object") != "batch":
            return None, False, None
        output = obj.get("output_file_id")
        batch_id = obj.get("id")
        return (
            batch_id if isinstance(batch_id, str) else None,
            obj.get("status") in self._ENDED,
            output if isinstance(output, str) else None,
        )

    def status_path(self, batch_id: str) -> str:
        return f"/v1/batches/{batch_id}"

    def results_path(self, batch: BatchRow) -> str | None:
        return f"/v1/files/{batch.output_ref}/content" if batch.output_ref else None

    def parse_line(self, line: bytes, index: int) -> BatchItem | None:
        obj = orjson.loads(line)
        response = obj.get("response") if isinstance(obj, dict) else None
        if not isinstance(response, dict) or response.get("status_code") != 200:
            return None  # an errored or expired request is not billed
        body = response.get("body")
        if not isinstance(body, dict):
            raise UsageError("a result line has no body")
        endpoint = self._BY_OBJECT.get(str(body.get("object")))
        if endpoint is None:
            raise UsageError(f"unknown result object {str(body.get('object'))[:40]!r}")
        usage = API_ADAPTERS["openai"].usage_from_body(endpoint, body)
        return BatchItem(str(obj.get("custom_id")), str(body.get("model") or ""), usage)


class AnthropicBatches(BatchFormat):
    family = "anthropic"
    _MESSAGES = _endpoint("POST", "/v1/messages")

    def created(self, obj: Mapping[str, Any], params: Mapping[str, str]) -> tuple[str, str] | None:
        batch_id = obj.get("id")
        if not isinstance(batch_id, str) or obj.get("type") != "message_batch":
            return None
        return batch_id, ""

    def state(self, obj: Mapping[str, Any]) -> tuple[str | None, bool, str | None]:
        if obj.get("type") != "message_batch":
            return None, False, None
        batch_id = obj.get("id")
        return batch_id if isinstance(batch_id, str) else None, obj.get("processing_status") == "ended", None

    def status_path(self, batch_id: str) -> str:
        return f"/v1/messages/batches/{batch_id}"

    def results_path(self, batch: BatchRow) -> str | None:
        return f"/v1/messages/batches/{batch.batch_id}/results"

    def parse_line(self, line: bytes, index: int) -> BatchItem | None:
        obj = orjson.loads(line)
        result = obj.get("result") if isinstance(obj, dict) else None
        if not isinstance(result, dict) or result.get("type") != "succeeded":
            return None  # errored, canceled and expired requests are not billed
        message = result.get("message")
        if not isinstance(message, dict):
            raise UsageError("a succeeded result has no message")
        usage = API_ADAPTERS["anthropic"].usage_from_body(self._MESSAGES, message)
        return BatchItem(str(obj.get("custom_id")), str(message.get("model") or ""), usage)


class GeminiBatches(BatchFormat):
    family = "gemini"
    _GENERATE = _endpoint("POST", "/v1beta/models/m:generateContent")

    def created(self, obj: Mapping[str, Any], params: Mapping[str, str]) -> tuple[str, str] | None:
        name = obj.get("name")
        if not isinstance(name, str) or not name.startswith("batches/"):
            return None
        return name, params.get("model", "")

    def state(self, obj: Mapping[str, Any]) -> tuple[str | None, bool, str | None]:
        name = obj.get("name")
        if not isinstance(name, str) or not name.startswith("batches/"):
            return None, False, None
        output = self._output(obj)
        ref = output.get("responsesFile") if output else None
        return name, obj.get("done") is True, ref if isinstance(ref, str) else None

    @staticmethod
    def _output(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The batch output: in `response` (the operation's result) or in `metadata.output` (where google-genai
        reads it); recorded responses carry one or the other."""
        response = obj.get("response")
        if isinstance(response, dict) and ("inlinedResponses" in response or "responsesFile" in response):
            return response
        metadata = obj.get("metadata")
        output = metadata.get("output") if isinstance(metadata, dict) else None
        return output if isinstance(output, dict) else None

    def status_path(self, batch_id: str) -> str:
        return f"/v1beta/{batch_id}"

    def results_path(self, batch: BatchRow) -> str | None:
        return f"/download/v1beta/{batch.output_ref}:download?alt=media" if batch.output_ref else None

    def parse_line(self, line: bytes, index: int) -> BatchItem | None:
        obj = orjson.loads(line)
        if not isinstance(obj, dict):
            return None
        return self._item(obj, index)

    def _item(self, obj: Mapping[str, Any], index: int) -> BatchItem | None:
        response = obj.get("response")
        if not isinstance(response, dict):
            return None
        model = str(response.get("modelVersion") or "")
        usage = API_ADAPTERS["gemini"].usage_from_body(
            self._GENERATE, response, RequestFacts(model=model, stream=False, max_output_tokens=None)
        )
        # By position: a request's `key` is the client's to choose and need not be unique, so it cannot say which
        # requests were billed already.
        return BatchItem(f"#{index}", model, usage)

    def inline_items(self, obj: Mapping[str, Any]) -> list[BatchItem] | None:
        output = self._output(obj)
        inline = output.get("inlinedResponses") if output else None
        if isinstance(inline, dict):
            inline = inline.get("inlinedResponses")
        if not isinstance(inline, list):
            return None
        items = []
        for i, entry in enumerate(inline):
            if not isinstance(entry, dict):
                continue
            try:
                item = self._item(entry, i)
            except UsageError as exc:
                # Billed, but its usage is unreadable: recorded as unmetered rather than blocking the batch.
                item = BatchItem(f"#{i}", "", Usage(), error=str(exc)[:200])
            if item is not None:
                items.append(item)
        return items


FORMATS: dict[str, BatchFormat] = {f.family: f for f in (OpenAIBatches(), AnthropicBatches(), GeminiBatches())}


class BatchStore(Protocol):
    async def save(self, batch: BatchRow) -> None: ...

    async def open_batches(self) -> list[BatchRow]: ...

    async def finish(self, provider: str, batch_id: str) -> None: ...

    async def claim(self, provider: str, batch_id: str, items: list[str]) -> list[str]: ...


class LedgerBatchStore:
    """Batches and billed items in the ledger database: shared by replicas, kept across restarts."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def save(self, batch: BatchRow) -> None:
        store = await self.ledger.store()
        await self.ledger.call(store.save_batch, batch)

    async def open_batches(self) -> list[BatchRow]:
        store = await self.ledger.store()
        return await self.ledger.call(store.open_batches)

    async def finish(self, provider: str, batch_id: str) -> None:
        store = await self.ledger.store()
        await self.ledger.call(store.finish_batch, provider, batch_id)

    async def claim(self, provider: str, batch_id: str, items: list[str]) -> list[str]:
        store = await self.ledger.store()
        return await self.ledger.call(store.claim_items, provider, batch_id, items)


class MemoryBatchStore:
    """Without a ledger: this process remembers the batches it saw and the items it billed."""

    def __init__(self) -> None:
        self.batches: dict[tuple[str, str], BatchRow] = {}
        self.finished: set[tuple[str, str]] = set()
        self.billed: set[tuple[str, str, str]] = set()

    async def save(self, batch: BatchRow) -> None:
        key = (batch.provider, batch.batch_id)
        old = self.batches.get(key)
        if old is not None:
            batch = replace(old, model=batch.model or old.model, output_ref=batch.output_ref or old.output_ref)
        self.batches[key] = batch

    async def open_batches(self) -> list[BatchRow]:
        return [b for k, b in self.batches.items() if k not in self.finished]

    async def finish(self, provider: str, batch_id: str) -> None:
        self.finished.add((provider, batch_id))

    async def claim(self, provider: str, batch_id: str, items: list[str]) -> list[str]:
        new = [i for i in dict.fromkeys(items) if (provider, batch_id, i) not in self.billed]
        self.billed.update((provider, batch_id, i) for i in new)
        return new


class BatchMeter:
    """Knows the batches created through this gateway and bills their requests, once each."""

    def __init__(
        self,
        recorder: Recorder,
        labels: LabelPolicy,
        clients: UpstreamClients,
        upstreams: Mapping[str, Upstream],
        store: BatchStore,
        poll_interval_s: float = 60.0,
        clock: Any = time.time,
    ) -> None:
        self.recorder = recorder
        self.labels = labels
        self.clients = clients
        self.upstreams = upstreams
        self.store = store
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self.known: dict[tuple[str, str], BatchRow] = {}
        self.outputs: dict[tuple[str, str], tuple[str, str]] = {}  # (provider, results file) -> batch key
        self._due: dict[tuple[str, str], float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._work: set[asyncio.Task[None]] = set()
        self.billed_items = 0

    # --- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        with contextlib.suppress(LedgerError):
            for row in await self.store.open_batches():
                self._know(row)
        self._task = asyncio.create_task(self._poll_loop(), name="metergate-batches")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._work:
            await asyncio.wait(self._work, timeout=10)

    # --- what the taps tell ------------------------------------------------------------------------------------

    def _know(self, row: BatchRow) -> None:
        key = (row.provider, row.batch_id)
        self.known[key] = row
        if row.output_ref:
            self.outputs[(row.provider, row.output_ref)] = key
        self._due.setdefault(key, self.clock() + self.poll_interval_s)

    def created(self, row: BatchRow) -> None:
        self._know(row)
        self._spawn(self._save(row))

    def learned(self, provider: str, batch_id: str, ended: bool, output_ref: str | None, model: str = "") -> None:
        row = self.known.get((provider, batch_id))
        if row is None:
            return  # not created through this gateway (or not yet known here): the creator's replica bills it
        changed = replace(row, output_ref=output_ref or row.output_ref, model=model or row.model)
        if changed != row:
            self._know(changed)
            self._spawn(self._save(changed))
        if ended:
            self._due[(provider, batch_id)] = 0.0  # read its results now
            self._wake.set()

    def batch_of_output(self, provider: str, ref: str) -> BatchRow | None:
        key = self.outputs.get((provider, ref))
        return self.known.get(key) if key is not None else None

    def batch(self, provider: str, batch_id: str) -> BatchRow | None:
        return self.known.get((provider, batch_id))

    def results_read(self, row: BatchRow, items: list[BatchItem]) -> None:
        """Items read from results passing through the gateway: billed now (those not billed already)."""
        self._spawn(self.bill(row, items))

    # --- billing -----------------------------------------------------------------------------------------------

    async def bill(self, row: BatchRow, items: Iterable[BatchItem]) -> int:
        items = [i for i in items if not i.usage.is_empty() or i.error is not None]
        if not items:
            return 0
        claimed = set(await self.store.claim(row.provider, row.batch_id, [i.item for i in items]))
        now = self.clock()
        billed = 0
        for item in items:
            if item.item not in claimed:
                continue
            claimed.discard(item.item)  # a repeated id within one read is billed once
            record = self._record(row, item, now)
            if item.error is not None:
                record.metered, record.error_type = False, "upstream_malformed_usage"
            self.recorder.emit(record)
            billed += 1
        self.billed_items += billed
        return billed

    def _record(self, row: BatchRow, item: BatchItem, now: float) -> UsageRecord:
        upstream = self.upstreams.get(row.provider)
        model = item.model or row.model
        usage = replace(item.usage, batch=True)
        if usage.service_tier == "batch":
            usage.service_tier = None  # Anthropic reports the batch as its tier: the batch price is the variant
        digest = hashlib.sha256(f"{row.provider}\0{row.batch_id}\0{item.item}".encode()).hexdigest()[:32]
        record = UsageRecord(
            request_id=f"batch-{digest}",
            started_at=now,
            team=self.labels.team(row.team),
            app=self.labels.app(row.app),
            key_id=row.key_id,
            provider=row.provider,
            model=self.labels.model(row.provider, upstream.config.pricing_provider_id, model) if upstream else "other",
            upstream_model=model,
            endpoint=row.endpoint,
            code=200,
            stream=False,
            user=row.user,
            tags=row.tags,
        )
        if upstream is not None:
            self.recorder.price_usage(record, upstream, model, usage, now)
        else:
            record.usage = usage
            record.set_cost(None)
        return record

    # --- polling -----------------------------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        refreshed = self.clock()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(self.poll_interval_s, 5.0))
            self._wake.clear()
            now = self.clock()
            if now - refreshed >= max(self.poll_interval_s, 1.0):
                # Batches other replicas created: each replica polls them all, and the claims bill each once.
                refreshed = now
                with contextlib.suppress(LedgerError):
                    for row in await self.store.open_batches():
                        if (row.provider, row.batch_id) not in self.known:
                            self._know(row)
            due = [key for key, at in list(self._due.items()) if at <= now and key in self.known]
            for key in due:
                self._due[key] = now + self.poll_interval_s
            # A few at a time: thousands of open batches must not open thousands of calls at once.
            limit = asyncio.Semaphore(8)

            async def one(key: tuple[str, str], limit: asyncio.Semaphore = limit) -> None:
                async with limit:
                    try:
                        await self.poll(self.known[key])
                    except Exception:  # one broken batch must not stop the others
                        log.exception("batch %s at %s: polling failed", key[1], key[0])

            await asyncio.gather(*(one(key) for key in due if key in self.known))

    async def poll(self, row: BatchRow) -> bool:
        """Ask the provider about one batch; once it ended, bill its results. True when it is done with."""
        upstream = self.upstreams.get(row.provider)
        fmt = FORMATS.get(row.family)
        if upstream is None or fmt is None:
            return False
        obj = await self._get_json(upstream, fmt.status_path(row.batch_id))
        if obj is None:
            return False
        _, ended, output_ref = fmt.state(obj)
        if output_ref and output_ref != row.output_ref:
            row = replace(row, output_ref=output_ref)
            self._know(row)
            await self._save(row)
        if not ended:
            return False
        inline = fmt.inline_items(obj)
        if inline is not None:
            await self.bill(row, inline)
        path = fmt.results_path(row)
        if inline is None and path is not None and not await self._bill_results(upstream, fmt, row, path):
            return False
        await self.store.finish(row.provider, row.batch_id)
        self.known.pop((row.provider, row.batch_id), None)
        self._due.pop((row.provider, row.batch_id), None)
        return True

    async def _get_json(self, upstream: Upstream, path: str) -> Mapping[str, Any] | None:
        try:
            response = await self._get(upstream, path)
        except GatewayError as exc:
            log.warning("batch status %s at %s: %s", path, upstream.name, exc.message)
            return None
        async with response:
            if response.status != 200:
                log.warning("batch status %s at %s: HTTP %d", path, upstream.name, response.status)
                return None
            data = bytearray()
            try:
                async for chunk in response.content.iter_any():
                    data += chunk
                    if len(data) > MAX_BATCH_OBJECT:
                        log.warning(
                            "batch status %s at %s: larger than %d bytes", path, upstream.name, MAX_BATCH_OBJECT
                        )
                        return None
                obj = orjson.loads(data)
            except (aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError) as exc:
                log.warning("batch status %s at %s: %s", path, upstream.name, exc)
                return None
        return obj if isinstance(obj, dict) else None

    async def _bill_results(self, upstream: Upstream, fmt: BatchFormat, row: BatchRow, path: str) -> bool:
        try:
            response = await self._get(upstream, path)
        except GatewayError as exc:
            log.warning("batch results %s at %s: %s", path, upstream.name, exc.message)
            return False
        reader = ResultLines(fmt)
        async with response:
            if response.status in (404, 410):
                # The results are gone (expired, deleted elsewhere): what they billed can no longer be read. Said
                # once, as an unmetered record, rather than asked about forever.
                log.warning(
                    "batch %s at %s: its results are gone (HTTP %d)", row.batch_id, upstream.name, response.status
                )
                gone = BatchItem("#results-gone", row.model, Usage(), error=f"results answered HTTP {response.status}")
                await self.bill(row, [gone])
                return True
            if response.status != 200:
                log.warning("batch results %s at %s: HTTP %d", path, upstream.name, response.status)
                return False
            try:
                async for chunk in response.content.iter_any():
                    reader.feed(chunk)
                    if len(reader.items) >= 1000:  # bill as results arrive: a huge file is never held whole
                        await self.bill(row, reader.take())
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("batch results %s at %s broke: %s", path, upstream.name, type(exc).__name__)
                await self.bill(row, reader.take())
                return False
        reader.end()
        await self.bill(row, reader.take())
        return True

    async def _get(self, upstream: Upstream, path: str) -> aiohttp.ClientResponse:
        route, _, query = path.partition("?")
        match = match_endpoint("GET", route)
        url = upstream.url(match, route, query, "")
        headers = forward_headers({"accept": "application/json"}, upstream)
        if upstream.family == "anthropic":
            headers.append(("anthropic-version", "2023-06-01"))
        return await self.clients.send(upstream, "GET", url, headers)

    async def _save(self, row: BatchRow) -> None:
        try:
            await self.store.save(row)
        except LedgerError as exc:
            log.warning("batch %s not saved to the ledger (%s): it is polled from this process only", row.batch_id, exc)

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._work.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._work.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("batch billing failed: %s", task.exception())


class ResultLines:
    """JSONL results read as they stream by: each complete line parsed once, only its usage kept."""

    MAX_LINE = 256 * 1024 * 1024

    def __init__(self, fmt: BatchFormat) -> None:
        self.fmt = fmt
        self.items: list[BatchItem] = []
        self._partial = b""
        self._index = 0
        self._seen: dict[str, int] = {}
        self.errors = 0

    def feed(self, chunk: bytes) -> None:
        data = self._partial + chunk if self._partial else chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self.MAX_LINE:
            self._partial, self.errors = b"", self.errors + 1
        for line in lines:
            self._line(line)

    def end(self) -> None:
        if self._partial.strip():
            self._line(self._partial)
        self._partial = b""

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        index, self._index = self._index, self._index + 1
        try:
            item = self.fmt.parse_line(line, index)
        except (UsageError, orjson.JSONDecodeError, ValueError, TypeError) as exc:
            self.errors += 1
            log.warning("a batch result line could not be metered: %s", str(exc)[:200])
            item = BatchItem(f"#{index}", "", Usage(), error=str(exc)[:200])
        if item is None:
            return
        # Ids are unique within a batch by the API's rules; a repeat is still a distinct request, billed as such.
        seen = self._seen.get(item.item, 0)
        self._seen[item.item] = seen + 1
        if seen:
            item = replace(item, item=f"{item.item}#{seen + 1}")
        self.items.append(item)

    def take(self) -> list[BatchItem]:
        items, self.items = self.items, []
        return items


# --- taps: batch objects and results passing through the gateway ---------------------------------------------------


class BatchObjectTap(JsonUrlTap):
    """A batch object (create, retrieve, cancel, list) on its way to the client: the batch is registered when
    created, its results file noted, its results billed once it ended. Anthropic's `results_url` is rewritten."""

    def __init__(self, request: TapRequest, meter: BatchMeter, fmt: BatchFormat, fields: tuple[str, ...] = ()) -> None:
        super().__init__(request, fields)
        # A batch being created must be seen whole even if its creator hangs up: else it would never be billed.
        self.drains = True
        self.request = request
        self.meter = meter
        self.fmt = fmt
        self.limit = MAX_BATCH_OBJECT

    def finish(self, complete: bool) -> bytes:
        body = super().finish(complete)
        if complete and self._status == 200:
            try:
                self.inspect(orjson.loads(body))
            except (orjson.JSONDecodeError, UsageError) as exc:
                log.warning("batch object not read: %s", exc)
        return body

    def inspect(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        ctx, upstream = self.request.ctx, self.request.upstream
        provider = upstream.name
        if ctx.match.endpoint.handling == "deferred":
            created = self.fmt.created(obj, ctx.match.params)
            principal = ctx.principal
            if created is not None and principal is not None:
                batch_id, model = created
                self.meter.created(
                    BatchRow(
                        provider=provider,
                        batch_id=batch_id,
                        family=self.fmt.family,
                        team=principal.team,
                        app=principal.app,
                        key_id=principal.key_id,
                        endpoint=ctx.match.endpoint.label,
                        model=model,
                        created_at=self.meter.clock(),
                        user=ctx.attribution.user,
                        tags=ctx.attribution.tags,
                    )
                )
        listed = obj.get("data") if "data" in obj else obj.get("batches")  # a list: OpenAI, Anthropic / Gemini
        objects = [obj] + ([o for o in listed if isinstance(o, dict)] if isinstance(listed, list) else [])
        for o in objects:
            seen_id, ended, output_ref = self.fmt.state(o)
            if seen_id is None:
                continue
            row = self.meter.batch(provider, seen_id)
            inline = self.fmt.inline_items(o) if ended and row is not None else None
            if row is not None and inline is not None:
                self.meter.results_read(row, inline)
            self.meter.learned(provider, seen_id, ended and inline is None, output_ref)


class BatchResultsTap:
    """Results JSONL on its way to the client: relayed untouched, each line's usage read as it passes."""

    rewrites = False
    drains = False  # what the client did not read, the poller bills

    def __init__(self, meter: BatchMeter, row: BatchRow, fmt: BatchFormat) -> None:
        self.meter = meter
        self.row = row
        self.reader = ResultLines(fmt)
        self._status = 0

    def response_headers(self, status: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        self._status = status
        return headers

    def feed(self, chunk: bytes) -> bytes:
        if self._status == 200:
            self.reader.feed(chunk)
            if len(self.reader.items) >= 1000:
                self.meter.results_read(self.row, self.reader.take())
        return chunk

    def finish(self, complete: bool) -> bytes:
        if self._status == 200:
            if complete:
                self.reader.end()
            self.meter.results_read(self.row, self.reader.take())
        return b""


def batch_guards(meter: BatchMeter) -> dict[str, PreForward]:
    """Deleting a batch (Anthropic, Gemini) or a batch's output file (OpenAI) deletes its results: the gateway
    bills them first, and refuses the deletion (503, retry) while it cannot."""

    async def bill_first(request: TapRequest, row: BatchRow | None) -> GatewayError | None:
        if row is None or await meter.poll(row):
            return None
        return GatewayError(
            503,
            "batch_not_billed",
            "metergate has not yet billed this batch's results, which deleting it would destroy; retry shortly.",
            headers={"retry-after": "5"},
        )

    async def anthropic(request: TapRequest) -> GatewayError | None:
        return await bill_first(
            request, meter.batch(request.upstream.name, request.ctx.match.params.get("batch_id", ""))
        )

    async def gemini(request: TapRequest) -> GatewayError | None:
        batch = "batches/" + request.ctx.match.params.get("batch", "")
        return await bill_first(request, meter.batch(request.upstream.name, batch))

    async def openai_file(request: TapRequest) -> GatewayError | None:
        provider, file_id = request.upstream.name, request.ctx.match.params.get("file_id", "")
        if meter.batch_of_output(provider, file_id) is None:
            # Any open batch whose results file is not known yet could be this file's: ask (an ended one is billed).
            for row in [r for r in meter.known.values() if r.provider == provider and not r.output_ref][:50]:
                await meter.poll(row)
        return await bill_first(request, meter.batch_of_output(provider, file_id))

    return {
        "DELETE anthropic_batch": anthropic,
        "DELETE gemini_batch": gemini,
        "DELETE openai_file_delete": openai_file,
    }


def batch_taps(meter: BatchMeter) -> dict[str, TapFactory]:
    def objects(family: str, fields: tuple[str, ...] = ()) -> TapFactory:
        return lambda request: BatchObjectTap(request, meter, FORMATS[family], fields)

    def openai_file(request: TapRequest) -> ResponseTap | None:
        row = meter.batch_of_output(request.upstream.name, request.ctx.match.params.get("file_id", ""))
        return BatchResultsTap(meter, row, FORMATS["openai"]) if row is not None else None

    def anthropic_results(request: TapRequest) -> ResponseTap | None:
        row = meter.batch(request.upstream.name, request.ctx.match.params.get("batch_id", ""))
        return BatchResultsTap(meter, row, FORMATS["anthropic"]) if row is not None else None

    def gemini_download(request: TapRequest) -> ResponseTap | None:
        row = meter.batch_of_output(request.upstream.name, f"files/{request.ctx.match.params.get('file', '')}")
        return BatchResultsTap(meter, row, FORMATS["gemini"]) if row is not None else None

    return {
        "openai_batch": objects("openai"),
        "anthropic_batch": objects("anthropic", ("results_url",)),
        "gemini_batch": objects("gemini"),
        "openai_file_content": openai_file,
        "anthropic_batch_results": anthropic_results,
        "gemini_download": gemini_download,
    }
