"""The simulated providers' stored resources: files, batches, vector stores, fine-tuning jobs, model metadata.

Shapes follow responses recorded against the live APIs (tests/corpus). Batches run when they are created: each
request goes through the same simulated endpoint as a direct call (so it is billed, with `Bill.batch` set), and the
batch reports itself finished `x-sim-batch-ms` after creation (0 by default: at the first retrieve).
"""

from __future__ import annotations

import email.parser
import email.policy
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson

from metergate.simulator import anthropic, gemini, openai
from metergate.simulator.wire import CaptureWire, Wire, rand_id

if TYPE_CHECKING:
    from metergate.simulator.app import SimulatedProvider

BATCH_MS = "x-sim-batch-ms"  # how long after creation a batch reports itself finished


@dataclass
class StoredFile:
    id: str
    family: str
    filename: str
    purpose: str
    data: bytes
    mime_type: str
    created_at: int = field(default_factory=lambda: int(time.time()))

    def openai(self) -> dict[str, Any]:
        return {
            "object": "file",
            "id": self.id,
            "purpose": self.purpose,
            "filename": self.filename,
            "bytes": len(self.data),
            "created_at": self.created_at,
            "expires_at": self.created_at + 2592000 if self.purpose == "batch" else None,
            "status": "processed",
            "status_details": None,
        }

    def anthropic(self) -> dict[str, Any]:
        return {
            "created_at": _iso(self.created_at),
            "downloadable": self.purpose == "output",
            "filename": self.filename,
            "id": self.id,
            "mime_type": self.mime_type,
            "size_bytes": len(self.data),
            "type": "file",
        }

    def gemini(self, base: str, version: str) -> dict[str, Any]:
        return {
            "name": self.id,
            "displayName": self.filename,
            "mimeType": self.mime_type,
            "sizeBytes": str(len(self.data)),
            "createTime": _iso(self.created_at),
            "updateTime": _iso(self.created_at),
            "expirationTime": _iso(self.created_at + 172800),
            "sha256Hash": "c2ltdWxhdGVk",
            "uri": f"{base}/{version}/{self.id}",
            "state": "ACTIVE",
            "source": "UPLOADED",
        }


@dataclass
class SimBatch:
    id: str
    family: str
    created_at: float
    ready_at: float
    model: str = ""
    endpoint: str = ""
    input_file_id: str = ""
    results: list[Any] = field(default_factory=list)  # per request: the line/object the results report
    usage: dict[str, int] = field(default_factory=dict)
    output_file_id: str | None = None
    cancelled: bool = False
    display_name: str = ""

    def ready(self) -> bool:
        return time.time() >= self.ready_at


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


Handler = Callable[..., Awaitable[None]]

# Anthropic model metadata as GET /v1/models answers it.
ANTHROPIC_MODELS = [
    ("claude-opus-4-5-20251101", "Claude Opus 4.5"),
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5"),
]
GEMINI_MODELS = ["gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-embedding-001"]


