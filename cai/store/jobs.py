"""Queries for the job queue: submit, claim (taking over dead workers' jobs), heartbeat, log, finish, cancel."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, func, insert, or_, select, update
from sqlalchemy.orm import Session

from cai.errors import BadInput, NotFound
from cai.store.models import JOB_KINDS, JobRow, utcnow

LOG_TAIL_CHARS = 16_000
"""How much of a job's log the store keeps: the last characters, cut at a line start."""
SHAREABLE_KINDS = ("generate", "judge")
"""Several workers may work one job of these kinds at once (their items are claimed one by one)."""
FINISHED_STATUSES = ("succeeded", "failed", "cancelled")

_JOBS = JobRow.__table__
_COLUMNS = tuple(_JOBS.c)
_NO_SYNC = {"synchronize_session": False}


@dataclass(frozen=True)
class JobRecord:
    id: int
    kind: str
    round_id: int | None
    settings: dict[str, Any]
    status: str
    attempts: int
    owner: str | None
    heartbeat_at: datetime | None
    progress: dict[str, Any]
    log: str
    error: str | None
    result: dict[str, Any] | None
    requested_by: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES


@dataclass(frozen=True)
class Beat:
    owned: bool
    """The worker still holds the job; False means another worker took it over (or it ended)."""
    cancel_requested: bool


def _record(row: Row[Any]) -> JobRecord:
    values = dict(row._mapping)
    return JobRecord(**values)


def _stale(stale_after_s: float) -> Any:
    """The heartbeat is older than stale_after_s (or missing): its owner is presumed dead."""
    # Bound as a datetime on both databases: SQLite stores and compares the same UTC text form.
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    return or_(JobRow.heartbeat_at.is_(None), JobRow.heartbeat_at < cutoff)


def submit(
    session: Session,
    kind: str,
    round_id: int | None,
    settings: dict[str, Any],
    requested_by: str | None = None,
) -> JobRecord:
    """Queue a job; a worker that handles `kind` picks it up."""
    if kind not in JOB_KINDS:
        raise BadInput(f"unknown job kind {kind!r}; one of {', '.join(JOB_KINDS)}")
    row = session.execute(
        insert(JobRow)
        .values(kind=kind, round_id=round_id, settings=settings, requested_by=requested_by)
        .returning(*_COLUMNS)
    ).one()
    return _record(row)


def get_job(session: Session, job_id: int) -> JobRecord:
    row = session.execute(select(*_COLUMNS).where(JobRow.id == job_id)).one_or_none()
    if row is None:
        raise NotFound(f"job {job_id} does not exist")
    return _record(row)


def list_jobs(
    session: Session,
    status: str | None = None,
    kind: str | None = None,
    round_id: int | None = None,
    limit: int = 50,
    before: int | None = None,
) -> list[JobRecord]:
    """Jobs newest first, optionally filtered; at most `limit`, with ids below `before` (the last
    id of the page before, for paging)."""
    query = select(*_COLUMNS)
    if before is not None:
        query = query.where(JobRow.id < before)
    if status is not None:
        query = query.where(JobRow.status == status)
    if kind is not None:
        query = query.where(JobRow.kind == kind)
    if round_id is not None:
        query = query.where(JobRow.round_id == round_id)
    rows = session.execute(query.order_by(JobRow.id.desc()).limit(limit))
    return [_record(row) for row in rows]


