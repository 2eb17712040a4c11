"""Judge batches (`cai judge --batch`): one row per Batch API job, from before its upload to the
ingest of its output. See JudgeBatchRow."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from cai.store.models import JudgeBatchRow


def open_batch(session: Session, round_id: int, judge_id: int, phase: str) -> JudgeBatchRow | None:
    """The phase's batch that is not ingested yet, if any: a rerun resumes it."""
    return session.scalar(
        select(JudgeBatchRow)
        .where(
            JudgeBatchRow.round_id == round_id,
            JudgeBatchRow.judge_id == judge_id,
            JudgeBatchRow.phase == phase,
            JudgeBatchRow.status != "ingested",
        )
        .order_by(JudgeBatchRow.id)
        .limit(1)
    )


def start_batch(session: Session, round_id: int, judge_id: int, phase: str, base_url: str) -> JudgeBatchRow:
    """A new batch row, before anything is claimed or uploaded (its id names its worker)."""
    row = JudgeBatchRow(
        round_id=round_id,
        judge_id=judge_id,
        phase=phase,
        base_url=base_url,
        status="submitting",
        requests=0,
        answered=0,
        failed=0,
        released=0,
    )
    session.add(row)
    session.flush()
    return row