class Resources:
    def __init__(self, sim: SimulatedProvider) -> None:
        self.sim = sim
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, SimBatch] = {}
        self.vector_stores: dict[str, dict[str, Any]] = {}
        self.uploads: dict[str, dict[str, Any]] = {}  # Gemini resumable upload sessions
        self._routes: list[tuple[str, str, re.Pattern[str], Handler]] = []
        r = self._route
        # OpenAI
        r("openai", "POST", r"/v1/files", self.openai_file_create)
        r("openai", "GET", r"/v1/files", self.openai_file_list)
        r("openai", "GET", r"/v1/files/(?P<id>[^/]+)", self.openai_file_get)
        r("openai", "DELETE", r"/v1/files/(?P<id>[^/]+)", self.openai_file_delete)
        r("openai", "GET", r"/v1/files/(?P<id>[^/]+)/content", self.file_content)
        r("openai", "POST", r"/v1/batches", self.openai_batch_create)
        r("openai", "GET", r"/v1/batches", self.openai_batch_list)
        r("openai", "GET", r"/v1/batches/(?P<id>[^/]+)", self.openai_batch_get)
        r("openai", "POST", r"/v1/batches/(?P<id>[^/]+)/cancel", self.openai_batch_cancel)
        r("openai", "POST", r"/v1/vector_stores", self.vector_store_create)
        r("openai", "GET", r"/v1/vector_stores", self.vector_store_list)
        r("openai", "GET", r"/v1/vector_stores/(?P<id>[^/]+)", self.vector_store_get)
        r("openai", "DELETE", r"/v1/vector_stores/(?P<id>[^/]+)", self.vector_store_delete)
        r("openai", "POST", r"/v1/vector_stores/(?P<id>[^/]+)/files", self.vector_store_add_file)
        r("openai", "GET", r"/v1/fine_tuning/jobs", self.fine_tuning_list)
        r("openai", "POST", r"/v1/fine_tuning/jobs", self.fine_tuning_create)
        r("openai", "POST", r"/v1/moderations", self.moderation)
        # Anthropic
        r("anthropic", "POST", r"/v1/messages/batches", self.anthropic_batch_create)
        r("anthropic", "GET", r"/v1/messages/batches", self.anthropic_batch_list)
        r("anthropic", "GET", r"/v1/messages/batches/(?P<id>[^/]+)", self.anthropic_batch_get)
        r("anthropic", "POST", r"/v1/messages/batches/(?P<id>[^/]+)/cancel", self.anthropic_batch_cancel)
        r("anthropic", "DELETE", r"/v1/messages/batches/(?P<id>[^/]+)", self.anthropic_batch_delete)
        r("anthropic", "GET", r"/v1/messages/batches/(?P<id>[^/]+)/results", self.anthropic_batch_results)
        r("anthropic", "GET", r"/v1/models", self.anthropic_models)
        r("anthropic", "GET", r"/v1/models/(?P<id>[^/]+)", self.anthropic_model)
        r("anthropic", "POST", r"/v1/files", self.anthropic_file_create)
        r("anthropic", "GET", r"/v1/files/(?P<id>[^/]+)", self.anthropic_file_get)
        r("anthropic", "GET", r"/v1/files/(?P<id>[^/]+)/content", self.file_content)
        # Gemini
        v = r"(?P<v>v1beta|v1|v1alpha)"
        r("gemini", "GET", rf"/{v}/models", self.gemini_models)
        r("gemini", "GET", rf"/{v}/models/(?P<id>[^/:]+)", self.gemini_model)
        r("gemini", "POST", rf"/upload/{v}/files", self.gemini_upload)
        r("gemini", "GET", rf"/{v}/files", self.gemini_file_list)
        r("gemini", "GET", rf"/{v}/files/(?P<id>[^/:]+)", self.gemini_file_get)
        r("gemini", "DELETE", rf"/{v}/files/(?P<id>[^/:]+)", self.gemini_file_delete)
        r("gemini", "GET", rf"/download/{v}/files/(?P<id>[^/:]+):download", self.gemini_download)
        r("gemini", "GET", rf"/{v}/files/(?P<id>[^/:]+):download", self.gemini_download)
        r("gemini", "POST", rf"/{v}/models/(?P<model>[^/:]+):batchGenerateContent", self.gemini_batch_create)
        r("gemini", "GET", rf"/{v}/batches/(?P<id>[^/:]+)", self.gemini_batch_get)
        r("gemini", "POST", rf"/{v}/batches/(?P<id>[^/:]+):cancel", self.gemini_batch_cancel)
        r("gemini", "DELETE", rf"/{v}/batches/(?P<id>[^/:]+)", self.gemini_batch_delete)

    def _route(self, family: str, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((family, method, re.compile(f"^{pattern}$"), handler))

    async def handle(self, family: str, req: Request) -> bool:
        for fam, method, pattern, handler in self._routes:
            if fam == family and method == req.method and (m := pattern.match(req.path)):
                await handler(req, **m.groupdict())
                return True
        return False

    # --- helpers ------------------------------------------------------------------------------------------------

    def _store(self, family: str, filename: str, purpose: str, data: bytes, mime: str, prefix: str) -> StoredFile:
        f = StoredFile(prefix + rand_id(22), family, filename, purpose, data, mime)
        self.files[f.id] = f
        return f

    async def file_content(self, req: Request, id: str) -> None:
        f = self.files.get(id)
        if f is None or f.family != req.family:
            await self.sim.error(req.wire, req.family, 404, f"No such File object: {id}")
            return
        await req.wire.raw(200, f.data, "application/octet-stream" if f.family == "openai" else "application/binary")

    async def _run(
        self, req: Request, family: str, api: str, model: str, body: dict[str, Any], batch: str, cid: str
    ) -> tuple[int, Any]:
        """One batched request through the simulated endpoint, billed as part of `batch`."""
        capture = CaptureWire()
        raw = orjson.dumps(body)
        bill = await self.sim.generate(family, api, model, "", req.headers, raw, body, capture)
        if bill is not None:
            bill.batch, bill.custom_id = batch, cid
        try:
            return capture.status, orjson.loads(capture.body)
        except orjson.JSONDecodeError:
            return capture.status, None

    def _ready_at(self, req: Request) -> float:
        ms = req.headers.get(BATCH_MS, "0")
        return time.time() + (int(ms) / 1000 if ms.isdigit() else 0)

    # --- OpenAI files -----------------------------------------------------------------------------------------------

    async def openai_file_create(self, req: Request) -> None:
        fields, files = parse_multipart(req.headers.get("content-type", ""), req.raw)
        if "file" not in files or "purpose" not in fields:
            await req.wire.json(400, openai.error(400, "Missing required parameter: 'file' and 'purpose'."))
            return
        name, data, mime = files["file"]
        f = self._store("openai", name, fields["purpose"], data, mime, "file-")
        await req.wire.json(200, f.openai())

    async def openai_file_list(self, req: Request) -> None:
        data = [f.openai() for f in self.files.values() if f.family == "openai"]
        await req.wire.json(200, _page(data))

    async def openai_file_get(self, req: Request, id: str) -> None:
        f = self.files.get(id)
        if f is None or f.family != "openai":
            await req.wire.json(404, openai.error(404, f"No such File object: {id}", code=None))
            return
        await req.wire.json(200, f.openai())

    async def openai_file_delete(self, req: Request, id: str) -> None:
        self.files.pop(id, None)
        await req.wire.json(200, {"id": id, "object": "file", "deleted": True})

    # --- OpenAI batches ---------------------------------------------------------------------------------------------

    async def openai_batch_create(self, req: Request) -> None:
        body = req.json()
        source = self.files.get(str(body.get("input_file_id")))
        endpoint = str(body.get("endpoint", ""))
        apis = {
            "/v1/chat/completions": "openai.chat.completions",
            "/v1/responses": "openai.responses",
            "/v1/embeddings": "openai.embeddings",
            "/v1/completions": "openai.completions",
        }
        if source is None or endpoint not in apis:
            await req.wire.json(400, openai.error(400, "Invalid input_file_id or endpoint."))
            return
        batch = SimBatch("batch_" + rand_id(32).lower(), "openai", time.time(), self._ready_at(req), endpoint=endpoint)
        batch.input_file_id = source.id
        usage = {"input_tokens": 0, "cached_tokens": 0, "output_tokens": 0, "reasoning_tokens": 0}
        lines = []
        for line in source.data.splitlines():
            if not line.strip():
                continue
            item = orjson.loads(line)
            cid, request = item["custom_id"], item["body"]
            batch.model = batch.model or openai.MODEL_VERSIONS.get(request["model"], request["model"])
            status, response = await self._run(req, "openai", apis[endpoint], request["model"], request, batch.id, cid)
            lines.append(
                {
                    "id": "batch_req_" + rand_id(32).lower(),
                    "custom_id": cid,
                    "response": {"status_code": status, "request_id": rand_id(32).lower(), "body": response},
                    "error": None,
                }
            )
            u = (response or {}).get("usage") or {}
            usage["input_tokens"] += u.get("prompt_tokens", u.get("input_tokens", 0))
            usage["output_tokens"] += u.get("completion_tokens", u.get("output_tokens", 0))
            details = u.get("prompt_tokens_details") or u.get("input_tokens_details") or {}
            usage["cached_tokens"] += details.get("cached_tokens", 0)
        output = self._store(
            "openai",
            "batch_output.jsonl",
            "batch_output",
            b"".join(orjson.dumps(x) + b"\n" for x in lines),
            "application/jsonl",
            "file-",
        )
        batch.output_file_id = output.id
        batch.results = lines
        batch.usage = usage
        self.batches[batch.id] = batch
        await req.wire.json(200, self._openai_batch(batch, created=True))

    def _openai_batch(self, b: SimBatch, created: bool = False) -> dict[str, Any]:
        done = b.ready() and not created
        status = "cancelling" if b.cancelled else ("completed" if done else "validating")
        u = b.usage if done else {}
        n = len(b.results)
        return {
            "id": b.id,
            "object": "batch",
            "endpoint": b.endpoint,
            "errors": None,
            "input_file_id": b.input_file_id,
            "completion_window": "24h",
            "status": status,
            "output_file_id": b.output_file_id if done else None,
            "error_file_id": None,
            "created_at": int(b.created_at),
            "in_progress_at": int(b.created_at) if done else None,
            "expires_at": int(b.created_at) + 86400,
            "finalizing_at": int(b.ready_at) if done else None,
            "completed_at": int(b.ready_at) if done else None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": int(time.time()) if b.cancelled else None,
            "cancelled_at": None,
            "request_counts": {"total": n if done else 0, "completed": n if done else 0, "failed": 0},
            "metadata": None,
            "model": b.model if done else None,
            "usage": {
                "input_tokens": u.get("input_tokens", 0),
                "input_tokens_details": {"cached_tokens": u.get("cached_tokens", 0)},
                "output_tokens": u.get("output_tokens", 0),
                "output_tokens_details": {"reasoning_tokens": u.get("reasoning_tokens", 0)},
                "total_tokens": u.get("input_tokens", 0) + u.get("output_tokens", 0),
            },
        }

    async def openai_batch_list(self, req: Request) -> None:
        data = [self._openai_batch(b) for b in self.batches.values() if b.family == "openai"]
        await req.wire.json(200, _page(data))

    async def openai_batch_get(self, req: Request, id: str) -> None:
        b = self.batches.get(id)
        if b is None or b.family != "openai":
            await req.wire.json(404, openai.error(404, f"No batch found with id '{id}'.", code=None))
            return
        await req.wire.json(200, self._openai_batch(b))

    async def openai_batch_cancel(self, req: Request, id: str) -> None:
        b = self.batches.get(id)
        if b is None:
            await req.wire.json(404, openai.error(404, f"No batch found with id '{id}'.", code=None))
            return
        b.cancelled = True
        await req.wire.json(200, self._openai_batch(b))

    # --- OpenAI vector stores, fine-tuning, moderations -------------------------------------------------------------

    async def vector_store_create(self, req: Request) -> None:
        body = req.json()
        now = int(time.time())
        file_ids = [str(f) for f in body.get("file_ids") or []]
        vs_id = "vs_" + rand_id(32)
        vs: dict[str, Any] = {
            "id": vs_id,
            "object": "vector_store",
            "created_at": now,
            "name": body.get("name") or "",
            "usage_bytes": 0,
            "file_counts": {
                "in_progress": 0,
                "completed": len(file_ids),
                "failed": 0,
                "cancelled": 0,
                "total": len(file_ids),
            },
            "status": "completed",
            "expires_after": None,
            "expires_at": None,
            "last_active_at": now,
            "metadata": body.get("metadata") or {},
            "_files": file_ids,
        }
        self.vector_stores[vs_id] = vs
        await req.wire.json(200, _public(vs))

    async def vector_store_list(self, req: Request) -> None:
        await req.wire.json(200, _page([_public(v) for v in self.vector_stores.values()]))

    async def vector_store_get(self, req: Request, id: str) -> None:
        vs = self.vector_stores.get(id)
        if vs is None:
            await req.wire.json(404, openai.error(404, f"No vector store found with id '{id}'.", code=None))
            return
        await req.wire.json(200, _public(vs))

    async def vector_store_delete(self, req: Request, id: str) -> None:
        self.vector_stores.pop(id, None)
        await req.wire.json(200, {"id": id, "object": "vector_store.deleted", "deleted": True})

    async def vector_store_add_file(self, req: Request, id: str) -> None:
        body = req.json()
        vs = self.vector_stores.get(id)
        if vs is None:
            await req.wire.json(404, openai.error(404, f"No vector store found with id '{id}'.", code=None))
            return
        vs["_files"].append(str(body.get("file_id")))
        await req.wire.json(
            200,
            {
                "id": str(body.get("file_id")),
                "object": "vector_store.file",
                "usage_bytes": 0,
                "created_at": int(time.time()),
                "vector_store_id": id,
                "status": "completed",
                "last_error": None,
                "chunking_strategy": {
                    "type": "static",
                    "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400},
                },
                "attributes": {},
            },
        )

    async def fine_tuning_list(self, req: Request) -> None:
        await req.wire.json(200, {"object": "list", "data": [], "has_more": False})

    async def fine_tuning_create(self, req: Request) -> None:
        body = req.json()
        now = int(time.time())
        await req.wire.json(
            200,
            {
                "object": "fine_tuning.job",
                "id": "ftjob-" + rand_id(24),
                "model": body.get("model"),
                "created_at": now,
                "finished_at": None,
                "fine_tuned_model": None,
                "organization_id": "org-sim",
                "result_files": [],
                "status": "validating_files",
                "validation_file": body.get("validation_file"),
                "training_file": body.get("training_file"),
                "hyperparameters": {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"},
                "trained_tokens": None,
                "error": {},
                "user_provided_suffix": None,
                "seed": 42,
                "estimated_finish": None,
                "integrations": [],
                "metadata": None,
                "method": {"type": "supervised"},
            },
        )

    async def moderation(self, req: Request) -> None:
        body = req.json()
        inputs = body.get("input")
        n = len(inputs) if isinstance(inputs, list) else 1
        categories = ["harassment", "hate", "self-harm", "sexual", "violence"]
        result = {
            "flagged": False,
            "categories": dict.fromkeys(categories, False),
            "category_scores": dict.fromkeys(categories, 0.0001),
            "category_applied_input_types": {c: ["text"] for c in categories},
        }
        await req.wire.json(
            200,
            {
                "id": "modr-" + rand_id(24),
                "model": body.get("model") or "omni-moderation-latest",
                "results": [result] * n,
            },
        )

    # --- Anthropic ----------------------------------------------------------------------------------------------------

    async def anthropic_batch_create(self, req: Request) -> None:
        body = req.json()
        batch = SimBatch("msgbatch_01" + rand_id(22), "anthropic", time.time(), self._ready_at(req))
        for item in body.get("requests") or []:
            cid, params = item["custom_id"], dict(item["params"])
            params.pop("stream", None)
            status, message = await self._run(req, "anthropic", "anthropic.messages", "", params, batch.id, cid)
            if status == 200 and isinstance(message, dict):
                message["usage"]["service_tier"] = "batch"
                result: dict[str, Any] = {"type": "succeeded", "message": message}
            else:
                result = {"type": "errored", "error": message}
            batch.results.append({"custom_id": cid, "result": result})
        self.batches[batch.id] = batch
        await req.wire.json(200, self._anthropic_batch(batch, req.base, created=True))

    def _anthropic_batch(self, b: SimBatch, base: str, created: bool = False) -> dict[str, Any]:
        done = b.ready() and not created
        n = len(b.results)
        ok = sum(1 for r in b.results if r["result"]["type"] == "succeeded")
        return {
            "id": b.id,
            "type": "message_batch",
            "processing_status": "ended" if done else ("canceling" if b.cancelled else "in_progress"),
            "request_counts": {
                "processing": 0 if done else n,
                "succeeded": ok if done else 0,
                "errored": n - ok if done else 0,
                "canceled": 0,
                "expired": 0,
            },
            "ended_at": _iso(b.ready_at) if done else None,
            "created_at": _iso(b.created_at),
            "expires_at": _iso(b.created_at + 86400),
            "archived_at": None,
            "cancel_initiated_at": _iso(time.time()) if b.cancelled else None,
            # Absolute, on the provider's own host, as the real API answers.
            "results_url": f"{base}/v1/messages/batches/{b.id}/results" if done else None,
        }

    async def anthropic_batch_list(self, req: Request) -> None:
        data = [self._anthropic_batch(b, req.base) for b in self.batches.values() if b.family == "anthropic"]
        await req.wire.json(
            200,
            {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            },
        )

    async def anthropic_batch_get(self, req: Request, id: str) -> None:
        b = self.batches.get(id)
        if b is None or b.family != "anthropic":
            await req.wire.json(404, anthropic.error(404, f"Batch {id} not found"))
            return
        await req.wire.json(200, self._anthropic_batch(b, req.base))

    async def anthropic_batch_cancel(self, req: Request, id: str) -> None:
        b = self.batches.get(id)
        if b is None:
            await req.wire.json(404, anthropic.error(404, f"Batch {id} not found"))
            return
        b.cancelled = True
        await req.wire.json(200, self._anthropic_batch(b, req.base))

    async def anthropic_batch_delete(self, req: Request, id: str) -> None:
        b = self.batches.get(id)
        if b is None or not b.ready():
            await req.wire.json(400, anthropic.error(400, f"Batch {id} cannot be deleted while it is processing"))
            return
        del self.batches[id]
        await req.wire.json(200, {"id": id, "type": "message_batch_deleted"})

    async def anthropic_batch_results(self, req: Request, id: str) -> None:
        b = self.batches.get(id)
        if b is None or not b.ready():
            await req.wire.json(404, anthropic.error(404, f"Batch {id} has no results yet"))
            return
        body = b"".join(orjson.dumps(r) + b"\n" for r in b.results)
        await req.wire.raw(200, body, "application/binary")

    async def anthropic_models(self, req: Request) -> None:
        data = [_anthropic_model(m, n) for m, n in ANTHROPIC_MODELS]
        await req.wire.json(
            200, {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
        )

    async def anthropic_model(self, req: Request, id: str) -> None:
        found = next((m for m in ANTHROPIC_MODELS if m[0] == id or m[0].startswith(id + "-")), None)
        if found is None:
            await req.wire.json(404, anthropic.error(404, f"model: {id}"))
            return
        await req.wire.json(200, _anthropic_model(*found))

    async def anthropic_file_create(self, req: Request) -> None:
        _, files = parse_multipart(req.headers.get("content-type", ""), req.raw)
        if "file" not in files:
            await req.wire.json(400, anthropic.error(400, "file: Field required"))
            return
        name, data, mime = files["file"]
        f = self._store("anthropic", name, "user", data, mime, "file_011C")
        await req.wire.json(200, f.anthropic())

    async def anthropic_file_get(self, req: Request, id: str) -> None:
        f = self.files.get(id)
        if f is None or f.family != "anthropic":
            await req.wire.json(404, anthropic.error(404, f"File not found: {id}"))
            return
        await req.wire.json(200, f.anthropic())

    # --- Gemini -----------------------------------------------------------------------------------------------------

    async def gemini_models(self, req: Request, v: str) -> None:
        await req.wire.json(200, {"models": [_gemini_model(m) for m in GEMINI_MODELS]}, indent=True)

    async def gemini_model(self, req: Request, v: str, id: str) -> None:
        if id not in GEMINI_MODELS:
            await req.wire.json(404, gemini.error(404, f"models/{id} is not found for API version {v}"), indent=True)
            return
        await req.wire.json(200, _gemini_model(id), indent=True)

    async def gemini_upload(self, req: Request, v: str) -> None:
        command = req.headers.get("x-goog-upload-command", "").replace(" ", "")
        upload_id = parse_qs(req.query).get("upload_id", [None])[0]
        if command == "start":
            meta = req.json().get("file") or {}
            upload_id = rand_id(40)
            self.uploads[upload_id] = {
                "name": meta.get("display_name") or meta.get("displayName") or "upload",
                "mime": req.headers.get("x-goog-upload-header-content-type", "application/octet-stream"),
                "data": b"",
            }
            url = f"{req.base}/upload/{v}/files?upload_id={upload_id}&upload_protocol=resumable"
            await req.wire.raw(
                200,
                b"",
                "text/plain; charset=utf-8",
                {
                    "x-goog-upload-url": url,
                    "x-goog-upload-status": "active",
                    "x-goog-upload-chunk-granularity": "8388608",
                },
            )
            return
        session = self.uploads.get(upload_id or "")
        if session is None:
            await req.wire.json(404, gemini.error(404, "Upload session not found."), indent=True)
            return
        session["data"] += req.raw
        if "finalize" not in command.split(","):
            await req.wire.raw(200, b"", "text/plain; charset=utf-8", {"x-goog-upload-status": "active"})
            return
        del self.uploads[upload_id or ""]
        f = self._store("gemini", session["name"], "user", session["data"], session["mime"], "files/")
        await req.wire.json(200, {"file": f.gemini(req.base, v)}, {"x-goog-upload-status": "final"}, indent=True)

    async def gemini_file_list(self, req: Request, v: str) -> None:
        files = [f.gemini(req.base, v) for f in self.files.values() if f.family == "gemini"]
        await req.wire.json(200, {"files": files} if files else {}, indent=True)

    async def gemini_file_get(self, req: Request, v: str, id: str) -> None:
        f = self.files.get(f"files/{id}")
        if f is None:
            await req.wire.json(
                403,
                gemini.error(403, f"You do not have permission to access the File {id} or it may not exist."),
                indent=True,
            )
            return
        await req.wire.json(200, f.gemini(req.base, v), indent=True)

    async def gemini_file_delete(self, req: Request, v: str, id: str) -> None:
        self.files.pop(f"files/{id}", None)
        await req.wire.json(200, {}, indent=True)

    async def gemini_download(self, req: Request, v: str, id: str) -> None:
        f = self.files.get(f"files/{id}")
        if f is None:
            await req.wire.json(404, gemini.error(404, f"File {id} not found."), indent=True)
            return
        await req.wire.raw(200, f.data, f.mime_type)

    async def gemini_batch_create(self, req: Request, v: str, model: str) -> None:
        body = req.json().get("batch") or {}
        config = body.get("inputConfig") or body.get("input_config") or {}
        batch = SimBatch("batches/" + rand_id(36).lower(), "gemini", time.time(), self._ready_at(req), model=model)
        batch.display_name = body.get("displayName") or body.get("display_name") or ""
        inline = (config.get("requests") or {}).get("requests")
        file_name = config.get("fileName") or config.get("file_name")
        items: list[tuple[str | None, dict[str, Any]]] = []
        if inline is not None:
            items = [(((r.get("metadata") or {}).get("key")), r["request"]) for r in inline]
        elif file_name and file_name in self.files:
            for line in self.files[file_name].data.splitlines():
                if line.strip():
                    obj = orjson.loads(line)
                    items.append((obj.get("key"), obj["request"]))
        for i, (key, request) in enumerate(items):
            status, response = await self._run(
                req, "gemini", "gemini.generateContent", model, request, batch.id, key or str(i)
            )
            batch.results.append(
                {"key": key, "response": response} if status == 200 else {"key": key, "error": response}
            )
        if file_name:
            out = b"".join(orjson.dumps({k: x for k, x in r.items() if x is not None}) + b"\n" for r in batch.results)
            batch.output_file_id = self._store(
                "gemini", "batch-output", "output", out, "application/jsonl", "files/"
            ).id
        self.batches[batch.id] = batch
        await req.wire.json(200, self._gemini_batch(batch, created=True), indent=True)

    def _gemini_batch(self, b: SimBatch, created: bool = False) -> dict[str, Any]:
        done = b.ready() and not created
        n = len(b.results)
        stats = {"requestCount": str(n)}
        stats["successfulRequestCount" if done else "pendingRequestCount"] = str(n)
        metadata = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "model": f"models/{b.model}",
            "displayName": b.display_name,
            "createTime": _iso(b.created_at),
            "updateTime": _iso(b.ready_at if done else b.created_at),
            "batchStats": stats,
            "state": "BATCH_STATE_SUCCEEDED"
            if done
            else ("BATCH_STATE_CANCELLED" if b.cancelled else "BATCH_STATE_PENDING"),
            "name": b.id,
        }
        out: dict[str, Any] = {"name": b.id, "metadata": metadata}
        if done:
            metadata["endTime"] = _iso(b.ready_at)
            out["done"] = True
            output: dict[str, Any] = {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
            }
            if b.output_file_id:
                output["responsesFile"] = b.output_file_id
            else:
                output["inlinedResponses"] = {
                    "inlinedResponses": [
                        {
                            k: x
                            for k, x in (
                                ("response", r.get("response")),
                                ("error", r.get("error")),
                                ("metadata", {"key": r["key"]} if r["key"] else None),
                            )
                            if x is not None
                        }
                        for r in b.results
                    ]
                }
            metadata["output"] = {k: x for k, x in output.items() if k != "@type"}
            out["response"] = output
        return out

    async def gemini_batch_get(self, req: Request, v: str, id: str) -> None:
        b = self.batches.get(f"batches/{id}")
        if b is None:
            await req.wire.json(404, gemini.error(404, f"Batch batches/{id} not found."), indent=True)
            return
        await req.wire.json(200, self._gemini_batch(b), indent=True)

    async def gemini_batch_cancel(self, req: Request, v: str, id: str) -> None:
        b = self.batches.get(f"batches/{id}")
        if b is not None:
            b.cancelled = True
        await req.wire.json(200, {}, indent=True)

    async def gemini_batch_delete(self, req: Request, v: str, id: str) -> None:
        self.batches.pop(f"batches/{id}", None)
        await req.wire.json(200, {}, indent=True)


@dataclass
class Request:
    """One request to the simulated provider, as the resource handlers see it."""

    family: str
    method: str
    path: str
    query: str
    headers: dict[str, str]
    raw: bytes
    wire: Wire

    @property
    def base(self) -> str:
        """The provider's own base URL, as the client reached it (for the absolute URLs real APIs answer with)."""
        return f"http://{self.headers.get('host', 'localhost')}"

    def json(self) -> dict[str, Any]:
        try:
            value = orjson.loads(self.raw) if self.raw else {}
        except orjson.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}


def parse_multipart(content_type: str, raw: bytes) -> tuple[dict[str, str], dict[str, tuple[str, bytes, str]]]:
    """Form fields and files of a multipart/form-data body (the standard library's MIME parser: the simulator shares
    no parsing code with the gateway)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw
    )
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes, str]] = {}
    if not message.is_multipart():
        return fields, files
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        filename = part.get_filename()
        if filename is not None:
            key = name if name not in files else f"{name}#{len(files)}"  # repeated `image[]` parts are all kept
            files[key] = (filename, data, part.get_content_type())
        else:
            fields[name] = data.decode()
    return fields, files


def _page(data: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": False,
    }


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def _anthropic_model(model_id: str, name: str) -> dict[str, Any]:
    return {"type": "model", "id": model_id, "display_name": name, "created_at": "2025-09-29T00:00:00Z"}


def _gemini_model(model: str) -> dict[str, Any]:
    embedding = "embedding" in model
    return {
        "name": f"models/{model}",
        "version": "001",
        "displayName": model.replace("-", " ").title(),
        "description": f"Simulated {model}",
        "inputTokenLimit": 2048 if embedding else 1048576,
        "outputTokenLimit": 1 if embedding else 65536,
        "supportedGenerationMethods": ["embedContent", "countTextTokens", "countTokens"]
        if embedding
        else ["generateContent", "countTokens", "createCachedContent", "batchGenerateContent"],
        **({} if embedding else {"temperature": 1, "topP": 0.95, "topK": 64, "maxTemperature": 2, "thinking": True}),
    }