def claim_job(
    session: Session, worker: str, kinds: Sequence[str], stale_after_s: float
) -> tuple[JobRecord, str | None] | None:
    """Take the oldest job of one of `kinds` that is queued, or running with a heartbeat older
    than stale_after_s (its owner died). Returns the job, now running and owned by `worker`, and
    the previous owner when it was taken over; None when there is nothing to take. A job whose
    cancel was requested is marked cancelled instead of handed out."""
    while True:
        now = utcnow()
        # The row lock (PostgreSQL; SKIP LOCKED lets concurrent workers pass each other) or the
        # write lock (SQLite, BEGIN IMMEDIATE) holds from this read to the commit, so the update
        # below cannot race. The read is separate because RETURNING only sees the new owner.
        candidate = session.execute(
            select(JobRow.id, JobRow.status, JobRow.owner, JobRow.cancel_requested)
            .where(
                JobRow.kind.in_(kinds),
                or_(
                    JobRow.status == "queued",
                    (JobRow.status == "running") & _stale(stale_after_s),
                ),
            )
            .order_by(JobRow.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).one_or_none()
        if candidate is None:
            return None
        job_id, status, previous, cancel_requested = candidate
        if cancel_requested:
            session.execute(
                update(JobRow)
                .where(JobRow.id == job_id)
                .values(status="cancelled", finished_at=now, updated_at=now),
                execution_options=_NO_SYNC,
            )
            continue
        row = session.execute(
            update(JobRow)
            .where(JobRow.id == job_id)
            .values(
                status="running",
                owner=worker,
                heartbeat_at=now,
                attempts=JobRow.attempts + 1,
                started_at=func.coalesce(JobRow.started_at, now),
                updated_at=now,
            )
            .returning(*_COLUMNS),
            execution_options=_NO_SYNC,
        ).one()
        return _record(row), previous if status == "running" else None


def joinable_job(
    session: Session, kinds: Sequence[str], exclude: Collection[int], stale_after_s: float
) -> JobRecord | None:
    """The oldest running job of a shareable kind in `kinds` whose owner is alive and which is
    not being cancelled: another worker may help with it. Reads only; the owner stays."""
    shareable = [kind for kind in kinds if kind in SHAREABLE_KINDS]
    if not shareable:
        return None
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    query = select(*_COLUMNS).where(
        JobRow.kind.in_(shareable),
        JobRow.status == "running",
        JobRow.heartbeat_at >= cutoff,
        JobRow.cancel_requested.is_(False),
    )
    if exclude:
        query = query.where(JobRow.id.not_in(list(exclude)))
    row = session.execute(query.order_by(JobRow.id).limit(1)).one_or_none()
    return None if row is None else _record(row)


def heartbeat(session: Session, job_id: int, worker: str, progress: dict[str, Any] | None = None) -> Beat:
    """Keep `worker`'s hold on a running job fresh, replacing its progress when given. Says
    whether the worker still owns the job and whether its cancel was requested."""
    now = utcnow()
    values: dict[str, Any] = {"heartbeat_at": now, "updated_at": now}
    if progress is not None:
        values["progress"] = progress
    owned = session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, JobRow.owner == worker, JobRow.status == "running")
        .values(**values)
        .returning(JobRow.cancel_requested),
        execution_options=_NO_SYNC,
    ).one_or_none()
    if owned is not None:
        return Beat(owned=True, cancel_requested=bool(owned[0]))
    cancel = session.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id))
    return Beat(owned=False, cancel_requested=bool(cancel))


def append_log(session: Session, job_id: int, lines: Sequence[str]) -> None:
    """Append lines to the job's log, keeping the last LOG_TAIL_CHARS characters (from a line start)."""
    if not lines:
        return
    # FOR UPDATE: workers sharing a job append in turn instead of overwriting each other.
    log = session.scalar(select(JobRow.log).where(JobRow.id == job_id).with_for_update())
    if log is None:
        raise NotFound(f"job {job_id} does not exist")
    combined = (log + "\n" if log else "") + "\n".join(lines)
    session.execute(
        update(JobRow).where(JobRow.id == job_id).values(log=_tail(combined), updated_at=utcnow()),
        execution_options=_NO_SYNC,
    )


def _tail(text: str) -> str:
    if len(text) <= LOG_TAIL_CHARS:
        return text
    tail = text[-LOG_TAIL_CHARS:]
    if text[-LOG_TAIL_CHARS - 1] == "\n":
        return tail
    cut = tail.find("\n")
    # A single line longer than the whole tail keeps its end.
    return tail if cut < 0 else tail[cut + 1 :]


def finish_job(
    session: Session,
    job_id: int,
    worker: str,
    status: str,
    error: str | None = None,
    result: dict[str, Any] | None = None,
) -> bool:
    """Record the end of a job `worker` owns (the owner stays, for the record). False when the
    worker lost the job to another (its heartbeat went stale), and nothing is changed."""
    if status not in FINISHED_STATUSES:
        raise ValueError(f"a job finishes as one of {', '.join(FINISHED_STATUSES)}, not {status!r}")
    now = utcnow()
    done = session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, JobRow.owner == worker, JobRow.status == "running")
        .values(status=status, error=error, result=result, finished_at=now, updated_at=now)
        .returning(JobRow.id),
        execution_options=_NO_SYNC,
    ).one_or_none()
    return done is not None


def release_job(session: Session, job_id: int, worker: str) -> bool:
    """Give back a job `worker` owns when it stops early: queued again for the next worker.
    False when it no longer owned the job."""
    released = session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, JobRow.owner == worker, JobRow.status == "running")
        .values(status="queued", owner=None, heartbeat_at=None, updated_at=utcnow())
        .returning(JobRow.id),
        execution_options=_NO_SYNC,
    ).one_or_none()
    return released is not None


def request_cancel(session: Session, job_id: int) -> JobRecord:
    """Cancel a job: a queued one at once; a running one is flagged and its worker stops at its
    next batch boundary. A finished job cannot be cancelled."""
    now = utcnow()
    row = session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, JobRow.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
        .returning(*_COLUMNS),
        execution_options=_NO_SYNC,
    ).one_or_none()
    if row is None:
        row = session.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.status == "running")
            .values(cancel_requested=True, updated_at=now)
            .returning(*_COLUMNS),
            execution_options=_NO_SYNC,
        ).one_or_none()
    if row is not None:
        return _record(row)
    job = get_job(session, job_id)
    raise BadInput(f"job {job_id} already {job.status}")
