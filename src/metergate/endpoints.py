"""Every API route metergate knows, and how a request path maps onto one.

The catalogue below lists the OpenAI, Azure OpenAI, Anthropic and Gemini routes as templates, each with how the
gateway handles it:

- `relay`: the metered HTTP relay (`gateway.py`) reads the request, meters the response and prices it;
- `free`: forwarded untouched and counted (files, vector stores, model lists...): the provider does not bill it;
- `deferred`: forwarded, and billed later by the batch it creates (`batches.py` meters its results);
- `unmetered`: forwarded, but the provider bills it in a way the gateway cannot read (fine-tuning jobs, ephemeral
  realtime secrets, cache storage): counted as unmetered so it shows and alerts, refused past a block budget;
- `realtime`: a WebSocket session (`realtime.py`);
- `refuse`: never forwarded (organisation administration: a virtual key must not act as the organisation).

`Endpoint.label` is what the `endpoint` metric label shows: the route template, never a raw path with ids in it,
so a client cannot grow the series count through the path. A path matching no template is `other`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Family = Literal["openai", "anthropic", "gemini"]
FAMILIES: tuple[Family, ...] = ("openai", "anthropic", "gemini")
Handling = Literal["relay", "free", "deferred", "unmetered", "realtime", "refuse"]
Operation = Literal[
    "unknown",
    "forward",
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
    "images",
    "image_edit",
    "image_variation",
    "transcription",
    "translation",
    "speech",
    "predict",
    "realtime",
]


@dataclass(frozen=True, slots=True)
class Endpoint:
    label: str
    family: Family
    operation: Operation
    billed: bool = True  # the relay reads usage from the response (false: count_tokens, model lists)
    # Where the model name is: in the body, or in the path (Gemini models, Azure deployments).
    model_in_path: bool = False
    # Azure-style inbound path (/openai/deployments/{deployment}/...): only an azure-openai provider can serve it.
    azure_path: bool = False
    handling: Handling = "relay"
    # Forwarded responses that carry what metering needs later (batch ids, result files, absolute URLs).
    tap: str | None = None

    @property
    def forwarded(self) -> bool:
        """Handled by the pass-through forwarder (`passthrough.py`)."""
        return self.handling in ("free", "deferred", "unmetered", "refuse")


@dataclass(frozen=True, slots=True)
class EndpointMatch:
    endpoint: Endpoint
    path_model: str | None = None
    static: bool = False  # the path is exactly one of the fixed routes (known safe, nothing to check)
    params: Mapping[str, str] = field(default_factory=dict)  # path parameters by template name


# --- the catalogue ---------------------------------------------------------------------------------------------
# One line per route: methods (comma-separated, `*` for any), template, handling, then `op=` for relayed routes
# and `tap=` for forwarded responses the gateway reads. `{name}` is one path segment; `{name}:verb` a segment
# ending in `:verb` (Google's custom methods); a final `**` any rest of the path.

_OPENAI = """
POST    /v1/chat/completions                            relay op=chat
POST    /v1/completions                                 relay op=completions
POST    /v1/responses                                   relay op=responses
POST    /v1/responses/compact                           relay op=responses
POST    /v1/embeddings                                  relay op=embeddings
POST    /v1/images/generations                          relay op=images
POST    /v1/images/edits                                relay op=image_edit
POST    /v1/images/variations                           relay op=image_variation
POST    /v1/audio/transcriptions                        relay op=transcription
POST    /v1/audio/translations                          relay op=translation
POST    /v1/audio/speech                                relay op=speech
GET     /v1/models                                      relay op=models
GET     /v1/models/{model}                              relay op=model
DELETE  /v1/models/{model}                              free
GET     /v1/realtime                                    realtime op=realtime
POST    /v1/moderations                                 free
POST    /v1/responses/input_tokens                      free
GET,DELETE /v1/responses/{response_id}                  free
POST    /v1/responses/{response_id}/cancel              free
GET     /v1/responses/{response_id}/input_items         free
GET     /v1/chat/completions                            free
*       /v1/chat/completions/{completion_id}            free
GET     /v1/chat/completions/{completion_id}/messages   free
*       /v1/conversations                               free
*       /v1/conversations/**                            free
*       /v1/files                                       free
DELETE  /v1/files/{file_id}                             free tap=openai_file_delete
*       /v1/files/{file_id}                             free
GET     /v1/files/{file_id}/content                     free tap=openai_file_content
POST    /v1/uploads                                     free
POST    /v1/uploads/{upload_id}/parts                   free
POST    /v1/uploads/{upload_id}/complete                free
POST    /v1/uploads/{upload_id}/cancel                  free
POST    /v1/batches                                     deferred tap=openai_batch
GET     /v1/batches                                     free tap=openai_batch
GET     /v1/batches/{batch_id}                          free tap=openai_batch
POST    /v1/batches/{batch_id}/cancel                   free tap=openai_batch
*       /v1/vector_stores                               free
*       /v1/vector_stores/{vector_store_id}             free
*       /v1/vector_stores/{vector_store_id}/**          free
GET     /v1/fine_tuning/jobs                            free
POST    /v1/fine_tuning/jobs                            unmetered
*       /v1/fine_tuning/jobs/{job_id}                   free
POST    /v1/fine_tuning/jobs/{job_id}/resume            unmetered
*       /v1/fine_tuning/jobs/{job_id}/**                free
*       /v1/fine_tuning/checkpoints/**                  free
POST    /v1/fine_tuning/alpha/graders/run               unmetered
POST    /v1/fine_tuning/alpha/graders/validate          free
*       /v1/assistants                                  free
*       /v1/assistants/{assistant_id}                   free
POST    /v1/threads/runs                                unmetered
POST    /v1/threads/{thread_id}/runs                    unmetered
POST    /v1/threads/{thread_id}/runs/{run_id}/submit_tool_outputs  unmetered
*       /v1/threads                                     free
*       /v1/threads/**                                  free
GET     /v1/evals                                       free
POST    /v1/evals                                       free
*       /v1/evals/{eval_id}                             free
POST    /v1/evals/{eval_id}/runs                        unmetered
*       /v1/evals/{eval_id}/**                          free
GET     /v1/containers                                  free
POST    /v1/containers                                  unmetered
*       /v1/containers/{container_id}                   free
*       /v1/containers/{container_id}/**                free
GET     /v1/videos                                      free
POST    /v1/videos                                      unmetered
POST    /v1/videos/edits                                unmetered
POST    /v1/videos/extensions                           unmetered
POST    /v1/videos/{video_id}/remix                     unmetered
*       /v1/videos/{video_id}                           free
GET     /v1/videos/{video_id}/content                   free
*       /v1/videos/characters                           free
*       /v1/videos/characters/{character_id}            free
POST    /v1/realtime/client_secrets                     unmetered
POST    /v1/realtime/sessions                           unmetered
POST    /v1/realtime/transcription_sessions             unmetered
POST    /v1/realtime/translations                       unmetered
POST    /v1/realtime/translations/client_secrets        unmetered
POST    /v1/realtime/calls                              unmetered
POST    /v1/realtime/calls/{call_id}/**                 free
GET     /v1/audio/voices                                free
*       /v1/audio/voices/{voice_id}                     free
*       /v1/audio/voice_consents                        free
*       /v1/audio/voice_consents/{consent_id}           free
POST    /v1/chatkit/sessions                            unmetered
*       /v1/chatkit/**                                  free
POST    /v1/agents/sessions                             unmetered
POST    /v1/agents/sessions/{session_id}/turns          unmetered
POST    /v1/agents/automations/{automation_id}/invocations  unmetered
*       /v1/agents                                      free
*       /v1/agents/**                                   free
POST    /v1/live/sessions                               unmetered
*       /v1/live/**                                     free
*       /v1/skills                                      free
*       /v1/skills/**                                   free
*       /v1/webhook_endpoints                           free
*       /v1/webhook_endpoints/**                        free
GET     /v1/webhook_event_types                         free
*       /v1/vaults                                      free
*       /v1/vaults/**                                   free
*       /v1/organization/**                             refuse
*       /v1/projects/**                                 refuse
"""

# Azure OpenAI's classic data plane: the deployment in the path, an api-version in the query.
_AZURE = """
POST    /openai/deployments/{deployment}/chat/completions       relay op=chat
POST    /openai/deployments/{deployment}/completions            relay op=completions
POST    /openai/deployments/{deployment}/embeddings             relay op=embeddings
POST    /openai/deployments/{deployment}/images/generations     relay op=images
POST    /openai/deployments/{deployment}/images/edits           relay op=image_edit
POST    /openai/deployments/{deployment}/audio/transcriptions   relay op=transcription
POST    /openai/deployments/{deployment}/audio/translations     relay op=translation
POST    /openai/deployments/{deployment}/audio/speech           relay op=speech
POST    /openai/responses                                       relay op=responses
*       /openai/files                                           free
DELETE  /openai/files/{file_id}                                 free tap=openai_file_delete
*       /openai/files/{file_id}                                 free
GET     /openai/files/{file_id}/content                         free tap=openai_file_content
POST    /openai/batches                                         deferred tap=openai_batch
GET     /openai/batches                                         free tap=openai_batch
GET     /openai/batches/{batch_id}                              free tap=openai_batch
POST    /openai/batches/{batch_id}/cancel                       free tap=openai_batch
"""

_ANTHROPIC = """
POST    /v1/messages                                    relay op=messages
POST    /v1/messages/count_tokens                       relay op=count_tokens
POST    /v1/messages/batches                            deferred tap=anthropic_batch
GET     /v1/messages/batches                            free tap=anthropic_batch
GET,DELETE /v1/messages/batches/{batch_id}              free tap=anthropic_batch
POST    /v1/messages/batches/{batch_id}/cancel          free tap=anthropic_batch
GET     /v1/messages/batches/{batch_id}/results         free tap=anthropic_batch_results
GET     /v1/models                                      free
GET     /v1/models/{model}                              free
*       /v1/files                                       free
*       /v1/files/{file_id}                             free
GET     /v1/files/{file_id}/content                     free
*       /v1/skills                                      free
*       /v1/skills/**                                   free
POST    /v1/sessions                                    unmetered
POST    /v1/sessions/{session_id}/events                unmetered
POST    /v1/sessions/{session_id}/threads/{thread_id}/events  unmetered
*       /v1/sessions                                    free
*       /v1/sessions/**                                 free
POST    /v1/deployments/{deployment_id}/run             unmetered
*       /v1/deployments                                 free
*       /v1/deployments/**                              free
*       /v1/deployment_runs                             free
*       /v1/deployment_runs/**                          free
POST    /v1/dreams                                      unmetered
*       /v1/dreams                                      free
*       /v1/dreams/**                                   free
*       /v1/agents                                      free
*       /v1/agents/**                                   free
*       /v1/environments                                free
*       /v1/environments/**                             free
*       /v1/memory_stores                               free
*       /v1/memory_stores/**                            free
*       /v1/vaults                                      free
*       /v1/vaults/**                                   free
*       /v1/tunnels                                     free
*       /v1/tunnels/**                                  free
*       /v1/user_profiles                               free
*       /v1/user_profiles/**                            free
*       /v1/organizations/**                            refuse
*       /v1/compliance/**                               refuse
"""

# Written once with {v}; the Gemini API serves v1beta, v1 and v1alpha.
_GEMINI = """
POST    /{v}/models/{model}:generateContent             relay op=generate
POST    /{v}/models/{model}:streamGenerateContent       relay op=stream_generate
POST    /{v}/models/{model}:embedContent                relay op=embed
POST    /{v}/models/{model}:batchEmbedContents          relay op=batch_embed
POST    /{v}/models/{model}:countTokens                 relay op=count_tokens
POST    /{v}/models/{model}:predict                     relay op=predict
POST    /{v}/models/{model}:predictLongRunning          unmetered
POST    /{v}/models/{model}:batchGenerateContent        deferred tap=gemini_batch
POST    /{v}/models/{model}:asyncBatchEmbedContent      deferred tap=gemini_batch
GET     /{v}/models                                     free
GET     /{v}/models/{model}                             free
*       /{v}/files                                      free
*       /{v}/files/{file}                               free
GET     /download/{v}/files/{file}:download             free tap=gemini_download
GET     /{v}/files/{file}:download                      free tap=gemini_download
POST    /upload/{v}/files                               free tap=gemini_upload
GET     /{v}/batches                                    free tap=gemini_batch
*       /{v}/batches/{batch}                            free tap=gemini_batch
POST    /{v}/batches/{batch}:cancel                     free tap=gemini_batch
*       /{v}/operations                                 free
*       /{v}/operations/**                              free
*       /{v}/models/{model}/operations/**               free
POST    /{v}/cachedContents                             unmetered
GET     /{v}/cachedContents                             free
PATCH   /{v}/cachedContents/{cache}                     unmetered
*       /{v}/cachedContents/{cache}                     free
POST    /{v}/interactions                               unmetered
*       /{v}/interactions/**                            free
POST    /{v}/tunedModels                                unmetered
*       /{v}/tunedModels                                free
POST    /{v}/tunedModels/**                             unmetered
*       /{v}/tunedModels/**                             free
POST    /{v}/fileSearchStores/{store}:importFile        unmetered
POST    /upload/{v}/fileSearchStores/{store}:uploadToFileSearchStore  unmetered
*       /{v}/fileSearchStores                           free
*       /{v}/fileSearchStores/**                        free
*       /{v}/corpora                                    free
*       /{v}/corpora/**                                 free
POST    /{v}/authTokens                                 unmetered
"""

_GEMINI_VERSIONS = ("v1beta", "v1", "v1alpha")


class _Node:
    __slots__ = ("endpoints", "literal", "param", "rest", "verbs")

    def __init__(self) -> None:
        self.literal: dict[str, _Node] = {}
        self.param: tuple[str, _Node] | None = None
        self.verbs: dict[str, tuple[str, _Node]] = {}  # `{name}:verb` segments, by verb
        self.rest: dict[tuple[str, Family], Endpoint] | None = None  # `**` routes, by (method, family)
        self.endpoints: dict[tuple[str, Family], Endpoint] = {}


class RouteTable:
    """Templates in a segment trie: a lookup costs one dict access per path segment."""

    def __init__(self) -> None:
        self._root = _Node()
        self.endpoints: list[Endpoint] = []

    def add(self, methods: tuple[str, ...], template: str, endpoint: Endpoint) -> None:
        node = self._root
        segments = template.strip("/").split("/")
        for i, segment in enumerate(segments):
            if segment == "**":
                assert i == len(segments) - 1, template
                if node.rest is None:
                    node.rest = {}
                for method in methods:
                    node.rest.setdefault((method, endpoint.family), endpoint)
                self.endpoints.append(endpoint)
                return
            if segment.startswith("{"):
                name, _, verb = segment[1:].partition("}")
                if verb:
                    verb = verb.removeprefix(":")
                    node = node.verbs.setdefault(verb, (name, _Node()))[1]
                else:
                    if node.param is None:
                        node.param = (name, _Node())
                    node = node.param[1]
            else:
                node = node.literal.setdefault(segment, _Node())
        for method in methods:
            node.endpoints.setdefault((method, endpoint.family), endpoint)
        self.endpoints.append(endpoint)

    def lookup(self, method: str, path: str) -> list[tuple[Endpoint, dict[str, str]]]:
        """The endpoints (one per API family serving the path) and the path parameters."""
        segments = path[1:].split("/")
        found: list[tuple[Endpoint, dict[str, str]]] = []
        self._walk(self._root, segments, 0, method, {}, found)
        return found

    def _walk(
        self,
        node: _Node,
        segments: list[str],
        i: int,
        method: str,
        params: dict[str, str],
        found: list[tuple[Endpoint, dict[str, str]]],
    ) -> None:
        if i == len(segments):
            _collect(node.endpoints, method, params, found)
            return
        segment = segments[i]
        child = node.literal.get(segment)
        if child is not None:
            self._walk(child, segments, i + 1, method, params, found)
        if node.verbs and ":" in segment:
            head, _, verb = segment.rpartition(":")
            named = node.verbs.get(verb)
            if named is not None and head and ":" not in head:
                self._walk(named[1], segments, i + 1, method, {**params, named[0]: head}, found)
        if node.param is not None and segment:
            name, child = node.param
            self._walk(child, segments, i + 1, method, {**params, name: segment}, found)
        if node.rest is not None:
            _collect(node.rest, method, params, found)


def _collect(
    table: dict[tuple[str, Family], Endpoint],
    method: str,
    params: dict[str, str],
    found: list[tuple[Endpoint, dict[str, str]]],
) -> None:
    for family in FAMILIES:
        if any(e.family == family for e, _ in found):
            continue  # an earlier, more specific template of this family won
        endpoint = table.get((method, family)) or table.get(("*", family))
        if endpoint is not None:
            found.append((endpoint, params))


def _parse(
    table: str, family: Family, *, prefix: str = "", azure: bool = False
) -> list[tuple[tuple[str, ...], str, Endpoint]]:
    routes = []
    for line in table.strip().splitlines():
        methods, template, handling, *options = line.split()
        opts = dict(o.split("=", 1) for o in options)
        op = opts.get("op", "forward")
        template = prefix + template
        model_in_path = "{model}" in template or "{deployment}" in template
        endpoint = Endpoint(
            label=template,
            family=family,
            operation=op,  # type: ignore[arg-type]
            billed=handling == "relay" and op not in ("count_tokens", "models", "model"),
            model_in_path=model_in_path and handling == "relay",
            azure_path=azure,
            handling=handling,  # type: ignore[arg-type]
            tap=opts.get("tap"),
        )
        routes.append((tuple(methods.split(",")), template, endpoint))
    return routes


def _catalogue() -> RouteTable:
    table = RouteTable()
    routes = [
        *_parse(_OPENAI, "openai"),
        # Azure OpenAI's v1 API is OpenAI's under /openai: any OpenAI-speaking provider serves it.
        *_parse(_OPENAI, "openai", prefix="/openai"),
        *_parse(_AZURE, "openai", azure=True),
        *_parse(_ANTHROPIC, "anthropic"),
    ]
    for version in _GEMINI_VERSIONS:
        routes += _parse(_GEMINI.replace("{v}", version), "gemini")
    for methods, template, endpoint in routes:
        table.add(methods, template, endpoint)
    return table


CATALOGUE = _catalogue()
ALL_ENDPOINTS: tuple[Endpoint, ...] = tuple(CATALOGUE.endpoints)

# The hot routes, matched with one dict lookup before the trie.
_STATIC_MATCHES: dict[tuple[str, str], EndpointMatch] = {}
for _ep in ALL_ENDPOINTS:
    if _ep.handling == "relay" and _ep.operation != "models" and "{" not in _ep.label:
        _STATIC_MATCHES.setdefault(("POST", _ep.label), EndpointMatch(_ep, static=True))

_UNKNOWN: dict[Family, Endpoint] = {
    family: Endpoint("other", family, "unknown", billed=False, handling="unmetered") for family in FAMILIES
}


def match_endpoint(method: str, path: str, headers: Mapping[str, str] | None = None, query: str = "") -> EndpointMatch:
    """The route a request is for. Paths several APIs share (`/v1/models`, `/v1/files`) go to the API whose
    credential or version header the client sent; a path no template matches is `other`, forwarded to the API it
    most likely belongs to."""
    static = _STATIC_MATCHES.get((method, path))
    if static is not None:
        return static
    headers = headers if headers is not None else {}
    found = CATALOGUE.lookup(method, path)
    if not found:
        return EndpointMatch(_UNKNOWN[caller_family(path, headers, query)])
    if len(found) == 1:
        endpoint, params = found[0]
    else:
        family = caller_family(path, headers, query)
        endpoint, params = next(((e, p) for e, p in found if e.family == family), found[0])
    path_model = (params.get("model") or params.get("deployment")) if endpoint.model_in_path else None
    return EndpointMatch(endpoint, path_model, params=params)


def caller_family(path: str, headers: Mapping[str, str], query: str = "") -> Family:
    """The API a client speaks, from what its SDK sends: Anthropic's SDKs always send `anthropic-version`,
    Gemini's send `x-goog-api-key` or `?key=`; paths only one API has decide the rest."""
    if "anthropic-version" in headers or "x-api-key" in headers:
        return "anthropic"
    if "x-goog-api-key" in headers or query.startswith("key=") or "&key=" in query:
        return "gemini"
    if path.startswith(("/v1beta/", "/v1alpha/", "/upload/", "/download/")):
        return "gemini"
    if path.startswith("/v1/messages"):
        return "anthropic"
    return "openai"


def unknown_route(path: str, headers: Mapping[str, str] | None = None) -> EndpointMatch:
    """A path no endpoint serves: still counted (as endpoint `other`), and answered in its likely API's shape."""
    return EndpointMatch(_UNKNOWN[caller_family(path, headers or {})])


def family_for_path(path: str) -> Family:
    """The API family an unmatched path most likely belongs to, so even an error uses the caller's error shape."""
    return caller_family(path, {})
