"""The gateway's configuration: a YAML file validated into typed models.

Every field is declared here and unknown keys are errors, so a typo never silently turns a feature off.
Validation errors name the field and the line of the file it came from.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase
from functools import cache
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from genai_prices import data_snapshot
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from yarl import URL

ProviderType = Literal["openai", "openai-compatible", "azure-openai", "anthropic", "gemini"]

# The genai-prices provider each provider type is priced as, unless the config says otherwise.
DEFAULT_PRICING_PROVIDER: dict[str, str | None] = {
    "openai": "openai",
    "azure-openai": "azure",
    "anthropic": "anthropic",
    "gemini": "google",
    "openai-compatible": None,
}

# Provider types whose admin API reports usage and cost per API key (metergate reconcile).
RECONCILABLE = frozenset({"openai", "anthropic"})

# Label values metergate gives to what the config does not name; no team or app may be called this.
RESERVED_LABELS = frozenset({"other", "unauthenticated"})

LabelValue = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/-]+$")]
# Attribution tags (README "Attribution"): keys are a small fixed vocabulary, values are free text of a bounded size.
TAG_KEY_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
MAX_TAG_VALUE_CHARS = 128
TagKey = Annotated[str, Field(pattern=TAG_KEY_PATTERN)]
TagValue = Annotated[str, Field(min_length=1, max_length=MAX_TAG_VALUE_CHARS, pattern=r"^[^,=\x00-\x1f\x7f]+$")]


def reserved_label(value: str, loc: tuple[str | int, ...]) -> None:
    """Refuses a team or app name metergate uses itself, wherever the name comes from (config, CLI, admin API)."""
    if value in RESERVED_LABELS:
        raise _FieldError(loc, f"{value!r} is reserved by metergate")


@cache
def catalogue_provider_ids() -> frozenset[str]:
    """The provider ids of the pinned genai-prices catalogue, which `pricing_provider` must name."""
    return frozenset(p.id for p in data_snapshot.get_snapshot().providers)


class ConfigError(Exception):
    """A config that cannot be used; the message names the field and, when known, the line."""


class _Model(BaseModel):
    # allow_inf_nan=False: `.inf` or `.nan` in a limit or a timeout is a mistake, never a setting.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Upper bounds on durations: far beyond any sensible setting, and small enough for every timer to accept.
_DAY = 86400.0


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class ServerConfig(_Model):
    listen: str = "127.0.0.1:8080"
    metrics_listen: str = "127.0.0.1:9102"
    # Bodies the gateway parses (model calls) are held in memory up to this size; bodies it only forwards (file
    # uploads) are streamed through, up to the larger limit.
    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0, le=1 << 40)
    max_stream_body_bytes: int = Field(default=4 * 1024**3, gt=0, le=1 << 44)
    # The gateway's URL as clients reach it, for provider URLs rewritten to point back at it (Anthropic's batch
    # results_url, Gemini's upload URLs); default: http:// and the Host the client sent.
    public_url: str | None = None
    # Paths matching no known route: forwarded (counted as unmetered, endpoint `other`) or refused with a 404.
    unknown_paths: Literal["forward", "refuse"] = "forward"
    # Routes the provider bills in ways the gateway cannot meter (fine-tuning jobs, ephemeral realtime secrets):
    # forwarded and counted as unmetered, or refused.
    unmetered_routes: Literal["forward", "refuse"] = "forward"
    trusted_headers: bool = False
    connect_timeout_s: float = Field(default=10.0, gt=0, le=_DAY)
    upstream_timeout_s: float = Field(default=600.0, gt=0, le=_DAY)
    # After a client hangs up mid-stream the upstream is still read to learn what it billed, for at most this long.
    drain_timeout_s: float = Field(default=120.0, gt=0, le=_DAY)
    shutdown_timeout_s: float = Field(default=30.0, ge=0, le=_DAY)
    timezone: str = "UTC"
    # Budget quarters and years start on the 1st of this month (4: a fiscal year from April).
    fiscal_year_start_month: int = Field(default=1, ge=1, le=12)
    # Connection limits (nginx's defaults are the guide): see README "Limits".
    max_header_bytes: int = Field(default=32 * 1024, ge=1024, le=1 << 20)
    max_headers: int = Field(default=100, ge=10, le=10_000)
    header_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    body_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    write_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    keepalive_timeout_s: float = Field(default=75.0, gt=0, le=3600)
    max_connections: int = Field(default=4096, ge=16, le=1_000_000)
    # WebSocket (Realtime) sessions: the largest message relayed either way, and open sessions per key.
    max_ws_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, le=1 << 30)
    max_sessions_per_key: int = Field(default=64, ge=1, le=1_000_000)

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _hostport(cls, v: str) -> str:
        parse_hostport(v)
        return v

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", v):
            raise ValueError(f"public_url must be an http(s) URL without query, got {v!r}")
        return v.rstrip("/")

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {v!r}") from exc
        return v


def base_url(v: str) -> str:
    """An http(s) base URL the upstream client can use, without a trailing slash."""
    if not re.match(r"^https?://[^/\s]+", v):
        raise ValueError(f"base_url must be an http(s) URL, got {v!r}")
    try:
        url = URL(v)  # the URL parser the upstream client uses: what it refuses must be refused here
        if not url.host or url.port is None or not 0 < url.port < 65536:
            raise ValueError("no host or port")
    except ValueError as exc:
        raise ValueError(f"base_url {v!r} is not a usable URL: {exc}") from None
    if url.query_string or url.fragment:
        raise ValueError(f"base_url {v!r} must not carry a query or a fragment")
    return v.rstrip("/")


class ProviderConfig(_Model):
    type: ProviderType
    base_url: str
    api_key_env: str | None = None
    # azure-openai: the api-version query parameter and the deployment -> model map used for pricing.
    api_version: str | None = None
    deployments: dict[str, str] = Field(default_factory=dict)
    # genai-prices provider id used to price this provider's traffic (e.g. "groq" for an openai-compatible Groq).
    pricing_provider: str | None = None
    connect_timeout_s: float | None = Field(default=None, gt=0, le=_DAY)
    timeout_s: float | None = Field(default=None, gt=0, le=_DAY)
    max_connections: int = Field(default=0, ge=0, le=1_000_000)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return base_url(v)

    @model_validator(mode="after")
    def _azure(self) -> ProviderConfig:
        if self.type == "azure-openai" and not self.api_version:
            raise ValueError("azure-openai providers need api_version")
        if self.type != "azure-openai" and (self.deployments or self.api_version):
            raise ValueError("api_version and deployments only apply to azure-openai providers")
        return self

    @property
    def pricing_provider_id(self) -> str | None:
        return self.pricing_provider or DEFAULT_PRICING_PROVIDER[self.type]


class RouteConfig(_Model):
    """A route names a model glob (calls naming a model) or a path glob (calls that name none: files, batches...)."""

    model: str | None = Field(default=None, min_length=1)
    path: str | None = Field(default=None, min_length=1)
    provider: str
    # Alias: clients ask for `model`, the provider is sent `upstream_model`.
    upstream_model: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> RouteConfig:
        if (self.model is None) == (self.path is None):
            raise ValueError(
                "a route has either `model:` (a glob on the model a call names) or `path:` (a glob on the request "
                "path, for calls that name no model)"
            )
        if self.path is not None:
            if not self.path.startswith("/"):
                raise ValueError(f"path must start with /, got {self.path!r}")
            if self.upstream_model is not None:
                raise ValueError("upstream_model applies to model routes only")
        return self

    def matches(self, model: str) -> bool:
        return self.model is not None and fnmatchcase(model, self.model)

    def matches_path(self, path: str) -> bool:
        return self.path is not None and fnmatchcase(path, self.path)

    @property
    def is_glob(self) -> bool:
        return self.model is None or any(c in self.model for c in "*?[")

    @property
    def named_model(self) -> str | None:
        """The one model this route names literally, if it does."""
        return None if self.is_glob else self.model


class KeyConfig(_Model):
    sha256: str
    team: LabelValue
    app: LabelValue
    id: str | None = None
    # Tags every request of this key carries; a client's x-metergate-tags header cannot change them.
    tags: dict[TagKey, TagValue] = Field(default_factory=dict)
    # Every response carries its cost in its usage (as with the x-metergate-include-cost: true header).
    include_cost: bool = False

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        v = v.lower()
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("sha256 must be 64 hex characters (the hash of the key, never the key)")
        return v

    @property
    def key_id(self) -> str:
        return self.id or self.sha256[:12]


class TeamConfig(_Model):
    """A team and its apps, for attribution without keys (trusted headers) and for budgets."""

    name: LabelValue
    apps: list[LabelValue] = Field(default_factory=list)


class PriceConfig(_Model):
    """A per-model price in USD, overriding or adding to the genai-prices catalogue: per million tokens, and per
    non-token unit (README "Pricing")."""

    model: str = Field(min_length=1)
    provider: str | None = None
    input_mtok: float = Field(default=0.0, ge=0, le=1e6)
    output_mtok: float = Field(default=0.0, ge=0, le=1e6)
    cache_read_mtok: float | None = Field(default=None, ge=0, le=1e6)
    cache_write_mtok: float | None = Field(default=None, ge=0, le=1e6)
    # USD per non-token unit (web_search, web_fetch, file_search, code_interpreter_session...): README "Units".
    units: dict[str, Annotated[float, Field(ge=0, le=1e6)]] = Field(default_factory=dict)
    # Media: USD per image (one figure, or per "<size>/<quality>" such as "1024x1024/hd"), per second of audio,
    # per million characters of speech input.
    per_image: float | dict[str, Annotated[float, Field(ge=0, le=1e6)]] | None = None
    per_second: float | None = Field(default=None, ge=0, le=1e6)
    per_million_characters: float | None = Field(default=None, ge=0, le=1e9)

    @field_validator("units")
    @classmethod
    def _known_units(cls, v: dict[str, float]) -> dict[str, float]:
        from metergate.usage import UNITS

        unknown = sorted(u for u in v if u.split("/", 1)[0] not in UNITS)
        if unknown:
            raise ValueError(f"unknown unit {unknown[0]!r}; known: {', '.join(sorted(UNITS))}")
        return v

    @field_validator("per_image")
    @classmethod
    def _image_prices(cls, v: float | dict[str, float] | None) -> float | dict[str, float] | None:
        if isinstance(v, float | int) and not 0 <= v <= 1e6:
            raise ValueError("per_image must be between 0 and 1000000")
        if isinstance(v, dict):
            for key in v:
                size, _, quality = key.partition("/")
                if not re.fullmatch(r"\d{2,5}x\d{2,5}", size) or (
                    quality and not re.fullmatch(r"[a-z]{1,16}", quality)
                ):
                    raise ValueError(f"per_image keys are <size> or <size>/<quality> (1024x1024/hd), got {key!r}")
        return v

    def unit_prices(self) -> dict[str, float]:
        """Every unit price this entry sets, by unit (`image/<size>/<quality>` for per-size image prices)."""
        prices = dict(self.units)
        if isinstance(self.per_image, dict):
            for key, usd in self.per_image.items():
                size, _, quality = key.partition("/")
                prices[f"image/{size}/{quality or 'standard'}"] = usd
        elif self.per_image is not None:
            prices["image"] = self.per_image
        if self.per_second is not None:
            prices["audio_second"] = self.per_second
        if self.per_million_characters is not None:
            prices["character"] = self.per_million_characters / 1e6
        return prices

    def matches(self, provider: str, model: str) -> bool:
        return (self.provider is None or self.provider == provider) and fnmatchcase(model, self.model)


class ScopeConfig(_Model):
    """What traffic a budget or a rate limit counts: every field given must match (README "Budgets").

    `user: "*"` gives every end user of the scope a limit of their own; a budget naming one user overrides the
    `*` budget of the same scope and period for that user. `model` is a glob on the model label."""

    team: LabelValue | None = None
    app: LabelValue | None = None
    key: str | None = Field(default=None, min_length=1, max_length=64)
    user: str | None = Field(default=None, min_length=1, max_length=256)
    tags: dict[TagKey, TagValue] = Field(default_factory=dict, max_length=16)
    model: str | None = Field(default=None, min_length=1, max_length=256)
    provider: LabelValue | None = None

    @model_validator(mode="after")
    def _scoped(self) -> ScopeConfig:
        if self.app is not None and self.team is None:
            raise ValueError("app needs team (an app is named within its team)")
        if not (self.team or self.key or self.tags or self.model or self.provider):
            raise ValueError("name what it applies to: team, key, tags, model or provider (or several)")
        return self

    @property
    def simple(self) -> bool:
        """A team or app scope and nothing else (the scopes of the team/app gauges)."""
        return self.team is not None and not (self.key or self.user or self.tags or self.model or self.provider)

    @property
    def per_user(self) -> bool:
        return self.user == "*"

    @property
    def scope(self) -> str:
        """The scope in words, for messages: `search/ranker`, `team search, user *, tag customer=acme`."""
        if self.simple:
            return f"{self.team}/{self.app}" if self.app else str(self.team)
        parts = [f"{name} {value}" for name, value in (("team", self.team), ("app", self.app), ("key", self.key))]
        parts += [f"user {self.user}"] if self.user else []
        parts += [f"tag {k}={v}" for k, v in sorted(self.tags.items())]
        parts += [f"{name} {value}" for name, value in (("model", self.model), ("provider", self.provider))]
        return ", ".join(p for p in parts if not p.endswith(" None"))


class BudgetConfig(ScopeConfig):
    period: Literal["day", "week", "month", "quarter", "year"] | None = None
    limit_usd: float | None = Field(default=None, gt=0, le=1e12)
    action: Literal["block", "alert"] = "alert"
    warn_at: float = Field(default=0.8, gt=0, le=1)
    # The most one request may cost at worst (its reserved estimate); past it the request is refused unsent.
    max_request_usd: float | None = Field(default=None, gt=0, le=1e12)

    @model_validator(mode="after")
    def _limits(self) -> BudgetConfig:
        if (self.period is None) != (self.limit_usd is None):
            raise ValueError("period and limit_usd go together")
        if self.limit_usd is None and self.max_request_usd is None:
            raise ValueError("a budget needs period and limit_usd, max_request_usd, or both")
        return self


class RateLimitConfig(ScopeConfig):
    """Requests and tokens (input + output) per calendar minute for a scope; `user: "*"`: per end user."""

    requests_per_minute: int | None = Field(default=None, gt=0, le=1_000_000_000)
    tokens_per_minute: int | None = Field(default=None, gt=0, le=1_000_000_000_000)

    @model_validator(mode="after")
    def _some_limit(self) -> RateLimitConfig:
        if self.requests_per_minute is None and self.tokens_per_minute is None:
            raise ValueError("a rate limit needs requests_per_minute, tokens_per_minute, or both")
        return self


class SharedStateConfig(_Model):
    """Where replicas share rate-limit counters (Redis). Without it, each gateway counts on its own."""

    redis_url: str
    # Keys are `<key_prefix>:rl:...`: one Redis can serve several gateway fleets.
    key_prefix: str = Field(default="metergate", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    # The longest wait for Redis on a request; past it (or on an error) the limits are counted in process.
    timeout_s: float = Field(default=0.25, gt=0, le=10)

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, v: str) -> str:
        if not re.match(r"^(redis|rediss|unix)://", v):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {v!r}")
        return v


class ReconcileConfig(_Model):
    """Where to read one provider's own usage and cost reports (its admin API), to check the ledger against them."""

    # The environment variable holding the admin key (OpenAI `sk-admin-...`, Anthropic `sk-ant-admin01-...`).
    admin_key_env: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # The provider-side ids of the API keys the gateway sends traffic with (OpenAI `key_...`, Anthropic
    # `apikey_...`); empty: found by matching the provider's key hints against the gateway's own key.
    api_key_ids: list[str] = Field(default_factory=list, max_length=64)
    # Default: the provider's base_url (its admin API lives on the same host).
    base_url: str | None = None
    # Reconcile in `serve` every so often (seconds); unset: only `metergate reconcile` does.
    every_s: float | None = Field(default=None, ge=60, le=7 * _DAY)
    # In `serve`: the finished UTC days reconciled each time, and how long after a day ends it counts as finished
    # (providers publish late usage for a while).
    lookback_days: int = Field(default=7, ge=1, le=31)
    settle_s: float = Field(default=7200, ge=0, le=7 * _DAY)
    # LLMReconciliationGap fires when |provider cost / gateway cost - 1| is past tolerance_ratio and the gap is
    # past tolerance_usd (a cent on a quiet day is not worth a ticket); both are exported as gauges for the rule.
    tolerance_ratio: float = Field(default=0.01, ge=0, le=10)
    tolerance_usd: float = Field(default=1.0, ge=0, le=1e9)
    timeout_s: float = Field(default=30, gt=0, le=600)
    # 429 and 5xx answers are retried this many times, waiting what `retry-after` says (at most max_wait_s).
    max_retries: int = Field(default=4, ge=0, le=20)
    max_wait_s: float = Field(default=60, ge=0, le=3600)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else base_url(v)


