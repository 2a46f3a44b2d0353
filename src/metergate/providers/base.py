"""The two interfaces every provider module implements.

- `ApiAdapter` knows one API's wire format (OpenAI, Anthropic, Gemini): what a request asks for and where the
  response reports usage. Parsing is pure: bytes and dicts in, `Usage` out, no network.
- `Upstream` knows how to reach one provider type: the URL to call and the credential header to send.

An OpenAI-compatible server and Azure OpenAI speak the OpenAI API but are reached differently, which is why the
two concerns are separate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from metergate.config import ProviderConfig
from metergate.endpoints import Endpoint, EndpointMatch, Family
from metergate.sse import SSEBuffer, SSEEvent
from metergate.usage import Usage, UsageError


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

    def __init__(self) -> None:
        super().__init__()
        self._buffer = SSEBuffer()

    def feed(self, chunk: bytes) -> bytes:
        events = self._buffer.feed(chunk)
        if not self.rewrites:
            for event in events:
                self.observe(event)
            return chunk
        out = [relayed for event in events if (relayed := self.observe(event)) is not None]
        return b"".join(out)

    @abstractmethod
    def observe(self, event: SSEEvent) -> bytes | None:
        """The bytes to relay for this event (usually `event.raw`), or None to hide it."""


class ApiAdapter(ABC):
    family: Family

    @abstractmethod
    def request_facts(self, endpoint: Endpoint, body: dict[str, Any], path_model: str | None) -> RequestFacts:
        """Reads the request; raises GatewayError(400) if it lacks what the API requires (a model)."""

    @abstractmethod
    def upstream_body(self, body: dict[str, Any], facts: RequestFacts, upstream_model: str | None) -> dict[str, Any]:
        """The body to send upstream when it must differ from the client's (alias, usage request)."""

    @abstractmethod
    def usage_from_body(self, endpoint: Endpoint, body: Any) -> Usage:
        """Usage from a complete (non-streamed) JSON response."""

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


def require_dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"{what} is not a JSON object")
    return value


def join_url(base: str, path: str, query: str) -> str:
    return f"{base}{path}?{query}" if query else f"{base}{path}"
