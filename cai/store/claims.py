"""Leases on claimable rows (judgments, generation items): who holds them, freeing those of a
worker that stopped or died. A worker id is `host:pid:random`, so a dead local holder can be
recognised without waiting for its lease to run out."""

from __future__ import annotations

import os
import random
import socket
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from cai.store.models import utcnow


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{random.randrange(16**6):06x}"


def claim_ids(session: Session, row: Any, worker: str, n: int, lease_s: float, *where: Any) -> list[int]:
    """Lease up to n pending `row` items matching `where` that are unclaimed or whose lease ran
    out, oldest first, to `worker`: one UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP
    LOCKED), so concurrent workers never take the same item."""
    return claim(session, claim_statement(row, *where), worker, n, lease_s)


def claim_statement(row: Any, *where: Any) -> Any:
    """The UPDATE of `claim_ids`, its worker, count and times left as bind parameters: a caller
    that claims often builds it once (building it costs more than running it)."""
    free = (
        select(row.id)
        .where(
            row.status == "pending",
            or_(row.claimed_until.is_(None), row.claimed_until < bindparam("lease_now")),
            *where,
        )
        .order_by(row.id)
        .limit(bindparam("lease_n"))
        .with_for_update(skip_locked=True)
    )
    return (
        update(row)
        .where(row.id.in_(free))
        .values(claimed_by=bindparam("lease_worker"), claimed_until=bindparam("lease_until"))
        .returning(row.id)
    )


def claim(
    session: Session | Connection,
    statement: Any,
    worker: str,
    n: int,
    lease_s: float,
    params: dict[str, Any] | None = None,
) -> list[int]:
    """Run a `claim_statement` (with `params` for the bind parameters of its `where`)."""
    now = utcnow()
    values = {
        "lease_now": now,
        "lease_until": now + timedelta(seconds=lease_s),
        "lease_worker": worker,
        "lease_n": n,
    }
    return list(
        session.scalars(
            statement, values | (params or {}), execution_options={"synchronize_session": False}
        ).all()
    )


def renew(session: Session, row: Any, worker: str, lease_s: float) -> int:
    """Extend the leases of `worker`'s unfinished `row` items: it is alive (a heartbeat).

    Rows another transaction has locked are skipped rather than waited for: they are being
    recorded by this same worker's stage thread, and a heartbeat that waited on them while holding
    locks the recorder wants next deadlocks with it on PostgreSQL. The next beat renews any that
    stay pending."""
    mine = (
        select(row.id)
        .where(row.claimed_by == worker, row.status == "pending")
        .order_by(row.id)
        .with_for_update(skip_locked=True)
    )
    result = session.execute(
        update(row).where(row.id.in_(mine)).values(claimed_until=utcnow() + timedelta(seconds=lease_s)),
        execution_options={"synchronize_session": False},
    )
    return result.rowcount or 0  # type: ignore[attr-defined]


def release(session: Session, row: Any, worker: str) -> int:
    """Give back `worker`'s unfinished `row` items (a clean stop, a job taken over from it).
    Rows are locked in id order, the order every other multi-row writer uses."""
    held = (
        select(row.id)
        .where(row.claimed_by == worker, row.status == "pending")
        .order_by(row.id)
        .with_for_update()
    )
    result = session.execute(
        update(row).where(row.id.in_(held)).values(claimed_by=None, claimed_until=None),
        execution_options={"synchronize_session": False},
    )
    return result.rowcount or 0  # type: ignore[attr-defined]


def release_dead_local(session: Session, row: Any) -> int:
    """Free `row` items held by workers on this host whose process is gone (killed, crashed), so
    a rerun does not wait for their leases to run out."""
    host = socket.gethostname()
    holders = session.scalars(
        select(row.claimed_by).where(row.status == "pending", row.claimed_by.like(f"{host}:%")).distinct()
    ).all()
    dead = [h for h in holders if h and not _alive(int(h.split(":")[1]))]
    return sum(release(session, row, holder) for holder in dead)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def held_by_others(session: Session, row: Any, worker: str, *where: Any) -> tuple[int, int]:
    """Unfinished `row` items (matching `where`) that other workers claimed: (under a live
    lease, under a lapsed one, which any worker may take up)."""
    live = row.claimed_until > utcnow()
    counts = session.execute(
        select(func.count().filter(live), func.count().filter(~live)).where(
            row.status == "pending", row.claimed_by.is_not(None), row.claimed_by != worker, *where
        )
    ).one()
    return int(counts[0]), int(counts[1])
