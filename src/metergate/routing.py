"""Which provider serves a requested model: the first route whose glob matches and whose provider speaks the
API the client called (routes are pass-through, so an Anthropic request cannot go to an OpenAI upstream)."""

from __future__ import annotations

from dataclasses import dataclass

from metergate.config import RouteConfig
from metergate.endpoints import EndpointMatch
from metergate.providers import Upstream

_MAX_CACHED = 10_000


@dataclass(frozen=True, slots=True)
class Route:
    upstream: Upstream
    upstream_model: str  # after alias resolution


class Router:
    def __init__(self, routes: list[RouteConfig], upstreams: dict[str, Upstream]) -> None:
        self._routes = [(r, upstreams[r.provider]) for r in routes]
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

    def listed_models(self) -> list[tuple[str, str]]:
        """(model, provider) pairs named literally by routes, for GET /v1/models."""
        return [(r.model, r.provider) for r, _ in self._routes if not r.is_glob]
