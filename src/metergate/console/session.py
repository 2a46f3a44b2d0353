"""Console sessions: a signed cookie, not a server-side table, so that every replica sharing the admin token
accepts it; and the CSRF token every state change must carry.

The cookie holds an expiry, a random nonce and an HMAC of both keyed by the admin token (so changing the token
ends every session). The admin token itself never reaches the browser after the login form.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie

COOKIE = "metergate_console"
LIFETIME_S = 12 * 3600


class Sessions:
    def __init__(self, admin_token: str, clock: Callable[[], float] = time.time) -> None:
        # A slow derivation (scrypt, ~50 ms once): a cookie or CSRF token seen by someone does not let them test
        # guesses of the admin token offline at hash speed.
        self._key = hashlib.scrypt(admin_token.encode(), salt=b"metergate console session", n=2**14, r=8, p=1)
        self._token = admin_token.encode()
        self._clock = clock
        self._ended: dict[str, float] = {}  # nonce -> expiry of sessions logged out on this replica

    def token_ok(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode(), self._token)

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def issue(self) -> str:
        """A new session cookie value."""
        payload = f"{int(self._clock()) + LIFETIME_S}.{secrets.token_urlsafe(18)}"
        return f"{payload}.{self._sign(payload)}"

    def nonce(self, cookie_header: str | None) -> str | None:
        """The session's nonce when the request carries a valid, unexpired session cookie."""
        value = session_cookie(cookie_header)
        if value is None or value.count(".") != 2:
            return None
        expires, nonce, signature = value.split(".")
        if not hmac.compare_digest(signature, self._sign(f"{expires}.{nonce}")):
            return None
        if not expires.isdigit() or int(expires) < self._clock() or nonce in self._ended:
            return None
        return nonce

    def end(self, cookie_header: str | None) -> None:
        """Log a session out: refused from now on by this replica (other replicas: until it expires)."""
        nonce = self.nonce(cookie_header)
        value = session_cookie(cookie_header)
        if nonce is None or value is None:
            return
        now = self._clock()
        self._ended = {n: t for n, t in self._ended.items() if t > now}
        if len(self._ended) < 100_000:
            self._ended[nonce] = float(value.split(".")[0])

    def csrf(self, nonce: str) -> str:
        return self._sign("csrf|" + nonce)[:40]

    def csrf_ok(self, nonce: str, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf(nonce).encode())


class FailureLimit:
    """Wrong tokens per client address and minute: past `limit`, that address is refused without a check, so
    guessing is slow, and nobody else is locked out."""

    def __init__(self, limit: int = 20, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self._clock = limit, window_s, clock
        self._failures: dict[str, list[float]] = {}

    def blocked(self, client: str) -> bool:
        now = self._clock()
        recent = [t for t in self._failures.get(client, ()) if now - t < self.window_s]
        if recent:
            self._failures[client] = recent
        else:
            self._failures.pop(client, None)
        return len(recent) >= self.limit

    def failed(self, client: str) -> None:
        if len(self._failures) > 10_000:  # addresses come from the network: the table must not grow with them
            self._failures.clear()
        self._failures.setdefault(client, []).append(self._clock())


def session_cookie(header: str | None) -> str | None:
    if not header or len(header) > 8192:
        return None
    try:
        jar = SimpleCookie()
        jar.load(header)
        morsel = jar.get(COOKIE)
        value = morsel.value if morsel is not None else None
    except (CookieError, TypeError, ValueError):
        return None
    return value if value is not None and value.isascii() else None


# The cookie goes only to /console/ (the pages and /console/admin/, the admin API as the console calls it): never
# with the LLM API traffic the gateway forwards to providers.
COOKIE_PATH = "/console/"


def set_cookie(value: str, secure: bool) -> str:
    flags = f"; Path={COOKIE_PATH}; HttpOnly; SameSite=Strict; Max-Age={LIFETIME_S}" + ("; Secure" if secure else "")
    return f"{COOKIE}={value}{flags}"


def clear_cookie() -> str:
    return f"{COOKIE}=; Path={COOKIE_PATH}; HttpOnly; SameSite=Strict; Max-Age=0"
