"""Query strings handled as sent: items are removed or added, never decoded and re-encoded.

`urlencode(parse_qsl(q))` is not the identity (`%41` becomes `A`, `+` and `%20` trade places, `;` and bare names
change), and a provider must receive the query the gateway read. Only the names are decoded, to recognise an
item the way the provider will.
"""

from __future__ import annotations

from urllib.parse import quote, unquote_plus


def query_items(query: str) -> list[tuple[str, str]]:
    """(decoded name, item exactly as sent) for every `&`-separated item of a query string."""
    return [(unquote_plus(item.partition("=")[0]), item) for item in query.split("&") if item]


def query_value(item: str) -> str:
    return unquote_plus(item.partition("=")[2])


def without(query: str, *names: str) -> str:
    """The query minus every item whose decoded name is one of `names`; the rest byte for byte."""
    if not query or (not any(name in query for name in names) and "%" not in query and "+" not in query):
        return query
    return "&".join(item for name, item in query_items(query) if name not in names)


def with_item(query: str, name: str, value: str) -> str:
    """The query with `name=value` appended (encoded), unless an item of that name is already there."""
    if any(n == name for n, _ in query_items(query)):
        return query
    item = f"{quote(name, safe='')}={quote(value, safe='')}"
    return f"{query}&{item}" if query else item
