"""The simulated providers' admin APIs: OpenAI's organization Usage and Costs APIs and project keys, Anthropic's
usage and cost reports and API keys, answered from what the simulator billed (`Bill`s) in the documented shapes:
daily buckets, `limit` buckets per page, `next_page` tokens, group_by honoured, nulls where not grouped.

Admin calls need the family's admin key; `SimulatedProvider.admin_failures` makes the next calls fail (429 with
`retry-after`, or any status) to test how a reader copes.
"""

from __future__ import annotations

import base64
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from metergate.simulator import anthropic, openai
from metergate.simulator.billing import billed, family_of, key_id, redacted
from metergate.simulator.plan import Bill
from metergate.simulator.wire import Wire

if TYPE_CHECKING:
    from metergate.simulator.app import SimulatedProvider

OPENAI_USAGE = "/v1/organization/usage/"
PROJECT = "proj_sim"
_LIMITS = {"1d": (7, 31), "1h": (24, 168), "1m": (60, 1440)}
_ENDPOINT_OF_API = {
    "openai.chat.completions": "completions",
    "openai.completions": "completions",
    "openai.responses": "completions",
    "openai.embeddings": "embeddings",
    "openai.media.images": "images",
    "openai.media.speech": "audio_speeches",
    "openai.media.transcription": "audio_transcriptions",
    "openai.media.translation": "audio_transcriptions",
}
# The real reports name the dated snapshot a request ran on, not the alias it asked for.
SNAPSHOTS = {
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
}
_ANTHROPIC_WORDS = {
    "uncached_input_tokens": "Input Tokens",
    "cache_read_input_tokens": "Cache Read Tokens",
    "cache_creation.ephemeral_5m_input_tokens": "Cache Write Tokens (5m)",
    "cache_creation.ephemeral_1h_input_tokens": "Cache Write Tokens (1h)",
    "output_tokens": "Output Tokens",
}


def is_admin_path(path: str) -> bool:
    return path.startswith(("/v1/organization/", "/v1/organizations/"))


def presented_key(family: str, headers: dict[str, str]) -> str:
    """The credential of an OpenAI or Anthropic request (Anthropic also takes `Authorization: Bearer`, which its SDK
    sends for keys that do not look like `sk-ant-api...`)."""
    bearer = headers.get("authorization", "").removeprefix("Bearer ")
    return headers.get("x-api-key", bearer) if family == "anthropic" else bearer


class _Query:
    def __init__(self, query: str) -> None:
        self.items = parse_qsl(query, keep_blank_values=True)

    def one(self, name: str) -> str | None:
        return next((v for k, v in self.items if k == name), None)

    def many(self, name: str) -> list[str]:
        """Array parameters arrive as `name[]=a&name[]=b` or `name=a&name=b`: both are accepted, as the APIs do."""
        return [v for k, v in self.items if k in (name, name + "[]")]


class _BadRequest(Exception):
    pass


