"""The two interfaces every provider module implements.

- `ApiAdapter` knows one API's wire format (OpenAI, Anthropic, Gemini): what a request asks for and where the
  response reports usage. Parsing is pure: bytes and dicts in, `Usage` out, no network.
- `Upstream` knows how to reach one provider type: the URL to call and the credential header to send.

An OpenAI-compatible server and Azure OpenAI speak the OpenAI API but are reached differently, which is why the
two concerns are separate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from metergate.config import ProviderConfig
from metergate.costfield import event_with_cost
from metergate.endpoints import Endpoint, EndpointMatch, Family
from metergate.errors import GatewayError, bad_request
from metergate.sse import SSEBuffer, SSEEvent
from metergate.usage import Usage, UsageError

# Model names are short identifiers; a longer one is refused rather than stored, priced, cached and logged.
MAX_MODEL_CHARS = 256
# Bounds applied to client numbers before any arithmetic (budget estimates): far above any real model's limits.
MAX_OUTPUT_TOKENS = 2**31 - 1
MAX_CHOICES = 1024


@dataclass(slots=True)
class RequestFacts:
    """What the gateway needs to know about a request before forwarding it."""

    model: str
    stream: bool
    max_output_tokens: int | None  # the client's own output cap, for budget reservations
    # OpenAI chat/completions streams: the client did not ask for the usage chunk, so the gateway asks for it
    # upstream and hides it from the client.
    inject_stream_usage: bool = False
    choices: int = 1  # completions generated per request (OpenAI n / best_of, Gemini candidateCount)
    image_model: str | None = None  # the model of the Responses image_generation tool, when the request names one
    # Media requests: what prices an image (DALL-E), the format a transcription answers in, and units billed by
    # the request itself (characters of speech input).
    image_size: str | None = None
    image_quality: str | None = None
    response_format: str | None = None
    request_units: dict[str, int] | None = None
    # Why the response to this request will carry no usage (a plain-text transcription, binary TTS audio), known
    # before it is sent: such requests count as unmetered routes.
    unmetered: str | None = None
    # The end user the body names (OpenAI `user`/`safety_identifier`, Anthropic `metadata.user_id`), as sent.
    end_user: object = None


class StreamMeter(ABC):
    """Watches a streamed response go by and learns the usage the provider reports in it.

    `feed` returns the bytes to relay to the client now. Meters that never change what the client sees relay each
    chunk as it arrived; a meter that must hide an event holds bytes back until the event is complete.
    """

    def __init__(self) -> None:
        self.finished = False  # the provider's terminal event was seen
        self.upstream_error: str | None = None  # the provider reported an error inside the stream

    @abstractmethod
    def feed(self, chunk: bytes) -> bytes:
        """Meter one upstream chunk; returns what to relay to the client."""

    def flush(self) -> bytes:
        """Complete events held back until the upstream ended, to relay after any error the gateway adds."""
        return b""

    @abstractmethod
    def usage(self) -> Usage:
        """The usage the provider reported; raises UsageError if it reported none or nonsense."""


class SSEStreamMeter(StreamMeter):
    """A meter for Server-Sent Events streams, one event at a time."""

    rewrites = False  # True when `observe` may drop or change events
    # Events that report the stream's usage, for the cost returned on opt-in (costfield.py): a byte string they
    # contain, and the path of the usage object in their JSON. Empty: this stream's events never carry it.
    usage_marker = b""
    usage_path: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._buffer = SSEBuffer()
        # Set by the gateway when the caller opted in: prices the usage known so far (None: unpriced).
        self.cost_of: Callable[[Usage], float | None] | None = None

    def feed(self, chunk: bytes) -> bytes:
        events = self._buffer.feed(chunk)
        if self.cost_of is not None and self.usage_marker:
            return b"".join(self._with_cost(event) for event in events)
        if not self.rewrites:
            for event in events:
                self.observe(event)
            return chunk
        out = [relayed for event in events if (relayed := self.observe(event)) is not None]
        return b"".join(out)

    def flush(self) -> bytes:
        # With the cost on, events are relayed whole: a last one without its blank line is relayed as it came.
        relays_whole_events = self.cost_of is not None and self.usage_marker and not self.rewrites
        return self._buffer.pending() if relays_whole_events else b""

    def include_cost(self, cost_of: Callable[[Usage], float | None]) -> None:
        """The caller opted in to the cost: usage events carry it (and are shown, where they would be hidden)."""
        self.cost_of = cost_of

    def _with_cost(self, event: SSEEvent) -> bytes:
        relayed = self.observe(event)
        if not self.rewrites:
            relayed = event.raw
        if relayed is None or self.usage_marker not in event.data or self.cost_of is None:
            return relayed or b""
        try:
            cost = self.cost_of(self.usage())
        except UsageError:
            return relayed
        if cost is None:
            return relayed
        return event_with_cost(event, self.usage_path, cost) or relayed

    @abstractmethod
    def observe(self, event: SSEEvent) -> bytes | None:
        """The bytes to relay for this event (usually `event.raw`), or None to hide it."""


class MalformedResponse(UsageError):
    """The response itself could not be read (not JSON where JSON was due)."""


class ApiAdapter(ABC):
    family: Family

    def vet_request(self, endpoint: Endpoint, query: str, headers: Mapping[str, str]) -> None:
        """Raises GatewayError(400) for a query parameter or header that would change what the provider reports
        (for example a field mask that drops the usage). The default accepts everything."""
        return None

    def vet_forwarded(self, endpoint: Endpoint, query: str, headers: Mapping[str, str]) -> None:
        """Raises GatewayError(400) for a parameter that would reshape a forwarded response the gateway must read
        (a batch object, batch results). The default accepts everything."""
        return None

    def form_fields(self, endpoint: Endpoint) -> frozenset[str] | None:
        """The text fields to read when the route takes multipart/form-data (file uploads); None: JSON only."""
        return None

    @abstractmethod
    def request_facts(
        self, endpoint: Endpoint, body: dict[str, Any], path_model: str | None, upload_bytes: int = 0
    ) -> RequestFacts:
        """Reads the request; raises GatewayError(400) if it lacks what the API requires (a model).
        `upload_bytes`: the size of the files a multipart request uploads (a bound on what processing them costs)."""

    @abstractmethod
    def upstream_body(self, body: dict[str, Any], facts: RequestFacts, upstream_model: str | None) -> dict[str, Any]:
        """The body to send upstream when it must differ from the client's (alias, usage request)."""

    @abstractmethod
    def usage_from_body(self, endpoint: Endpoint, body: Any, facts: RequestFacts | None = None) -> Usage:
        """Usage from a complete (non-streamed) JSON response to the request `facts` describe."""

    def usage_from_response(
        self, endpoint: Endpoint, data: bytes, content_type: str, facts: RequestFacts | None = None
    ) -> Usage:
        """Usage from a complete response's bytes; raises UsageError (UsageNotReported: a kind of response that
        never reports usage). The default reads JSON."""
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise MalformedResponse("The upstream provider returned a response that is not JSON.") from None
        return self.usage_from_body(endpoint, parsed, facts)

    def streams(self, endpoint: Endpoint, content_type: str) -> bool:
        """Whether a successful response is relayed as it arrives, metered on the way (SSE by default)."""
        return "text/event-stream" in content_type

    @abstractmethod
    def stream_meter(self, endpoint: Endpoint, facts: RequestFacts, sse: bool) -> StreamMeter:
        """A meter for a streamed response; `sse` is False for Gemini's streamed JSON array."""


