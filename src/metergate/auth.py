"""Who sent a request: virtual keys mapped to a team and an app.

Clients keep their SDK and put a gateway key where the SDK puts its provider key. Only the key's sha256 is ever
stored; the key itself is hashed on arrival and never logged or forwarded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from metergate.config import Config
from metergate.query import query_items, query_value, without

# Where each SDK puts its key: OpenAI and current Anthropic SDKs send Bearer, older Anthropic SDKs x-api-key,
# Azure api-key, Gemini x-goog-api-key or ?key=.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
TEAM_HEADER = "x-metergate-team"
APP_HEADER = "x-metergate-app"


@dataclass(frozen=True, slots=True)
class Principal:
    team: str
    app: str
    key_id: str
    tags: tuple[tuple[str, str], ...] = ()  # the key's own attribution tags, sorted by key
    include_cost: bool = False  # every response to this key carries its cost (costfield.py)


def presented_key(headers: Mapping[str, str], query: str) -> str | None:
    for name in CREDENTIAL_HEADERS:
        value = headers.get(name)
        if value:
            if name == "authorization":
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer" or not token:
                    continue
                return token.strip()
            return value.strip()
    if "key" in query or "%" in query:
        # Names are compared decoded, as the provider decodes them: `?k%65y=` is a key parameter too.
        for name, item in query_items(query):
            if name == "key" and (value := query_value(item)):
                return value
    return None


def query_without_key(query: str) -> str:
    """The query string to forward: a `?key=` credential (however its name is escaped) is the client's gateway key
    and never leaves the gateway; every other item goes out byte for byte."""
    return without(query, "key")


class KeyRing:
    """Resolves presented keys to principals: keys from the config, plus keys added at run time."""

    def __init__(self, config: Config) -> None:
        self._trusted_headers = config.server.trusted_headers
        self._by_hash: dict[str, Principal] = {
            k.sha256: Principal(k.team, k.app, k.key_id, tuple(sorted(k.tags.items())), k.include_cost)
            for k in config.keys
        }
        self._static = frozenset(self._by_hash)

    def add(self, sha256: str, principal: Principal) -> None:
        self._by_hash[sha256] = principal

    def remove(self, sha256: str) -> None:
        if sha256 not in self._static:
            self._by_hash.pop(sha256, None)

    def replace_dynamic(self, keys: Mapping[str, Principal]) -> None:
        """Swap in the current set of run-time keys (revoked ones disappear)."""
        self._by_hash = {h: p for h, p in self._by_hash.items() if h in self._static}
        for sha256, principal in keys.items():
            self._by_hash.setdefault(sha256, principal)

    def holds(self, principal: Principal) -> bool:
        """Whether a key of this principal is still valid (not revoked since it was seen)."""
        return principal.key_id == "trusted-header" or principal in self._by_hash.values()

    def authenticate(self, headers: Mapping[str, str], query: str) -> Principal | None:
        key = presented_key(headers, query)
        if key is not None:
            principal = self._by_hash.get(hashlib.sha256(key.encode()).hexdigest())
            if principal is not None:
                return principal
        if self._trusted_headers:
            team = headers.get(TEAM_HEADER)
            if team:
                return Principal(team, headers.get(APP_HEADER) or "default", "trusted-header")
        return None
