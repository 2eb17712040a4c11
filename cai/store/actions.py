"""The log of writes and who made them: one row per constitution registered, prompt file
imported, round started, job submitted or cancelled, queue assigned, token created or revoked,
written in the same transaction as the write itself, so a refused write leaves no entry."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cai.store.models import ActionRow


@dataclass(frozen=True)
class ActionRecord:
    id: int
    actor: str
    verb: str
    subject: str
    detail: dict[str, Any]
    created_at: datetime


def record(session: Session, actor: str, verb: str, subject: str, **detail: Any) -> None:
    session.add(ActionRow(actor=actor[:200], verb=verb, subject=subject[:200], detail=detail))
    session.flush()


def list_actions(
    session: Session, actor: str | None = None, limit: int = 50, before: int | None = None
) -> list[ActionRecord]:
    """Newest first; `before` is a cursor (the last id of the page before)."""
    query = select(ActionRow).order_by(ActionRow.id.desc()).limit(limit)
    if actor is not None:
        query = query.where(ActionRow.actor == actor)
    if before is not None:
        query = query.where(ActionRow.id < before)
    return [
        ActionRecord(row.id, row.actor, row.verb, row.subject, row.detail, row.created_at)
        for row in session.scalars(query)
    ]
