"""Which provider serves a call.

A call naming a model goes to the first route whose model glob matches and whose provider speaks the API the
client called (routes are pass-through, so an Anthropic request cannot go to an OpenAI upstream). A call naming no
model (files, batches, model lists) goes to the first route whose `path:` glob matches, else to the first
configured provider speaking the client's API.
"""

from __future__ import annotations

from dataclasses import dataclass

from metergate.config import RouteConfig
from metergate.endpoints import FAMILIES, Endpoint, EndpointMatch, Family
from metergate.errors import GatewayError
from metergate.providers import Upstream

_MAX_CACHED = 10_000


@dataclass(frozen=True, slots=True)
class Route:
    upstream: Upstream
    upstream_model: str  # after alias resolution


class Router:
    def __init__(self, routes: list[RouteConfig], upstreams: dict[str, Upstream]) -> None:
        self._routes = [(r, upstreams[r.provider]) for r in routes]
        self._upstreams = list(upstreams.values())
        self._cache: dict[tuple[str, str, bool], Route | None] = {}

    def resolve(self, model: str, match: EndpointMatch) -> Route | None:
        key = (model, match.endpoint.family, match.endpoint.azure_path)
        if key in self._cache:
            return self._cache[key]
        found = None
        for route, upstream in self._routes:
            if route.matches(model) and upstream.serves(match):
                found = Route(upstream, route.upstream_model or model)
                break
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[key] = found
        return found

    def require(self, model: str, match: EndpointMatch) -> Route:
        """The route for a model, or the API's own "model not found" error."""
        route = self.resolve(model, match)
        if route is None:
            raise GatewayError(
                404,
                "unknown_model",
                f"The model `{model}` does not exist or is not routed by this gateway.",
                code="model_not_found",
            )
        return route

    def for_path(self, path: str, match: EndpointMatch) -> Upstream | None:
        """The provider for a call that names no model."""
        for route, upstream in self._routes:
            if route.matches_path(path) and upstream.serves(match):
                return upstream
        return next((u for u in self._upstreams if u.serves(match)), None)

    def default_providers(self) -> dict[Family, Upstream | None]:
        """Per API, the provider serving model-less calls no `path:` route claims (for check-config)."""
        return {
            family: next((u for u in self._upstreams if u.serves(EndpointMatch(Endpoint("", family, "forward")))), None)
            for family in FAMILIES
        }

    def listed_models(self) -> list[tuple[str, str]]:
        """(model, provider) pairs named literally by routes, for GET /v1/models."""
        return [(r.named_model, r.provider) for r, _ in self._routes if r.named_model is not None]
