"""Who may write, and proof that a POST came from one of our own pages.

Every browser gets a random session id in an HttpOnly, SameSite=Strict cookie. Forms carry a
CSRF token, an HMAC of that id under a key that never leaves the server, so a page elsewhere can
neither read nor compute it. Logging in (the `CAI_WEB_TOKEN` value, compared in constant time)
issues a fresh session id and a second cookie holding another HMAC of it; nothing is stored on
the server, and a restart (a new key) logs everyone out."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

SESSION_COOKIE = "cai_session"
AUTH_COOKIE = "cai_auth"
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{32,64}")


def new_session_id() -> str:
    return secrets.token_urlsafe(32)


def valid_session_id(value: str | None) -> bool:
    return value is not None and _SESSION_ID.fullmatch(value) is not None


@dataclass(frozen=True)
class Guard:
    token: str | None
    """The write token; None makes the whole UI read-only."""
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    @property
    def writable(self) -> bool:
        return self.token is not None

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

    def auth_value(self, session_id: str) -> str:
        return self._sign("auth", session_id)

    def logged_in(self, session_id: str | None, cookie: str | None) -> bool:
        if not self.writable or session_id is None or not cookie or not valid_session_id(session_id):
            return False
        return hmac.compare_digest(cookie.encode(), self.auth_value(session_id).encode())

    def _sign(self, purpose: str, session_id: str) -> str:
        # The purpose prefix keeps a CSRF token from ever doubling as an auth cookie.
        return hmac.new(self.key, f"{purpose}:{session_id}".encode(), hashlib.sha256).hexdigest()


def safe_next(path: str | None) -> str:
    """Where to go after logging in: a path on this site only (no open redirect)."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path
