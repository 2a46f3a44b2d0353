"""The web console at /console/: pages served by the gateway itself, reading only the admin API.

The pages are static HTML, CSS and one script (`static/console.js`, no build step) plus uPlot for charts, all in
the package. Every figure on them comes from a `GET /admin/...` call the script makes with the session cookie, so
the console has no second way to compute a number. This module serves the files, the login form and the session
cookie; `admin.py` accepts that cookie (with a CSRF token on every state change).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from metergate.console.session import FailureLimit, Sessions, clear_cookie, set_cookie

STATIC = Path(__file__).parent / "static"
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".md": "text/plain; charset=utf-8",
}
# Nothing but this origin: no inline script or style, no other host, no framing, forms post only here.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = (
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),  # no-referrer would make browsers send `Origin: null` on form posts
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
)
MAX_FAILED_LOGINS_PER_MINUTE = 20


@dataclass
class Reply:
    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)


def same_origin(headers: dict[str, str], public_url: str | None = None) -> bool:
    """A browser's state-changing request from this origin: Origin (when sent) is the gateway's public URL (or,
    without one, the Host it was sent to), and Fetch Metadata (when sent) does not say cross-site."""
    if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        return False
    origin = headers.get("origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    if public_url:
        want = urlsplit(public_url)
        got = urlsplit(origin)
        return (got.scheme, got.netloc) == (want.scheme, want.netloc)
    return urlsplit(origin).netloc == headers.get("host", "")


def form_fields(body: bytes) -> dict[str, str]:
    try:
        return dict(parse_qsl(body.decode("utf-8", "replace"), max_num_fields=4))
    except ValueError:
        return {}


class Console:
    def __init__(self, sessions: Sessions | None, timezone: str, public_url: str | None = None) -> None:
        self.sessions = sessions  # None: the admin API is off, and so is the console
        self.public_url = public_url
        self.limit = FailureLimit(MAX_FAILED_LOGINS_PER_MINUTE)
        self.timezone = timezone
        self.files = {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file()}

    async def handle(self, method: str, path: str, headers: dict[str, str], body: bytes, client: str = "") -> Reply:
        if self.sessions is None:
            return _page(404, "Console off", "<p>Set METERGATE_ADMIN_TOKEN to enable the admin API and console.</p>")
        if path == "/console":
            return Reply(308, b"", [("location", "/console/")])
        if path.startswith("/console/static/"):
            return self._static(path.removeprefix("/console/static/"))
        if path == "/console/login" and method == "POST":
            return self._login(headers, body, client)
        if path == "/console/logout" and method == "POST":
            return self._logout(headers, body)
        if path == "/console/" and method in ("GET", "HEAD"):
            nonce = self.sessions.nonce(headers.get("cookie"))
            if nonce is None:
                return _login_page()
            return _shell(self.sessions.csrf(nonce), self.timezone)
        return _page(404, "Not found", '<p>No such console page. <a href="/console/">Back to the console</a>.</p>')

    def _static(self, name: str) -> Reply:
        file = self.files.get(name)
        if file is None:
            return Reply(404, b"not found", [("content-type", "text/plain")])
        kind = _TYPES.get(file.suffix, "application/octet-stream")
        return Reply(200, file.read_bytes(), [("content-type", kind), ("cache-control", "no-cache")])

    def _login(self, headers: dict[str, str], body: bytes, client: str) -> Reply:
        assert self.sessions is not None
        if not same_origin(headers, self.public_url):
            return _page(403, "Refused", "<p>Log in from the console's own page.</p>")
        if self.limit.blocked(client):
            return _login_page("Too many wrong tokens from this address: wait a minute.", 429)
        if not self.sessions.token_ok(form_fields(body).get("token", "").strip()):
            self.limit.failed(client)
            return _login_page("That is not the admin token.", 401)
        secure = headers.get("x-forwarded-proto") == "https" or (self.public_url or "").startswith("https:")
        return Reply(303, b"", [("location", "/console/"), ("set-cookie", set_cookie(self.sessions.issue(), secure))])

    def _logout(self, headers: dict[str, str], body: bytes) -> Reply:
        assert self.sessions is not None
        nonce = self.sessions.nonce(headers.get("cookie"))
        form = form_fields(body)
        if nonce is not None and not (
            same_origin(headers, self.public_url) and self.sessions.csrf_ok(nonce, form.get("csrf"))
        ):
            return _page(403, "Refused", "<p>Log out from the console's own page.</p>")
        self.sessions.end(headers.get("cookie"))
        return Reply(303, b"", [("location", "/console/"), ("set-cookie", clear_cookie())])


def _document(title: str, body: str, extra_head: str = "") -> bytes:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)} · metergate</title>"
        '<link rel="stylesheet" href="/console/static/console.css">'
        '<link rel="icon" href="data:,">'
        f"{extra_head}</head><body>{body}</body></html>"
    ).encode()


def _page(status: int, title: str, body: str) -> Reply:
    return Reply(status, _document(title, f'<main class="narrow"><h1>{html.escape(title)}</h1>{body}</main>'))


def _login_page(error: str = "", status: int = 200) -> Reply:
    message = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    body = (
        '<main class="narrow"><h1>metergate console</h1>'
        '<form method="post" action="/console/login" class="login">'
        '<label for="token">Admin token</label>'
        '<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>'
        f'{message}<button type="submit">Log in</button>'
        '<p class="hint">The value of METERGATE_ADMIN_TOKEN where the gateway runs (`metergate demo` prints it). '
        "It is kept in an HttpOnly cookie for 12 hours.</p></form></main>"
    )
    return Reply(status, _document("Log in", body))


def _shell(csrf: str, timezone: str) -> Reply:
    head = (
        f'<meta name="csrf-token" content="{html.escape(csrf)}">'
        f'<meta name="timezone" content="{html.escape(timezone)}">'
        '<link rel="stylesheet" href="/console/static/vendor/uplot-1.6.32/uPlot.min.css">'
        '<script src="/console/static/vendor/uplot-1.6.32/uPlot.iife.min.js" defer></script>'
        '<script src="/console/static/console.js" defer></script>'
    )
    nav = "".join(
        f'<a href="#/{page}" data-page="{page}">{label}</a>'
        for page, label in (
            ("overview", "Overview"),
            ("teams", "Teams"),
            ("budgets", "Budgets"),
            ("keys", "Keys"),
            ("requests", "Requests"),
        )
    )
    body = (
        '<header><a class="brand" href="#/overview">metergate</a>'
        f'<nav aria-label="Console pages">{nav}</nav>'
        '<span class="live" id="live" aria-live="polite"></span>'
        '<form method="post" action="/console/logout">'
        f'<input type="hidden" name="csrf" value="{html.escape(csrf)}">'
        '<button type="submit" class="link">Log out</button></form></header>'
        '<main id="app" tabindex="-1"><p>Loading…</p></main>'
    )
    return Reply(200, _document("Console", body, head))
