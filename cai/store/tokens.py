"""Named API tokens: create (the plaintext is returned once, only its SHA-256 is stored), look
up a presented token, list, revoke. A token is 'cai_' and 43 URL-safe characters (32 random
bytes), so it is recognisable in a leaked log and out of reach of guessing."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cai.auth import Actor, Role
from cai.errors import BadInput, Conflict
from cai.store.models import ApiTokenRow, utcnow

PREFIX = "cai_"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    """A stored token as `cai token list` shows it: never the token itself."""

    name: str
    role: str
    created_at: datetime
    created_by: str | None
    last_used_at: datetime | None
    revoked_at: datetime | None


def create(session: Session, name: str, role: Role, created_by: str | None = None) -> str:
    """Store a new token for `name` and return its plaintext, which is not kept anywhere."""
    if not NAME.fullmatch(name):
        raise BadInput(
            f"name: {name!r} is not a token name: 1 to 64 letters, digits and . _ @ -, "
            "starting with a letter or digit"
        )
    if session.scalar(select(ApiTokenRow.id).where(ApiTokenRow.name == name)) is not None:
        raise Conflict(f"name: a token named {name!r} exists already (revoked ones keep their name)")
    token = PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiTokenRow(name=name, role=role.label, token_sha256=token_sha256(token), created_by=created_by)
    )
    session.flush()
    return token


def authenticate(session: Session, token: str) -> Actor | None:
    """The actor a presented token stands for, or None for an unknown or revoked one. The lookup
    is by the token's hash, so timing reveals nothing about stored tokens."""
    row = session.scalar(select(ApiTokenRow).where(ApiTokenRow.token_sha256 == token_sha256(token)))
    if row is None or row.revoked_at is not None:
        return None
    row.last_used_at = utcnow()
    return Actor(row.name, Role.parse(row.role))


def active_actor(session: Session, name: str) -> Actor | None:
    """The holder of the token named `name`, unless it is revoked or unknown."""
    row = session.scalar(
        select(ApiTokenRow).where(ApiTokenRow.name == name, ApiTokenRow.revoked_at.is_(None))
    )
    return Actor(row.name, Role.parse(row.role)) if row is not None else None


def any_active(session: Session) -> bool:
    return session.scalar(select(ApiTokenRow.id).where(ApiTokenRow.revoked_at.is_(None)).limit(1)) is not None


def revoke(session: Session, name: str) -> bool:
    """Revoke the token named `name`; False when there is none, or it was revoked already."""
    result = session.execute(
        update(ApiTokenRow)
        .where(ApiTokenRow.name == name, ApiTokenRow.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def list_tokens(session: Session) -> list[TokenInfo]:
    rows = session.scalars(select(ApiTokenRow).order_by(ApiTokenRow.id))
    return [TokenInfo(r.name, r.role, r.created_at, r.created_by, r.last_used_at, r.revoked_at) for r in rows]
