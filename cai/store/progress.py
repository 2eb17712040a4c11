"""Queries for `cai loop`: the chain of rounds (each trained from the previous round's policy) and
the one-line-per-round summary of what each round produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session

from cai.errors import BadInput
from cai.labelling import flip_rate
from cai.store import repo
from cai.store.evaluation import contest, latest_evaluation
from cai.store.labels import asked_pairs
from cai.store.models import (
    JudgmentRow,
    LabelRow,
    PairRow,
    ResponseRow,
    RoundRow,
    SnapshotRow,
    TrainingRunRow,
    TrainingStepRow,
)
from cai.store.samples import EVAL_KIND


def latest_first_round(session: Session) -> int | None:
    """The newest round that does not continue another one: where a chain starts."""
    return session.scalar(
        select(RoundRow.id).where(RoundRow.parent_round_id.is_(None)).order_by(RoundRow.id.desc()).limit(1)
    )


def next_round(session: Session, round_id: int) -> int | None:
    """The round that continues `round_id` (started from its trained policy), if any."""
    return session.scalar(
        select(RoundRow.id).where(RoundRow.parent_round_id == round_id).order_by(RoundRow.id).limit(1)
    )


def supervised_round_before(session: Session, round_id: int) -> int:
    """The SL round that precedes preference round `round_id` (`cai loop --sl-first`): the one it
    already continues, or a new one over the same constitution, policy and prompts, which the
    round is then made to continue. Only a round that has not started can be given one: its
    policy is replaced by the SFT model when the SL round finishes."""
    current = repo.get_round(session, round_id)
    if current.parent_round_id is not None:
        parent = repo.get_round(session, current.parent_round_id)
        if parent.kind == "sl":
            return parent.id
    if current.parent_round_id is not None or not _unstarted(session, round_id):
        raise BadInput(
            f"round {round_id} has started (or continues round {current.parent_round_id}), so no SL round "
            "can precede it; start a fresh round for --sl-first, or an SL round itself (cai round start --sl)"
        )
    name, version = current.constitution.split("@")
    constitution = repo.get_constitution(session, name, int(version)).record
    policy = repo.get_policy(session, current.policy)
    supervised = repo.create_round(session, constitution, policy, current.config, kind="sl").id
    session.execute(update(RoundRow).where(RoundRow.id == round_id).values(parent_round_id=supervised))
    return supervised


def follow_trained_policy(session: Session, round_id: int, previous_id: int) -> None:
    """Point a round made before its predecessor trained (by --sl-first) at that trained policy,
    while it has not started; a started round keeps the policy it sampled from."""
    trained = contest(session, previous_id).candidate
    current = repo.get_round(session, round_id)
    if current.policy_id != trained.id and _unstarted(session, round_id):
        session.execute(update(RoundRow).where(RoundRow.id == round_id).values(policy_id=trained.id))


def _unstarted(session: Session, round_id: int) -> bool:
    """Nothing sampled for the round yet, and its status still `created`."""
    status = repo.round_status(session, round_id)[0]
    responses = session.scalar(select(func.count()).where(ResponseRow.round_id == round_id))
    return status == "created" and not responses


def start_next_round(session: Session, round_id: int) -> int:
    """Start the round after `round_id`: same constitution and prompts, its trained policy, the
    next seed (fresh samples)."""
    current = repo.get_round(session, round_id)
    trained = contest(session, round_id).candidate
    name, version = current.constitution.split("@")
    constitution = repo.get_constitution(session, name, int(version)).record
    policy = repo.get_policy(session, trained.name)
    config = current.config | {"seed": int(current.config.get("seed", 0)) + 1}
    # Always a preference round: an SL round is run once, at the start of a chain.
    return repo.create_round(session, constitution, policy, config, parent_round_id=round_id, kind="rl").id


@dataclass(frozen=True)
class RoundSummary:
    round_id: int
    status: str
    kind: str
    policy: str
    pairs: int
    labels: int
    ties: int
    judge_asked: int
    """Labeled pairs the LLM judge saw (rules-first leaves out those the rules decided)."""
    inconsistent: int
    label_sources: dict[str, int] = field(default_factory=dict)
    """Of the exported pairs: how many labels came from rules, the judge, humans."""
    train_reward_accuracy: float | None = None
    train_reward_margin: float | None = None
    win_rate: float | None = None
    wins_ties_losses: tuple[int, int, int] | None = None
    mean_words: tuple[float | None, float | None] | None = None
    """(baseline, candidate) on the eval prompts."""
    all_rules_pass: tuple[float | None, float | None] | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each stage this run of the loop did (none for stages an earlier run finished)."""

    @property
    def flip_rate(self) -> float | None:
        return flip_rate(self.inconsistent, self.judge_asked)


def round_summary(session: Session, round_id: int) -> RoundSummary:
    round_ = repo.get_round(session, round_id)
    pair_ids = select(PairRow.id).where(PairRow.round_id == round_id, PairRow.kind != EVAL_KIND)
    labels = select(LabelRow).where(LabelRow.pair_id.in_(pair_ids), LabelRow.source == "judge").subquery()
    asked = asked_pairs(JudgmentRow.pair_id.in_(pair_ids))

    def count(query: Select[Any]) -> int:
        return session.scalar(query) or 0

    snapshot_counts = session.scalar(
        select(SnapshotRow.counts)
        .where(SnapshotRow.round_id == round_id)
        .order_by(SnapshotRow.id.desc())
        .limit(1)
    )
    last_step = _last_training_step(session, round_id)
    evaluation = latest_evaluation(session, round_id)
    baseline = evaluation.metrics["baseline"] if evaluation else {}
    candidate = evaluation.metrics["candidate"] if evaluation else {}
    return RoundSummary(
        round_id=round_id,
        status=round_.status,
        kind=round_.kind,
        policy=round_.policy,
        pairs=count(select(func.count()).select_from(pair_ids.subquery())),
        labels=count(select(func.count()).select_from(labels)),
        ties=count(select(func.count()).select_from(labels).where(labels.c.verdict == "tie")),
        judge_asked=count(select(func.count()).select_from(labels).where(labels.c.pair_id.in_(asked))),
        inconsistent=count(select(func.count()).select_from(labels).where(labels.c.inconsistent.is_(True))),
        label_sources=dict((snapshot_counts or {}).get("by_source", {})),
        train_reward_accuracy=last_step.get("rewards/accuracies"),
        train_reward_margin=last_step.get("rewards/margins"),
        win_rate=evaluation.win_rate if evaluation else None,
        wins_ties_losses=(evaluation.wins, evaluation.ties, evaluation.losses) if evaluation else None,
        mean_words=(baseline.get("mean_words"), candidate.get("mean_words")) if evaluation else None,
        all_rules_pass=(
            (baseline.get("all_rules_pass_rate"), candidate.get("all_rules_pass_rate"))
            if evaluation
            else None
        ),
    )


def _last_training_step(session: Session, round_id: int) -> dict[str, float]:
    """The last logged training metrics (not the final eval) of the round's finished run."""
    run_id = session.scalar(
        select(TrainingRunRow.id)
        .where(TrainingRunRow.round_id == round_id, TrainingRunRow.status == "done")
        .order_by(TrainingRunRow.id.desc())
        .limit(1)
    )
    if run_id is None:
        return {}
    for (metrics,) in session.execute(
        select(TrainingStepRow.metrics)
        .where(TrainingStepRow.training_run_id == run_id)
        .order_by(TrainingStepRow.step.desc())
    ):
        if "rewards/accuracies" in metrics:
            return metrics
    return {}