class LedgerConfig(_Model):
    url: str = "sqlite:///metergate.db"
    batch_size: int = Field(default=1000, gt=0, le=100_000)
    flush_interval_s: float = Field(default=0.2, ge=0.01, le=3600)
    # Where records wait when the database is down; default: next to the SQLite file, or
    # ./metergate-ledger-<hash of the database URL>.spool.
    spool_path: str | None = None
    spool_max_records: int = Field(default=1_000_000, gt=0, le=1_000_000_000)

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not (v.startswith("sqlite:///") or v.startswith(("postgresql://", "postgres://"))):
            raise ValueError("ledger url must start with sqlite:/// or postgresql://")
        if v.startswith("sqlite:///"):
            path = v.removeprefix("sqlite:///")
            if not path.strip("/") or path.endswith("/") or Path(path).name in ("", ".", ".."):
                raise ValueError(f"ledger url {v!r} names a directory, not a database file (sqlite:///metergate.db)")
        return v

    @field_validator("spool_path")
    @classmethod
    def _spool(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip("/") or v.endswith("/") or Path(v).name in ("", ".", "..")):
            raise ValueError(f"spool_path {v!r} names a directory, not a file")
        return v


class AttributionConfig(_Model):
    """What a request may say about itself beyond its key: tags from the x-metergate-tags header, by key."""

    # Tag keys accepted from clients (and from keys' own tags); any other key is ignored and counted.
    tags: list[TagKey] = Field(default_factory=list, max_length=64)


