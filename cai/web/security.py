"""Who may write, and proof that a POST came from one of our own pages.

Every browser gets a random session id in an HttpOnly, SameSite=Strict cookie. Forms carry a
CSRF token, an HMAC of that id under a key that never leaves the server, so a page elsewhere can
neither read nor compute it. Logging in (the `CAI_WEB_TOKEN` value, compared in constant time)
issues a fresh session id and a second cookie holding another HMAC of it; nothing is stored on
the server, and a restart (a new key) logs everyone out.

Failed logins are throttled in memory (LoginThrottle): per client address and across all clients,
so neither one guesser nor many can try more than a few tokens per window."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import math
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cai.errors import BadInput

SESSION_COOKIE = "cai_session"
AUTH_COOKIE = "cai_auth"
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{32,64}")
MIN_TOKEN_LENGTH = 16
"""Shorter write tokens are refused: with the login throttle, 16 random characters are out of
reach of guessing; a short or dictionary word is not."""


def check_token(token: str | None) -> None:
    """Raise BadInput (exit 2 in the CLI) when a write token is set but too short to be safe."""
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        chars = f"{len(token)} character{'s' if len(token) != 1 else ''}"
        raise BadInput(
            f"CAI_WEB_TOKEN is {chars} long; use at least {MIN_TOKEN_LENGTH} random characters "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`), or unset it "
            "to serve the UI read-only"
        )


def new_session_id() -> str:
    return secrets.token_urlsafe(32)


def valid_session_id(value: str | None) -> bool:
    return value is not None and _SESSION_ID.fullmatch(value) is not None


@dataclass(frozen=True)
class Guard:
    token: str | None
    """The bootstrap token (CAI_WEB_TOKEN), which logs in as an admin; without it, only the
    named tokens of `cai token create` log in, and with none of those the UI is read-only."""
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def token_matches(self, given: str) -> bool:
        if self.token is None:
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())

    def csrf_token(self, session_id: str) -> str:
        return self._sign("csrf", session_id)

    def csrf_ok(self, session_id: str | None, given: str | None) -> bool:
        if session_id is None or not given or not valid_session_id(session_id):
            return False
        return hmac.compare_digest(given.encode(), self.csrf_token(session_id).encode())

    def auth_value(self, session_id: str, actor: str) -> str:
        """The login cookie: who logged in on this session, signed so it cannot be made up."""
        return f"{actor}|{self._sign('auth', f'{session_id}|{actor}')}"

    def logged_in_as(self, session_id: str | None, cookie: str | None) -> str | None:
        """The name a valid login cookie for this session carries (the caller still checks that
        its token is not revoked), else None."""
        if session_id is None or not cookie or not valid_session_id(session_id):
            return None
        actor, _, _ = cookie.rpartition("|")
        if not actor or not hmac.compare_digest(cookie.encode(), self.auth_value(session_id, actor).encode()):
            return None
        return actor

    def _sign(self, purpose: str, session_id: str) -> str:
        # The purpose prefix keeps a CSRF token from ever doubling as an auth cookie.
        return hmac.new(self.key, f"{purpose}:{session_id}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Attempt:
    """One login attempt as the throttle saw it: allowed (retry_after None) or refused."""

    client: str
    at: float
    retry_after: int | None
    """Whole seconds until this client may try again; None when the attempt may go ahead."""
    scope: str = ""
    """Why it was refused: "client" (this address failed too often) or "server" (all did)."""

    @property
    def allowed(self) -> bool:
        return self.retry_after is None


@dataclass
class LoginThrottle:
    """Sliding-window limits on failed logins: at most `per_client` per client and `overall`
    across all clients within any `window` seconds.

    An allowed attempt is counted as a failure the moment it is let through, before the token is
    compared, so concurrent guesses cannot all slip past the limit; succeeded() takes it back."""

    per_client: int = 5
    overall: int = 50
    window: float = 300.0
    clock: Callable[[], float] = time.monotonic
    """Monotonic, so that a wall-clock change neither lifts nor extends a lockout; injectable for tests."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _clients: dict[str, deque[float]] = field(default_factory=dict, repr=False)
    _all: deque[float] = field(default_factory=deque, repr=False)

    def attempt(self, client: str) -> Attempt:
        """Let `client` try a token now, or say how long it must wait (then the token must not
        even be compared)."""
        with self._lock:
            now = self.clock()
            self._expire(now)
            mine = self._clients.get(client, deque())
            waits: dict[str, float] = {}
            if len(mine) >= self.per_client:
                waits["client"] = mine[-self.per_client] + self.window - now
            if len(self._all) >= self.overall:
                waits["server"] = self._all[-self.overall] + self.window - now
            if waits:
                scope = max(waits, key=lambda k: waits[k])
                return Attempt(client, now, max(1, math.ceil(waits[scope])), scope)
            self._clients[client] = mine
            mine.append(now)
            self._all.append(now)
            return Attempt(client, now, None)

    def succeeded(self, attempt: Attempt) -> None:
        """The token was right: forget this client's failures and give back the global slot."""
        with self._lock:
            self._clients.pop(attempt.client, None)
            with contextlib.suppress(ValueError):  # unless it has expired already
                self._all.remove(attempt.at)

    def _expire(self, now: float) -> None:
        cutoff = now - self.window
        while self._all and self._all[0] <= cutoff:
            self._all.popleft()
        # Every client entry is also in _all, so this loop is bounded by `overall`.
        for client in list(self._clients):
            times = self._clients[client]
            while times and times[0] <= cutoff:
                times.popleft()
            if not times:
                del self._clients[client]


def client_key(host: str | None) -> str:
    """The throttle's bucket for a client address. An IPv6 host counts as its /64: one machine
    usually holds a whole /64 and could otherwise rotate addresses to dodge the per-client limit."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)  # a dual-stack socket's view of an IPv4 client
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def safe_next(path: str | None) -> str:
    """Where to go after logging in: a path on this site only (no open redirect)."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path
