"""Errors the gateway answers itself, in the JSON shape of the API the client called.

A client using the official SDK must get the exception class it would get from the provider (the SDKs pick the
class from the status code and read the message from the provider's own envelope), so each family has its own
envelope here. `error_type` is the bounded label value used in `llm_errors_total`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from metergate.endpoints import Family

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "insufficient_quota",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error",
    503: "api_error",
    504: "api_error",
}
_GEMINI_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


@dataclass(slots=True)
class GatewayError(Exception):
    """An error metergate answers itself instead of forwarding the request."""

    status: int
    error_type: str  # bounded label value
    message: str
    code: str | None = None  # machine-readable code for OpenAI's `error.code`
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def error_body(family: Family, err: GatewayError) -> bytes:
    if family == "anthropic":
        kind = _ANTHROPIC_TYPES.get(err.status, "api_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": err.message}})
    if family == "gemini":
        status = _GEMINI_STATUS.get(err.status, "INTERNAL")
        return orjson.dumps({"error": {"code": err.status, "message": err.message, "status": status}})
    kind = _OPENAI_TYPES.get(err.status, "server_error")
    return orjson.dumps(
        {"error": {"message": err.message, "type": kind, "param": None, "code": err.code or err.error_type}}
    )


def stream_error_event(family: Family, operation: str, message: str) -> bytes:
    """An SSE event that makes the client's SDK raise, for failures after a stream's headers were sent."""
    if family == "anthropic":
        data = orjson.dumps({"type": "error", "error": {"type": "api_error", "message": message}})
        return b"event: error\ndata: " + data + b"\n\n"
    if family == "openai" and operation == "responses":
        data = orjson.dumps({"type": "error", "code": "server_error", "message": message, "param": None})
        return b"event: error\ndata: " + data + b"\n\n"
    if family == "gemini":
        return (
            b"data: "
            + orjson.dumps({"error": {"code": 502, "message": message, "status": "UNAVAILABLE"}})
            + b"\r\n\r\n"
        )
    data = orjson.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
    return b"data: " + data + b"\n\n"


def bad_request(message: str, error_type: str = "invalid_request") -> GatewayError:
    return GatewayError(400, error_type, message)


def bounded(text: str, limit: int = 200) -> str:
    """A client-chosen string cut to `limit` characters for a message or a log line, with a marker when cut."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"
