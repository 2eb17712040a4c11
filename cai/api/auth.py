"""Bearer-token authentication and role checks for the API.

A request names its token in `Authorization: Bearer <token>`. Tokens made by `cai token create`
are looked up by hash; `CAI_WEB_TOKEN`, when the server has one, is a bootstrap admin token
compared in constant time. Failed attempts are throttled per client address and overall
(cai.web.security.LoginThrottle), before any lookup, so guessing is slow whatever the store."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Depends, Request
from sqlalchemy import Engine
from starlette.exceptions import HTTPException

from cai.auth import BOOTSTRAP_ACTOR, Actor, Role
from cai.web.security import LoginThrottle


@dataclass(frozen=True)
class ApiAuth:
    engine: Engine
    bootstrap_token: str | None
    throttle: LoginThrottle

    def actor(self, token: str) -> Actor | None:
        from cai.store import tokens
        from cai.store.db import session_scope

        if self.bootstrap_token and hmac.compare_digest(token.encode(), self.bootstrap_token.encode()):
            return Actor(BOOTSTRAP_ACTOR, Role.ADMIN)
        with session_scope(self.engine) as session:
            return tokens.authenticate(session, token)


def _unauthorized(detail: str, retry_after: int | None = None) -> HTTPException:
    headers = {"WWW-Authenticate": 'Bearer realm="cai"'}
    if retry_after is not None:
        return HTTPException(429, detail, headers={**headers, "Retry-After": str(retry_after)})
    return HTTPException(401, detail, headers=headers)


def current_actor(request: Request) -> Actor:
    """The request's actor; 401 without a valid token, 429 while its client is throttled."""
    auth: ApiAuth = request.app.state.auth
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("send a token as `Authorization: Bearer <token>` (see `cai token create`)")
    client = request.client.host if request.client else "unknown"
    attempt = auth.throttle.attempt(client)
    if not attempt.allowed:
        raise _unauthorized("too many failed attempts; try again later", attempt.retry_after)
    actor = auth.actor(token.strip())
    if actor is None:
        raise _unauthorized("unknown or revoked token")
    auth.throttle.succeeded(attempt)
    return actor


def requires(role: Role) -> Callable[..., Actor]:
    """A dependency that admits actors holding `role` or a higher one, and answers 403 otherwise."""

    def check(actor: Actor = Depends(current_actor)) -> Actor:
        if not actor.role.allows(role):
            raise HTTPException(403, f"this needs the {role.label} role; {actor.name} is {actor.role.label}")
        return actor

    return check
