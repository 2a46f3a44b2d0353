"""Attribution beyond team and app: the end user a request is for, and tags such as customer or cost centre.

Users and tag values are unbounded sets (a SaaS has as many users as customers), so they go to the ledger only,
never into Prometheus labels. What a client sends is bounded before it is kept: a user id is cut to
`MAX_USER_CHARS`, a tag is accepted only under a key the config allow-lists and with a short printable value;
everything else is ignored and counted in `metergate_attribution_ignored_total{reason}`.

Precedence: the `x-metergate-user` header, set by the application, wins over the user named in the body (OpenAI
`user` or `safety_identifier`, Anthropic `metadata.user_id`). A key's own tags win over the header's, so an
application cannot move its spend off the cost centre its key was issued for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

from prometheus_client.core import CounterMetricFamily, Metric

from metergate.auth import Principal
from metergate.config import MAX_TAG_VALUE_CHARS, TAG_KEY_PATTERN

USER_HEADER = "x-metergate-user"
TAGS_HEADER = "x-metergate-tags"
MAX_USER_CHARS = 256
MAX_HEADER_TAGS = 32

Tags = tuple[tuple[str, str], ...]  # sorted by key: one canonical form for the ledger and budget scopes

_TAG_KEY = re.compile(TAG_KEY_PATTERN)
_BAD_VALUE = re.compile(r"[\x00-\x1f\x7f,=]")
IGNORED_REASONS = ("unlisted_tag", "malformed_tag", "too_many_tags", "user_too_long", "invalid_user")


@dataclass(frozen=True, slots=True)
class Attribution:
    user: str | None = None
    tags: Tags = ()

    def tag(self, key: str) -> str | None:
        for k, v in self.tags:
            if k == key:
                return v
        return None


NO_ATTRIBUTION = Attribution()


def parse_tag_header(value: str) -> Iterator[tuple[str, str] | str]:
    """`customer=acme, project=x` as (key, value) pairs; an item that is not `key=value` yields the reason."""
    for item in value.split(","):
        if not item.strip():
            continue
        key, sep, val = item.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not _TAG_KEY.match(key) or not val or len(val) > MAX_TAG_VALUE_CHARS or _BAD_VALUE.search(val):
            yield "malformed_tag"
        else:
            yield key, val


def unlisted_tag(tags: Iterable[str], allowed: Iterable[str]) -> str | None:
    """Why a key's tags cannot be used (a key outside the allow-list), or None."""
    unlisted = sorted(set(tags) - set(allowed))
    return f"tags.{unlisted[0]}: not listed in attribution.tags" if unlisted else None


class AttributionPolicy:
    """Reads a request's end user and tags from its key, headers and body, within the config's allow-list."""

    def __init__(self, allowed_tags: Iterable[str]) -> None:
        self.allowed = frozenset(allowed_tags)
        self.ignored = dict.fromkeys(IGNORED_REASONS, 0)

    def attribute(self, principal: Principal, headers: Mapping[str, str]) -> Attribution:
        user_header = headers.get(USER_HEADER)
        tag_header = headers.get(TAGS_HEADER)
        if user_header is None and tag_header is None:
            return Attribution(None, principal.tags) if principal.tags else NO_ATTRIBUTION
        user = self.user(user_header) if user_header is not None else None
        tags = dict(principal.tags)
        if tag_header:
            accepted = 0
            for item in parse_tag_header(tag_header[:8192]):
                if isinstance(item, str):
                    self.ignored[item] += 1
                elif item[0] not in self.allowed:
                    self.ignored["unlisted_tag"] += 1
                elif accepted >= MAX_HEADER_TAGS:
                    self.ignored["too_many_tags"] += 1
                else:
                    accepted += 1
                    tags.setdefault(item[0], item[1])
        return Attribution(user, tuple(sorted(tags.items())))

    def with_body_user(self, attribution: Attribution, value: object) -> Attribution:
        """The user a request body names, unless a header named one already."""
        if attribution.user is not None or value is None:
            return attribution
        user = self.user(value)
        return replace(attribution, user=user) if user is not None else attribution

    def user(self, value: object) -> str | None:
        if not isinstance(value, str) or not value.strip():
            if value is not None and value != "":
                self.ignored["invalid_user"] += 1
            return None
        value = value.strip()
        if len(value) > MAX_USER_CHARS:
            # Cut, not refused: the provider accepts it, and refusing would break the application's call.
            self.ignored["user_too_long"] += 1
            value = value[:MAX_USER_CHARS]
        if "\x00" in value or not value.isprintable():
            value = "".join(c if c.isprintable() else "\ufffd" for c in value)
        return value

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "metergate_attribution_ignored",
            "User ids cut or ignored, and tags ignored (key not allow-listed, malformed, too many), by reason.",
            labels=("reason",),
        )
        for reason, n in self.ignored.items():
            family.add_metric([reason], n)
        yield family