class BatchesConfig(_Model):
    # How often the provider is asked about each batch created through the gateway, until it ends.
    poll_interval_s: float = Field(default=60.0, ge=0.05, le=_DAY)


class BudgetDefaults(_Model):
    # Worst-case output reserved when a request does not say max_tokens.
    default_max_output_tokens: int = Field(default=4096, gt=0, le=10_000_000)


class Config(_Model):
    server: ServerConfig = Field(default_factory=ServerConfig)
    providers: dict[LabelValue, ProviderConfig] = Field(min_length=1)
    routes: list[RouteConfig] = Field(min_length=1)
    keys: list[KeyConfig] = Field(default_factory=list)
    teams: list[TeamConfig] = Field(default_factory=list)
    prices: list[PriceConfig] = Field(default_factory=list)
    budgets: list[BudgetConfig] = Field(default_factory=list)
    rate_limits: list[RateLimitConfig] = Field(default_factory=list)
    shared_state: SharedStateConfig | None = None
    budget_defaults: BudgetDefaults = Field(default_factory=BudgetDefaults)
    batches: BatchesConfig = Field(default_factory=BatchesConfig)
    attribution: AttributionConfig = Field(default_factory=AttributionConfig)
    ledger: LedgerConfig | None = None
    # Provider name -> its admin API, for `metergate reconcile` and periodic reconciliation.
    reconcile: dict[LabelValue, ReconcileConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _cross_refs(self) -> Config:
        if parse_hostport(self.server.listen) == parse_hostport(self.server.metrics_listen):
            raise _FieldError(("server", "metrics_listen"), "must differ from server.listen (two listeners)")
        allowed_tags = set(self.attribution.tags)
        for i, key in enumerate(self.keys):
            for field_name in ("team", "app"):
                reserved_label(getattr(key, field_name), ("keys", i, field_name))
            for tag in key.tags:
                if tag not in allowed_tags:
                    raise _FieldError(("keys", i, "tags", tag), f"tag {tag!r} is not listed in attribution.tags")
        for i, team in enumerate(self.teams):
            reserved_label(team.name, ("teams", i, "name"))
            for j, app in enumerate(team.apps):
                reserved_label(app, ("teams", i, "apps", j))
        catalogue = catalogue_provider_ids()
        for name, provider in self.providers.items():
            if provider.pricing_provider is not None and provider.pricing_provider not in catalogue:
                raise _FieldError(
                    ("providers", name, "pricing_provider"),
                    f"{provider.pricing_provider!r} is not a genai-prices provider id "
                    f"(one of: {', '.join(sorted(catalogue))})",
                )
        if self.reconcile and self.ledger is None:
            raise _FieldError(("reconcile",), "reconciliation compares the ledger with the bill: set ledger: too")
        for name in self.reconcile:
            reconciled = self.providers.get(name)
            if reconciled is None:
                raise _FieldError(("reconcile", name), f"unknown provider {name!r}")
            if reconciled.type not in RECONCILABLE:
                raise _FieldError(
                    ("reconcile", name),
                    f"{reconciled.type} publishes no usage or cost API to reconcile with"
                    + (" (Gemini's costs are in Cloud Billing exports)" if reconciled.type == "gemini" else ""),
                )
        for i, route in enumerate(self.routes):
            if route.provider not in self.providers:
                raise _FieldError(("routes", i, "provider"), f"unknown provider {route.provider!r}")
        for i, price in enumerate(self.prices):
            if price.provider is not None and price.provider not in self.providers:
                raise _FieldError(("prices", i, "provider"), f"unknown provider {price.provider!r}")
        hashes: set[str] = set()
        ids: set[str] = set()
        for i, key in enumerate(self.keys):
            if key.sha256 in hashes:
                raise _FieldError(("keys", i, "sha256"), "duplicate key")
            if key.key_id in ids:
                raise _FieldError(("keys", i, "id"), f"duplicate key id {key.key_id!r}")
            hashes.add(key.sha256)
            ids.add(key.key_id)
        known_teams = self.known_teams()
        for section, entries in (("budgets", self.budgets), ("rate_limits", self.rate_limits)):
            for i, scope in enumerate(entries):
                self._check_scope(section, i, scope, allowed_tags, known_teams)
        return self

    def _check_scope(
        self, section: str, i: int, scope: ScopeConfig, allowed_tags: set[str], known_teams: set[str]
    ) -> None:
        what = section.removesuffix("s").replace("_", " ")
        for tag in scope.tags:
            if tag not in allowed_tags:
                raise _FieldError((section, i, "tags", tag), f"tag {tag!r} is not listed in attribution.tags")
        if scope.provider is not None and scope.provider not in self.providers:
            raise _FieldError((section, i, "provider"), f"unknown provider {scope.provider!r}")
        if scope.team is None:
            return
        if scope.team not in known_teams:
            raise _FieldError(
                (section, i, "team"), f"{what} for unknown team {scope.team!r}: no key or teams entry names it"
            )
        if scope.app is not None and scope.app not in self.known_apps(scope.team):
            raise _FieldError(
                (section, i, "app"),
                f"{what} for unknown app {scope.app!r}: no key or teams entry gives team {scope.team!r} that app",
            )

    def known_teams(self) -> set[str]:
        return {k.team for k in self.keys} | {t.name for t in self.teams}

    def known_apps(self, team: str | None = None) -> set[str]:
        """Apps named by keys and teams entries; of one team when `team` is given."""
        return {k.app for k in self.keys if team in (None, k.team)} | {
            a for t in self.teams if team in (None, t.name) for a in t.apps
        }

    def timezone(self) -> ZoneInfo:
        return ZoneInfo(self.server.timezone)

    def missing_secrets(self) -> list[str]:
        """Provider fields whose environment variable is unset."""
        return [
            f"providers.{name}.api_key_env: environment variable {p.api_key_env} is not set"
            for name, p in self.providers.items()
            if p.api_key_env and not os.environ.get(p.api_key_env)
        ]


class _FieldError(ValueError):
    """A cross-field error that knows which field it is about."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: the config is not UTF-8 text (byte {exc.start})") from exc
    return parse_config(text, source=str(path))


# A config is a few hundred nodes; these bounds only stop a file that would take the process down.
MAX_CONFIG_DEPTH = 64
MAX_CONFIG_NODES = 200_000


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_size(node, source)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    except RecursionError:
        raise ConfigError(f"{source}: the config is nested too deeply (more than {MAX_CONFIG_DEPTH} levels)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping with providers and routes")
    duplicates = _duplicate_keys(node, source)
    if duplicates:
        raise ConfigError("\n".join(duplicates))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(_explain(exc, node, source))) from exc


def _check_size(root: yaml.Node | None, source: str) -> None:
    """Refuses a document nested deeper than MAX_CONFIG_DEPTH, or whose aliases expand it past MAX_CONFIG_NODES
    (a "billion laughs" file: a few lines that validation would walk for hours). Iterative, memoised per node."""
    if root is None:
        return
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    on_path: set[int] = set()
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            on_path.discard(key)
            sizes[key] = min(1 + sum(sizes.get(id(c), 0) for c in children), MAX_CONFIG_NODES + 1)
            if sizes[key] > MAX_CONFIG_NODES:
                raise ConfigError(
                    f"{source}:{node.start_mark.line + 1}: the config expands to more than {MAX_CONFIG_NODES} "
                    "values (YAML aliases)"
                )
            continue
        if key in sizes or key in on_path:
            continue
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(
                f"{source}:{node.start_mark.line + 1}: the config is nested too deeply "
                f"(more than {MAX_CONFIG_DEPTH} levels)"
            )
        on_path.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _explain(exc: ValidationError, root: yaml.Node | None, source: str) -> Iterator[str]:
    for err in exc.errors():
        loc: Sequence[str | int] = err["loc"]
        message = err["msg"]
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _FieldError):
            loc = (*loc, *ctx_error.loc)
            message = str(ctx_error)
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = _line_of(root, loc)
        where = f"{source}:{line}" if line else source
        yield f"{where}: {field}: {message}"


def _line_of(node: yaml.Node | None, loc: Sequence[str | int]) -> int | None:
    """The 1-based line of the YAML node at `loc`, or of its nearest existing parent."""
    line = node.start_mark.line + 1 if node is not None else None
    last = len(loc) - 1
    for depth, part in enumerate(loc):
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    # The last element is a field: point at its key (an unknown field has no useful value line).
                    child = key_node if depth == last else value_node
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        if child is None:
            break
        node = child
        line = node.start_mark.line + 1
    return line


def _duplicate_keys(node: yaml.Node | None, source: str, visited: set[int] | None = None) -> list[str]:
    """YAML lets a later key silently replace an earlier one; in a config that hides mistakes.

    Each node is walked once: aliases share nodes, and an alias may even contain itself.
    """
    visited = set() if visited is None else visited
    if node is None or id(node) in visited:
        return []
    visited.add(id(node))
    problems: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(f"{source}:{line}: duplicate key {key!r} (first given on line {seen[key]})")
            else:
                seen[key] = line
            problems.extend(_duplicate_keys(value_node, source, visited))
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            problems.extend(_duplicate_keys(item, source, visited))
    return problems
