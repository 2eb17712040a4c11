"""Queries for a round's evaluation: which policies meet, on which held-out prompts, the
head-to-head pairs with their judgments, and the evaluations table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from cai.errors import BadInput
from cai.judge import Verdict
from cai.rules import RuleCheck
from cai.store.labels import rule_check, verdicts_by_principle
from cai.store.models import (
    EvaluationRow,
    JudgmentRow,
    PairRow,
    PolicyRow,
    PromptRow,
    PromptTagRow,
    ResponseRow,
    RoundRow,
    TrainingRunRow,
)
from cai.store.repo import get_round
from cai.store.samples import EVAL_KIND, PromptWork


@dataclass(frozen=True)
class Contestant:
    id: int
    name: str
    model_ref: str


@dataclass(frozen=True)
class Contest:
    """The round's trained policy p_{r+1} (candidate) against its starting policy p_r (baseline)."""

    candidate: Contestant
    baseline: Contestant


def contest(session: Session, round_id: int) -> Contest:
    round_ = get_round(session, round_id)
    trained = session.scalar(
        select(TrainingRunRow.output_policy_id)
        .where(TrainingRunRow.round_id == round_id, TrainingRunRow.status == "done")
        .order_by(TrainingRunRow.id.desc())
        .limit(1)
    )
    if trained is None:
        raise BadInput(f"round {round_id} has no trained policy yet: train it first (the train stage)")

    def contestant(policy_id: int) -> Contestant:
        row = session.get_one(PolicyRow, policy_id)
        return Contestant(row.id, row.name, row.model_ref)

    return Contest(contestant(trained), contestant(round_.policy_id))


def eval_prompts(session: Session, round_id: int, limit: int | None = None) -> list[PromptWork]:
    """The held-out prompts: split 'eval', with the round's tag if it has one."""
    config = session.get_one(RoundRow, round_id).config
    if config.get("split", "train") == "eval":
        raise BadInput(f"round {round_id} trains on the eval split; it has no held-out prompts")
    query = select(PromptRow.id, PromptRow.messages).where(PromptRow.split == "eval")
    if config.get("tag"):
        query = query.where(
            PromptRow.id.in_(select(PromptTagRow.prompt_id).where(PromptTagRow.tag == config["tag"]))
        )
    prompts = [
        PromptWork(pid, messages)
        for pid, messages in session.execute(query.order_by(PromptRow.id).limit(limit))
    ]
    if not prompts:
        raise BadInput(
            "no eval prompts in the store: import a prompt set with an eval split (cai prompts import)"
        )
    return prompts


@dataclass(frozen=True)
class EvalResponse:
    id: int
    prompt_id: int
    sample_index: int
    text: str
    completion_tokens: int | None


def eval_responses(session: Session, round_id: int, policy_id: int) -> list[EvalResponse]:
    rows = session.execute(
        select(
            ResponseRow.id,
            ResponseRow.prompt_id,
            ResponseRow.sample_index,
            ResponseRow.text,
            ResponseRow.completion_tokens,
        )
        .where(
            ResponseRow.round_id == round_id,
            ResponseRow.policy_id == policy_id,
            ResponseRow.origin == EVAL_KIND,
        )
        .order_by(ResponseRow.prompt_id, ResponseRow.sample_index)
    )
    return [EvalResponse(*row) for row in rows]


@dataclass(frozen=True)
class JudgedEvalPair:
    """One head-to-head pair: A is the candidate's response, B the baseline's."""

    pair_id: int
    llm: dict[str, dict[str, Verdict | None]]
    """principle -> order -> verdict of the LLM judgments (None until done, or failed)."""
    llm_failed: bool
    checks: list[RuleCheck]
    length_difference: int = 0
    """Words in the candidate's answer minus words in the baseline's."""


def judged_eval_pairs(
    session: Session, round_id: int, judge_id: int, rules_judge_id: int
) -> list[JudgedEvalPair]:
    a, b = aliased(ResponseRow), aliased(ResponseRow)
    texts = {
        pair_id: (a_text, b_text)
        for pair_id, a_text, b_text in session.execute(
            select(PairRow.id, a.text, b.text)
            .join(a, a.id == PairRow.response_a_id)
            .join(b, b.id == PairRow.response_b_id)
            .where(PairRow.round_id == round_id, PairRow.kind == EVAL_KIND)
            .order_by(PairRow.id)
        )
    }
    pair_ids = list(texts)
    by_pair: dict[int, list[JudgmentRow]] = {pid: [] for pid in pair_ids}
    for row in session.scalars(
        select(JudgmentRow).where(
            JudgmentRow.pair_id.in_(pair_ids), JudgmentRow.judge_id.in_([judge_id, rules_judge_id])
        )
    ):
        if row.pair_id is not None:
            by_pair[row.pair_id].append(row)
    pairs = []
    for pair_id, rows in by_pair.items():
        llm = [r for r in rows if r.judge_id == judge_id]
        pairs.append(
            JudgedEvalPair(
                pair_id,
                verdicts_by_principle(llm),
                any(r.status == "failed" for r in llm),
                [rule_check(r) for r in rows if r.judge_id == rules_judge_id],
                len(texts[pair_id][0].split()) - len(texts[pair_id][1].split()),
            )
        )
    return pairs


def save_evaluation(
    session: Session,
    round_id: int,
    contest: Contest,
    judge_id: int,
    prompts: int,
    wins: int,
    ties: int,
    losses: int,
    metrics: dict[str, Any],
) -> int:
    """Insert or refresh the round's evaluation row; returns its id."""
    row = session.scalar(
        select(EvaluationRow).where(
            EvaluationRow.round_id == round_id,
            EvaluationRow.candidate_policy_id == contest.candidate.id,
            EvaluationRow.baseline_policy_id == contest.baseline.id,
            EvaluationRow.judge_id == judge_id,
        )
    )
    if row is None:
        row = EvaluationRow(
            round_id=round_id,
            candidate_policy_id=contest.candidate.id,
            baseline_policy_id=contest.baseline.id,
            judge_id=judge_id,
        )
        session.add(row)
    row.prompts, row.wins, row.ties, row.losses, row.metrics = prompts, wins, ties, losses, metrics
    session.flush()
    return row.id


@dataclass(frozen=True)
class EvaluationRecord:
    id: int
    round_id: int
    candidate: str
    baseline: str
    prompts: int
    wins: int
    ties: int
    losses: int
    metrics: dict[str, Any]

    @property
    def win_rate(self) -> float:
        return self.wins / self.prompts if self.prompts else 0.0


def latest_evaluation(session: Session, round_id: int) -> EvaluationRecord | None:
    row = session.scalar(
        select(EvaluationRow)
        .where(EvaluationRow.round_id == round_id)
        .order_by(EvaluationRow.id.desc())
        .limit(1)
    )
    if row is None:
        return None
    names = dict(
        session.execute(
            select(PolicyRow.id, PolicyRow.name).where(
                PolicyRow.id.in_([row.candidate_policy_id, row.baseline_policy_id])
            )
        ).all()
    )
    return EvaluationRecord(
        row.id,
        row.round_id,
        names[row.candidate_policy_id],
        names[row.baseline_policy_id],
        row.prompts,
        row.wins,
        row.ties,
        row.losses,
        row.metrics,
    )
