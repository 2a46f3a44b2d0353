"""The API routes metergate serves, and how a request path maps onto one.

`Endpoint.label` is what the `endpoint` metric label shows: the route template, never a raw path with model
names or deployment ids in it, so a client cannot grow the series count through the path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Family = Literal["openai", "anthropic", "gemini"]
Operation = Literal[
    "unknown",
    "chat",
    "completions",
    "responses",
    "embeddings",
    "models",
    "model",
    "messages",
    "count_tokens",
    "generate",
    "stream_generate",
    "embed",
    "batch_embed",
]


@dataclass(frozen=True, slots=True)
class Endpoint:
    label: str
    family: Family
    operation: Operation
    billed: bool = True
    # Where the model name is: in the JSON body, or in the path (Gemini models, Azure deployments).
    model_in_path: bool = False
    # Azure-style inbound path (/openai/deployments/{deployment}/...): only an azure-openai provider can serve it.
    azure_path: bool = False


@dataclass(frozen=True, slots=True)
class EndpointMatch:
    endpoint: Endpoint
    path_model: str | None = None
    static: bool = False  # the path is exactly one of the fixed routes below


_STATIC_MATCHES: dict[tuple[str, str], EndpointMatch] = {}


_STATIC: dict[tuple[str, str], Endpoint] = {
    ("POST", "/v1/chat/completions"): Endpoint("/v1/chat/completions", "openai", "chat"),
    ("POST", "/v1/completions"): Endpoint("/v1/completions", "openai", "completions"),
    ("POST", "/v1/responses"): Endpoint("/v1/responses", "openai", "responses"),
    ("POST", "/v1/embeddings"): Endpoint("/v1/embeddings", "openai", "embeddings"),
    ("GET", "/v1/models"): Endpoint("/v1/models", "openai", "models", billed=False),
    ("POST", "/v1/messages"): Endpoint("/v1/messages", "anthropic", "messages"),
    ("POST", "/v1/messages/count_tokens"): Endpoint(
        "/v1/messages/count_tokens", "anthropic", "count_tokens", billed=False
    ),
    # Azure OpenAI's v1 API carries the deployment in the body like OpenAI does.
    ("POST", "/openai/v1/chat/completions"): Endpoint("/openai/v1/chat/completions", "openai", "chat"),
    ("POST", "/openai/v1/responses"): Endpoint("/openai/v1/responses", "openai", "responses"),
    ("POST", "/openai/v1/embeddings"): Endpoint("/openai/v1/embeddings", "openai", "embeddings"),
    ("POST", "/openai/responses"): Endpoint("/openai/responses", "openai", "responses", azure_path=True),
}

# OpenAI's models.retrieve. Gemini's models.get is GET /v1beta/models/{model} (the SDKs' default), so GET
# /v1/models/{id} is taken to be OpenAI's.
_OPENAI_MODEL = re.compile(r"^/v1/models/([^/:]+)$")
_OPENAI_MODEL_ENDPOINT = Endpoint("/v1/models/{model}", "openai", "model", billed=False, model_in_path=True)

_GEMINI = re.compile(
    r"^/(v1beta|v1)/models/([^/:]+):(generateContent|streamGenerateContent|embedContent|batchEmbedContents|countTokens)$"
)
_GEMINI_OPS: dict[str, Operation] = {
    "generateContent": "generate",
    "streamGenerateContent": "stream_generate",
    "embedContent": "embed",
    "batchEmbedContents": "batch_embed",
    "countTokens": "count_tokens",
}
_AZURE = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|completions|embeddings)$")
_AZURE_OPS: dict[str, Operation] = {
    "chat/completions": "chat",
    "completions": "completions",
    "embeddings": "embeddings",
}

_GEMINI_ENDPOINTS = {
    (version, method): Endpoint(
        f"/{version}/models/{{model}}:{method}",
        "gemini",
        op,
        billed=op != "count_tokens",
        model_in_path=True,
    )
    for version in ("v1beta", "v1")
    for method, op in _GEMINI_OPS.items()
}
_AZURE_ENDPOINTS = {
    suffix: Endpoint(f"/openai/deployments/{{deployment}}/{suffix}", "openai", op, model_in_path=True, azure_path=True)
    for suffix, op in _AZURE_OPS.items()
}

_UNKNOWN: dict[Family, Endpoint] = {
    family: Endpoint("other", family, "unknown", billed=False) for family in ("openai", "anthropic", "gemini")
}

ALL_ENDPOINTS: tuple[Endpoint, ...] = (
    *_STATIC.values(),
    _OPENAI_MODEL_ENDPOINT,
    *_GEMINI_ENDPOINTS.values(),
    *_AZURE_ENDPOINTS.values(),
)


_STATIC_MATCHES.update({key: EndpointMatch(endpoint, static=True) for key, endpoint in _STATIC.items()})


def match_endpoint(method: str, path: str) -> EndpointMatch | None:
    static = _STATIC_MATCHES.get((method, path))
    if static is not None:
        return static
    if method == "GET" and (m := _OPENAI_MODEL.match(path)):
        return EndpointMatch(_OPENAI_MODEL_ENDPOINT, m.group(1))
    if method != "POST":
        return None
    if m := _GEMINI.match(path):
        return EndpointMatch(_GEMINI_ENDPOINTS[(m.group(1), m.group(3))], m.group(2))
    if m := _AZURE.match(path):
        return EndpointMatch(_AZURE_ENDPOINTS[m.group(2)], m.group(1))
    return None


def unknown_route(path: str) -> EndpointMatch:
    """A path no endpoint serves: still counted (as endpoint `other`), and answered in its likely API's shape."""
    return EndpointMatch(_UNKNOWN[family_for_path(path)])


def family_for_path(path: str) -> Family:
    """The API family an unmatched path most likely belongs to, so even a 404 uses the caller's error shape."""
    if path.startswith("/v1beta/"):
        return "gemini"
    if path.startswith("/v1/messages"):
        return "anthropic"
    return "openai"