def _day_starts(start: int, end: int) -> list[int]:
    """Daily buckets: the first starts at `start`, the others at UTC midnights, the last ends at `end`."""
    out = [start]
    t = (start // 86400 + 1) * 86400
    while t < end:
        out.append(t)
        t += 86400
    return out


def _page(starts: list[int], query: _Query, cap: int | None = None) -> tuple[list[int], str | None]:
    width = query.one("bucket_width") or "1d"
    if width != "1d":
        raise _BadRequest("the simulator serves daily buckets only (bucket_width=1d)")
    default, cap = _LIMITS[width][0], cap or _LIMITS[width][1]
    try:
        limit = int(query.one("limit") or default)
    except ValueError:
        raise _BadRequest("limit must be an integer") from None
    if not 1 <= limit <= cap:
        raise _BadRequest(f"limit must be between 1 and {cap}")
    first = 0
    token = query.one("page")
    if token:
        try:
            first = starts.index(int(base64.urlsafe_b64decode(token.removeprefix("page_")).decode()))
        except (ValueError, UnicodeDecodeError):
            raise _BadRequest("invalid page") from None
    chosen = starts[first : first + limit]
    rest = starts[first + limit :]
    return chosen, ("page_" + base64.urlsafe_b64encode(str(rest[0]).encode()).decode()) if rest else None


def _rfc3339(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_rfc3339(text: str | None, what: str) -> int:
    if not text:
        raise _BadRequest(f"{what} is required")
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
    except ValueError:
        raise _BadRequest(f"{what} is not an RFC 3339 timestamp") from None


class AdminAPI:
    def __init__(self, sim: SimulatedProvider) -> None:
        self.sim = sim

    def _bills(self, family: str, start: int, end: int) -> Iterable[tuple[Bill, str]]:
        for bill in list(self.sim.bills):
            if billed(bill) and family_of(bill) == family and start <= bill.at < end:
                yield bill, key_id(family, presented_key(family, bill.headers))

    async def handle(
        self, family: str, method: str, path: str, query: str, headers: dict[str, str], wire: Wire
    ) -> None:
        expected = self.sim.admin_keys.get(family)
        if expected is None or presented_key(family, headers) != expected:
            await self.sim.error(wire, family, 401, "Invalid admin API key.")
            return
        if self.sim.admin_failures:
            status = self.sim.admin_failures.popleft()
            body = (anthropic.error if family == "anthropic" else openai.error)(status, f"Simulated failure {status}.")
            await wire.json(status, body, {"retry-after": "0"} if status == 429 else None)
            return
        self.sim.admin_calls.append(f"{method} {path}?{query}")
        q = _Query(query)
        try:
            answer = self._answer(family, method, path, q)
        except _BadRequest as exc:
            await self.sim.error(wire, family, 400, str(exc))
            return
        if answer is None:
            await self.sim.error(wire, family, 404, f"Unknown path {method} {path}")
            return
        await wire.json(200, answer)

    def _answer(self, family: str, method: str, path: str, q: _Query) -> dict[str, Any] | None:
        keys: list[dict[str, Any]]
        if method != "GET":
            return None
        if family == "openai":
            if path.startswith(OPENAI_USAGE):
                return self._openai_usage(path.removeprefix(OPENAI_USAGE), q)
            if path == "/v1/organization/costs":
                return self._openai_costs(q)
            if path == "/v1/organization/projects":
                return self._list(
                    [
                        {
                            "id": PROJECT,
                            "object": "organization.project",
                            "name": "Default project",
                            "created_at": 1700000000,
                            "archived_at": None,
                            "status": "active",
                        }
                    ],
                    q,
                    "after",
                )
            if path == f"/v1/organization/projects/{PROJECT}/api_keys":
                keys = [
                    {
                        "object": "organization.project.api_key",
                        "redacted_value": redacted(k),
                        "name": f"key {i}",
                        "created_at": 1700000000,
                        "last_used_at": None,
                        "id": key_id("openai", k),
                        "owner": {},
                    }
                    for i, k in enumerate(self.sim.accepted_keys("openai"))
                ]
                return self._list(keys, q, "after")
        elif family == "anthropic":
            if path == "/v1/organizations/usage_report/messages":
                return self._anthropic_usage(q)
            if path == "/v1/organizations/cost_report":
                return self._anthropic_costs(q)
            if path == "/v1/organizations/api_keys":
                keys = [
                    {
                        "id": key_id("anthropic", k),
                        "type": "api_key",
                        "name": f"key {i}",
                        "status": "active",
                        "partial_key_hint": redacted(k),
                        "workspace_id": None,
                        "created_at": "2024-10-30T23:58:27Z",
                        "created_by": {"id": "user_sim", "type": "user"},
                    }
                    for i, k in enumerate(self.sim.accepted_keys("anthropic"))
                ]
                return self._list(keys, q, "after_id")
        return None

    @staticmethod
    def _list(items: list[dict[str, Any]], q: _Query, cursor: str) -> dict[str, Any]:
        try:
            limit = int(q.one("limit") or 20)
        except ValueError:
            raise _BadRequest("limit must be an integer") from None
        if not 1 <= limit <= 1000:
            raise _BadRequest("limit must be between 1 and 1000")
        after = q.one(cursor)
        start = next((i + 1 for i, it in enumerate(items) if it["id"] == after), 0) if after else 0
        chosen = items[start : start + limit]
        out: dict[str, Any] = {"data": chosen, "has_more": start + limit < len(items)}
        out["first_id"] = chosen[0]["id"] if chosen else None
        out["last_id"] = chosen[-1]["id"] if chosen else None
        if cursor == "after":
            out["object"] = "list"
        return out

    # --- OpenAI -------------------------------------------------------------------------------------------------

    def _openai_span(self, q: _Query) -> tuple[int, int]:
        try:
            start = int(q.one("start_time") or "")
            end = int(q.one("end_time") or 0) or start + 7 * 86400
        except ValueError:
            raise _BadRequest("start_time and end_time are Unix seconds") from None
        return start, end

    def _openai_usage(self, endpoint: str, q: _Query) -> dict[str, Any] | None:
        if endpoint not in set(_ENDPOINT_OF_API.values()) | {"moderations"}:
            return None
        start, end = self._openai_span(q)
        chosen, next_page = _page(_day_starts(start, end), q)
        group = set(q.many("group_by"))
        data = []
        for b_start in chosen:
            b_end = min((b_start // 86400 + 1) * 86400, end)
            rows: dict[tuple[Any, ...], dict[str, Any]] = {}
            for bill, key in self._bills("openai", b_start, b_end):
                if _ENDPOINT_OF_API.get(bill.api) != endpoint:
                    continue
                dims = {
                    "model": SNAPSHOTS.get(bill.model, bill.model) if "model" in group else None,
                    "api_key_id": key if "api_key_id" in group else None,
                    "project_id": PROJECT if "project_id" in group else None,
                    "user_id": None,
                    "batch": bool(bill.batch) if "batch" in group else None,
                }
                row = rows.setdefault(
                    tuple(dims.values()),
                    {"object": f"organization.usage.{endpoint}.result", "num_model_requests": 0, **dims},
                )
                row["num_model_requests"] += 1
                p = bill.planned
                if endpoint in ("completions", "embeddings"):
                    row["input_tokens"] = row.get("input_tokens", 0) + p.input
                if endpoint == "completions":
                    row["output_tokens"] = row.get("output_tokens", 0) + p.output
                    row["input_cached_tokens"] = row.get("input_cached_tokens", 0) + p.cached
                    row.setdefault("input_audio_tokens", 0)
                    row.setdefault("output_audio_tokens", 0)
                if endpoint == "images":
                    row["images"] = row.get("images", 0) + bill.units.get("image", 0)
                if endpoint == "audio_speeches":
                    row["characters"] = row.get("characters", 0) + bill.units.get("character", 0)
                if endpoint == "audio_transcriptions":
                    row["seconds"] = row.get("seconds", 0) + bill.units.get("audio_second", 0)
            data.append({"object": "bucket", "start_time": b_start, "end_time": b_end, "results": list(rows.values())})
        return {"object": "page", "data": data, "has_more": next_page is not None, "next_page": next_page}

    def _openai_costs(self, q: _Query) -> dict[str, Any]:
        start, end = self._openai_span(q)
        if (q.one("bucket_width") or "1d") != "1d":
            raise _BadRequest("bucket_width must be 1d")
        chosen, next_page = _page(_day_starts(start, end), q, cap=180)
        group = set(q.many("group_by"))
        data = []
        for b_start in chosen:
            b_end = min((b_start // 86400 + 1) * 86400, end)
            sums: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [Decimal(0), 0])
            for bill, key in self._bills("openai", b_start, b_end):
                for kind, (n, usd) in self.sim.price_list.charges(bill).items():
                    line = f"{SNAPSHOTS.get(bill.model, bill.model)}, {kind}" if "line_item" in group else None
                    k = (line, key if "api_key_id" in group else None)
                    sums[k][0] += usd
                    sums[k][1] += n
            results = [
                {
                    "object": "organization.costs.result",
                    "amount": {"value": float(usd), "currency": "usd"},
                    "line_item": line,
                    "project_id": None,
                    "api_key_id": key,
                    "quantity": n if line else None,
                    "quantity_unit": "tokens" if line else None,
                }
                for (line, key), (usd, n) in sums.items()
            ]
            data.append({"object": "bucket", "start_time": b_start, "end_time": b_end, "results": results})
        return {"object": "page", "data": data, "has_more": next_page is not None, "next_page": next_page}

    # --- Anthropic ----------------------------------------------------------------------------------------------

    def _anthropic_span(self, q: _Query) -> tuple[int, int]:
        start = _parse_rfc3339(q.one("starting_at"), "starting_at") // 86400 * 86400
        end_text = q.one("ending_at")
        end = _parse_rfc3339(end_text, "ending_at") if end_text else start + 7 * 86400
        return start, end

    def _anthropic_usage(self, q: _Query) -> dict[str, Any]:
        start, end = self._anthropic_span(q)
        chosen, next_page = _page(_day_starts(start, end), q)
        group = set(q.many("group_by"))
        data = []
        for b_start in chosen:
            rows: dict[tuple[Any, ...], dict[str, Any]] = {}
            for bill, key in self._bills("anthropic", b_start, b_start + 86400):
                dims = {
                    "api_key_id": key if "api_key_id" in group else None,
                    "workspace_id": None,
                    "model": SNAPSHOTS.get(bill.model, bill.model) if "model" in group else None,
                    "service_tier": ("batch" if bill.batch else "standard") if "service_tier" in group else None,
                    "context_window": "0-200k" if "context_window" in group else None,
                }
                row = rows.setdefault(
                    tuple(dims.values()),
                    {
                        "uncached_input_tokens": 0,
                        "cache_creation": {"ephemeral_1h_input_tokens": 0, "ephemeral_5m_input_tokens": 0},
                        "cache_read_input_tokens": 0,
                        "output_tokens": 0,
                        "server_tool_use": {"web_search_requests": 0},
                        **dims,
                    },
                )
                p = bill.planned
                row["uncached_input_tokens"] += p.input - p.cached - p.cache_write
                row["cache_read_input_tokens"] += p.cached
                row["cache_creation"]["ephemeral_5m_input_tokens"] += p.cache_write - p.cache_write_1h
                row["cache_creation"]["ephemeral_1h_input_tokens"] += p.cache_write_1h
                row["output_tokens"] += p.output
            data.append(
                {
                    "starting_at": _rfc3339(b_start),
                    "ending_at": _rfc3339(b_start + 86400),
                    "results": list(rows.values()),
                }
            )
        return {"data": data, "has_more": next_page is not None, "next_page": next_page}

    def _anthropic_costs(self, q: _Query) -> dict[str, Any]:
        start, end = self._anthropic_span(q)
        chosen, next_page = _page(_day_starts(start, end), q)
        by_description = "description" in q.many("group_by")
        places = self.sim.cost_places
        data = []
        for b_start in chosen:
            sums: dict[tuple[Any, ...], Decimal] = defaultdict(Decimal)
            for bill, _ in self._bills("anthropic", b_start, b_start + 86400):
                for kind, (_, usd) in self.sim.price_list.charges(bill).items():
                    model = SNAPSHOTS.get(bill.model, bill.model)
                    k = (model, kind, "batch" if bill.batch else "standard") if by_description else (None,) * 3
                    sums[k] += usd
            results = []
            for (model, kind, tier), usd in sums.items():
                cents = usd * 100
                if places is not None:
                    cents = cents.quantize(Decimal(1).scaleb(-places))
                results.append(
                    {
                        "currency": "USD",
                        "amount": format(cents, "f"),
                        "workspace_id": None,
                        "description": f"{model} Usage - {_ANTHROPIC_WORDS[kind]}" if model else None,
                        "cost_type": "tokens" if model else None,
                        "context_window": "0-200k" if model else None,
                        "model": model,
                        "service_tier": tier,
                        "token_type": kind,
                        "inference_geo": None,
                    }
                )
            data.append({"starting_at": _rfc3339(b_start), "ending_at": _rfc3339(b_start + 86400), "results": results})
        return {"data": data, "has_more": next_page is not None, "next_page": next_page}
