"""Token usage already recorded, as history for estimates: how long a judge's or a policy's
replies have been, from the completion tokens its servers (or the in-process model) reported."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cai.store.models import JudgeRow, JudgmentRow, ResponseRow

TEXT_SAMPLE = 500
"""Stored answers counted at most, when a policy's replies have texts but no token counts."""


@dataclass(frozen=True)
class History:
    mean_completion_tokens: float
    requests: int
    whose: str
    """Whose requests they were, for the user ('this judge', 'this policy'...)."""


def judge_history(session: Session, judge_id: int) -> History | None:
    """Mean completion tokens of this judge's answered requests (all rounds); else of the same
    model in the same mode under another identity (template, parameters); None without any."""
    judge = session.get_one(JudgeRow, judge_id)
    same_model = select(JudgeRow.id).where(JudgeRow.model == judge.model, JudgeRow.mode == judge.mode)
    for judges, whose in (
        (select(JudgeRow.id).where(JudgeRow.id == judge_id), "this judge"),
        (same_model, f"{judge.model} in {judge.mode} mode, under other judge settings"),
    ):
        count, mean = session.execute(
            select(func.count(), func.avg(JudgmentRow.completion_tokens)).where(
                JudgmentRow.judge_id.in_(judges),
                JudgmentRow.status == "ok",
                JudgmentRow.completion_tokens > 0,
            )
        ).one()
        if count:
            return History(float(mean), count, whose)
    return None


def policy_history(session: Session, policy_id: int) -> History | None:
    """Mean completion tokens of this policy's stored samples (all rounds), where they were
    reported per sample (a server answering several samples in one request reports them
    together); None without any."""
    count, mean = session.execute(
        select(func.count(), func.avg(ResponseRow.completion_tokens)).where(
            ResponseRow.policy_id == policy_id,
            ResponseRow.origin == "sample",
            ResponseRow.completion_tokens > 0,
        )
    ).one()
    return History(float(mean), count, "this policy") if count else None


def policy_texts(session: Session, policy_id: int) -> list[str]:
    """The texts of this policy's latest stored samples (at most TEXT_SAMPLE), to count when no
    token counts were stored."""
    return list(
        session.scalars(
            select(ResponseRow.text)
            .where(ResponseRow.policy_id == policy_id, ResponseRow.origin == "sample")
            .order_by(ResponseRow.id.desc())
            .limit(TEXT_SAMPLE)
        )
    )