class Upstream(ABC):
    """How to reach one configured provider."""

    family: Family

    def __init__(self, name: str, config: ProviderConfig, secret: str | None) -> None:
        self.name = name
        self.config = config
        self._secret = secret
        # OpenAI's data residency endpoints (us., eu., ae.api.openai.com) bill a regional uplift on newer models.
        host = config.base_url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
        prefix = host.split(".", 1)[0]
        self.region = prefix if host.endswith(".api.openai.com") and prefix in ("us", "eu", "ae") else None

    def serves(self, match: EndpointMatch) -> bool:
        return match.endpoint.family == self.family and not match.endpoint.azure_path

    @abstractmethod
    def url(self, match: EndpointMatch, path: str, query: str, upstream_model: str) -> str:
        """The full upstream URL for a request the client sent to `path?query`."""

    @abstractmethod
    def auth_headers(self) -> dict[str, str]:
        """The provider credential as this provider expects it."""

    def pricing_model(self, upstream_model: str) -> str:
        """The model name to price; differs from what is sent upstream only for Azure deployments."""
        return upstream_model

    def wire_model(self, upstream_model: str) -> str:
        """The model name to put in the request; differs only for Azure (the deployment name)."""
        return upstream_model


def field_error(name: str, expected: str) -> GatewayError:
    return bad_request(f"{name}: expected {expected}", "invalid_field")


def read_model(value: object, name: str = "model") -> str:
    """A model name from a request: a non-empty string of at most MAX_MODEL_CHARS characters."""
    if not isinstance(value, str) or not value:
        raise bad_request(f"{name}: you must provide a model parameter", "missing_model")
    if len(value) > MAX_MODEL_CHARS or "\x00" in value:
        raise field_error(name, f"a model name of at most {MAX_MODEL_CHARS} characters")
    return value


def read_flag(obj: Mapping[str, Any], name: str, label: str | None = None) -> bool:
    """A boolean field read strictly: absent or null is false, anything but true/false is refused.

    Lenient servers (pydantic-based vLLM and others) read "true" or 1 as true, so reading them as false would
    hide a stream from the meter (issue 8); refusing them is the only reading that cannot differ from the
    provider's."""
    value = obj.get(name)
    if value is None or isinstance(value, bool):
        return value is True
    raise field_error(label or name, "true or false")


def read_count(
    obj: Mapping[str, Any], name: str, label: str | None = None, *, strings: bool = False, bound: int
) -> int | None:
    """A non-negative integer field read strictly (absent or null: None), clamped to `bound` for arithmetic.

    `strings`: the API's JSON mapping also accepts integers written as strings (protobuf JSON, Gemini)."""
    value = obj.get(name)
    if value is None:
        return None
    if type(value) is int and 0 <= value <= bound:  # the usual case, first
        return value
    if strings and isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value[:20])
    if isinstance(value, bool) or not isinstance(value, int):
        raise field_error(label or name, "an integer")
    if value < 0:
        raise field_error(label or name, "a non-negative integer")
    return min(value, bound)


def read_object(obj: Mapping[str, Any], name: str, label: str | None = None) -> Mapping[str, Any]:
    """An object field (absent or null: empty)."""
    value = obj.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise field_error(label or name, "an object")
    return value


def usage_details(container: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """A details object inside a usage report (absent or null: empty)."""
    value = container.get(name) or {}
    if not isinstance(value, Mapping):
        raise UsageError(f"{name} is not an object")
    return value


def require_dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"{what} is not a JSON object")
    return value


def join_url(base: str, path: str, query: str) -> str:
    return f"{base}{path}?{query}" if query else f"{base}{path}"
