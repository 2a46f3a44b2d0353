"""Which budgets and rate limits a request counts against: scopes matched on who sent it and what it asked for.

A scope (config `ScopeConfig`) names any of team, app, key, end user, tags, model and provider; a request counts
against every scope whose named fields all match it. `user: "*"` makes one counter per end user (the "instance"
of the scope), and a scope naming one user takes that user out of the `*` scope that is otherwise identical.
Matching is pure and cheap: a dict lookup by team, then a few comparisons per scope of that team.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Generic, TypeVar

from metergate.config import ScopeConfig
from metergate.labels import OTHER

if TYPE_CHECKING:
    from metergate.exchange import RequestContext
    from metergate.usage import UsageRecord

S = TypeVar("S", bound=ScopeConfig)
Tags = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Subject:
    """A request as scopes see it."""

    team: str
    app: str
    key_id: str
    user: str | None = None
    tags: Tags = ()
    model: str | None = ""  # None: not known before the response (a batch names its models in its input file)
    provider: str = ""

    @classmethod
    def of_record(cls, rec: UsageRecord) -> Subject:
        return cls(rec.team, rec.app, rec.key_id, rec.user, rec.tags, rec.model, rec.provider)

    @classmethod
    def of_request(cls, ctx: RequestContext) -> Subject | None:
        principal = ctx.principal
        if principal is None:
            return None
        a = ctx.attribution
        # A batch names its models only in its input file: model budgets count its creation, so that a spent model
        # budget refuses it rather than let it through unseen (its requests are billed to the right model later).
        unknown = ctx.match.endpoint.handling == "deferred" and ctx.model_label == OTHER
        model = None if unknown else ctx.model_label
        return cls(principal.team, principal.app, principal.key_id, a.user, a.tags, model, ctx.provider_label)


def scope_id(scope: ScopeConfig, period: str | None) -> str:
    """A stable id for a scope and period: `search/*/day` for a team, `search/ranker/month` for an app (the ids
    of earlier releases, kept so shared counters carry over); other scopes add their fields after `;`."""
    base = f"{scope.team or '*'}/{scope.app or '*'}/{period or '-'}"
    if scope.simple:
        return base
    parts = [("key", scope.key), ("user", scope.user)]
    parts += [(f"tag.{k}", v) for k, v in sorted(scope.tags.items())]
    parts += [("model", scope.model), ("provider", scope.provider)]
    return base + "".join(f";{name}={value}" for name, value in parts if value is not None)


def _without_user(scope: ScopeConfig) -> tuple[object, ...]:
    return (scope.team, scope.app, scope.key, tuple(sorted(scope.tags.items())), scope.model, scope.provider)


class ScopeIndex(Generic[S]):
    """The entries (budgets or rate limits) a subject counts against, each with its counter's id."""

    def __init__(self, entries: Sequence[S], id_of: Callable[[S], str], kind_of: Callable[[S], object]) -> None:
        """`kind_of`: what an entry naming a user must share with a `*` entry to replace it for that user (a budget's
        period and action, a rate limit's kinds of limit)."""
        self.entries = list(entries)
        self._ids = {id(e): id_of(e) for e in self.entries}
        self._by_team: dict[str | None, list[S]] = {}
        for e in self.entries:
            self._by_team.setdefault(e.team, []).append(e)
        # Users named by an entry of the same scope and period: out of that `*` entry's reach.
        named: dict[tuple[object, ...], set[str]] = {}
        for e in self.entries:
            if e.user is not None and e.user != "*":
                named.setdefault((*_without_user(e), kind_of(e)), set()).add(e.user)
        self._overridden = {
            id(e): frozenset(named.get((*_without_user(e), kind_of(e)), ())) for e in self.entries if e.per_user
        }

    def id_of(self, entry: S) -> str:
        return self._ids[id(entry)]

    def matching(self, subject: Subject) -> list[tuple[S, str]]:
        """(entry, counter id) for every entry the subject counts against."""
        found: list[tuple[S, str]] = []
        for group in (self._by_team.get(subject.team), self._by_team.get(None)):
            for e in group or ():
                if self.matches(e, subject):
                    base = self._ids[id(e)]
                    found.append((e, f"{base}|{subject.user}" if e.per_user else base))
        return found

    def matches(self, e: S, subject: Subject) -> bool:
        if (e.team is not None and e.team != subject.team) or (e.app is not None and e.app != subject.app):
            return False
        if e.key is not None and e.key != subject.key_id:
            return False
        if e.user is not None:
            if subject.user is None:
                return False
            if e.per_user:
                if subject.user in self._overridden[id(e)]:
                    return False
            elif e.user != subject.user:
                return False
        if e.tags:
            have = dict(subject.tags)
            if any(have.get(k) != v for k, v in e.tags.items()):
                return False
        if e.provider is not None and e.provider != subject.provider:
            return False
        return e.model is None or subject.model is None or fnmatchcase(subject.model, e.model)

    def overridden(self, entry: S) -> frozenset[str]:
        return self._overridden.get(id(entry), frozenset())
