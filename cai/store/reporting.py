"""Queries for the round report: per round, what its samples look like, how the judge labelled
them per principle, how training went and how the trained policy did against the previous one.
Everything comes back as plain dataclasses so the CLI report and the web dashboard share them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session, aliased

from cai.labelling import flip_rate
from cai.store import repo
from cai.store.evaluation import latest_evaluation
from cai.store.labels import asked_pairs
from cai.store.models import (
    JudgmentRow,
    LabelRow,
    PairRow,
    PrincipleRow,
    ResponseRow,
    RoundRow,
    TrainingRunRow,
)
from cai.store.training import training_steps

RULES_ONLY = "(rules only)"
"""Stands in for the principle of labels that no LLM judgment backs (rule-only constitutions)."""
ACCURACY_KEY = "rewards/accuracies"
MARGIN_KEY = "rewards/margins"


@dataclass(frozen=True)
class PrincipleStats:
    principle: str
    labeled: int
    ties: int
    flips: int
    """Labels whose two orders picked opposite winners (position bias)."""
    asked: int = 0
    """Labels of pairs the LLM judge was asked about (not decided by rules alone)."""
    longer: int = 0
    """Decisive labels that chose the longer response (in characters)."""
    length_decided: int = 0
    """Decisive labels on pairs of unequal length."""

    @property
    def tie_rate(self) -> float | None:
        return self.ties / self.labeled if self.labeled else None

    @property
    def longer_won(self) -> float | None:
        """How often the label chose the longer response: 0.5 is no length preference."""
        return self.longer / self.length_decided if self.length_decided else None

    @property
    def flip_rate(self) -> float | None:
        return flip_rate(self.flips, self.asked)


@dataclass(frozen=True)
class TrainingCurve:
    run_id: int
    status: str
    steps: int
    accuracy: list[tuple[int, float]]
    margin: list[tuple[int, float]]


@dataclass(frozen=True)
class PolicyEval:
    """One side of an evaluation, as the evaluation's metrics describe it."""

    policy: str
    mean_words: float | None
    rule_pass_rate: dict[str, float]
    all_rules_pass_rate: float | None


@dataclass(frozen=True)
class EvaluationSummary:
    id: int
    prompts: int
    wins: int
    ties: int
    losses: int
    candidate: PolicyEval
    baseline: PolicyEval
    samples_per_prompt: int | None
    judge_only: dict[str, int]

    @property
    def rule_keys(self) -> list[str]:
        return sorted(self.candidate.rule_pass_rate.keys() | self.baseline.rule_pass_rate.keys())

    @property
    def win_rate(self) -> float | None:
        return self.wins / self.prompts if self.prompts else None

    @property
    def tie_rate(self) -> float | None:
        return self.ties / self.prompts if self.prompts else None

    @property
    def loss_rate(self) -> float | None:
        return self.losses / self.prompts if self.prompts else None


@dataclass(frozen=True)
class RoundReport:
    id: int
    status: str
    constitution: str
    policy: str
    samples: int
    mean_words: float | None
    """Mean words of the round's own samples, i.e. of the policy it sampled from."""
    principles: list[PrincipleStats]
    sample_rule_pass_rate: dict[str, float]
    training: TrainingCurve | None
    evaluation: EvaluationSummary | None

    @property
    def labeled(self) -> int:
        return sum(p.labeled for p in self.principles)

    @property
    def overall(self) -> PrincipleStats:
        return pool("all principles", self.principles)


@dataclass(frozen=True)
class ReportData:
    rounds: list[RoundReport]
    """History: every round, or every round up to the one asked for."""
    focus: int | None = None
    """The round asked for; None for a report over all rounds."""
    principle_totals: list[PrincipleStats] = field(default_factory=list)
    """Per-principle counts pooled over the shown rounds."""

    @property
    def shown(self) -> list[RoundReport]:
        return [r for r in self.rounds if self.focus is None or r.id == self.focus]


def pool(name: str, stats: list[PrincipleStats]) -> PrincipleStats:
    return PrincipleStats(
        name,
        sum(s.labeled for s in stats),
        sum(s.ties for s in stats),
        sum(s.flips for s in stats),
        sum(s.asked for s in stats),
        sum(s.longer for s in stats),
        sum(s.length_decided for s in stats),
    )


def gather_report(session: Session, round_id: int | None = None) -> ReportData:
    """All rounds, or the round `round_id` with the rounds before it as history. An unknown
    round raises NotFound."""
    if round_id is not None:
        repo.get_round(session, round_id)
    records = [r for r in repo.list_rounds(session) if round_id is None or r.id <= round_id]
    ids = [r.id for r in records]
    principles = _principle_stats(session, ids)
    words = _sample_words(session, ids)
    rule_rates = _sample_rule_pass_rates(session, ids)
    rounds = []
    for record in records:
        samples, mean_words = words.get(record.id, (0, None))
        rounds.append(
            RoundReport(
                id=record.id,
                status=record.status,
                constitution=record.constitution,
                policy=record.policy,
                samples=samples,
                mean_words=mean_words,
                principles=principles.get(record.id, []),
                sample_rule_pass_rate=rule_rates.get(record.id, {}),
                training=_training(session, record.id),
                evaluation=_evaluation(session, record.id),
            )
        )
    totals: dict[str, list[PrincipleStats]] = {}
    for shown in rounds:
        if round_id is None or shown.id == round_id:
            for stats in shown.principles:
                totals.setdefault(stats.principle, []).append(stats)
    return ReportData(rounds, round_id, [pool(name, stats) for name, stats in sorted(totals.items())])


def _principle_stats(session: Session, round_ids: list[int]) -> dict[int, list[PrincipleStats]]:
    """Judge labels of training pairs (eval pairs are the evaluation's business), each under the
    principle its LLM judgment used. The judge's 'AB' judgment names it: one per pair and judge."""
    key = func.coalesce(PrincipleRow.key, RULES_ONLY)
    chosen, rejected = aliased(ResponseRow), aliased(ResponseRow)
    chosen_length, rejected_length = func.length(chosen.text), func.length(rejected.text)
    rows = session.execute(
        select(
            PairRow.round_id,
            key,
            func.count(),
            func.sum(case((LabelRow.verdict == "tie", 1), else_=0)),
            func.sum(case((LabelRow.inconsistent.is_(True), 1), else_=0)),
            func.sum(case((LabelRow.pair_id.in_(asked_pairs()), 1), else_=0)),
            func.sum(case((chosen_length > rejected_length, 1), else_=0)),
            func.sum(case((chosen_length != rejected_length, 1), else_=0)),
        )
        .select_from(LabelRow)
        .join(PairRow, PairRow.id == LabelRow.pair_id)
        # Ties have neither: their lengths are NULL, and NULL comparisons count as no.
        .outerjoin(chosen, chosen.id == LabelRow.chosen_response_id)
        .outerjoin(rejected, rejected.id == LabelRow.rejected_response_id)
        .outerjoin(
            JudgmentRow,
            and_(
                JudgmentRow.pair_id == LabelRow.pair_id,
                JudgmentRow.judge_id == LabelRow.judge_id,
                JudgmentRow.order == "AB",
            ),
        )
        .outerjoin(
            PrincipleRow, and_(PrincipleRow.id == JudgmentRow.principle_id, PrincipleRow.kind == "llm")
        )
        .where(PairRow.round_id.in_(round_ids), PairRow.kind != "eval", LabelRow.source == "judge")
        .group_by(PairRow.round_id, key)
        .order_by(PairRow.round_id, key)
    )
    stats: dict[int, list[PrincipleStats]] = {}
    for round_id, principle, labeled, ties, flips, asked, longer, decided in rows:
        stats.setdefault(round_id, []).append(
            PrincipleStats(principle, labeled, int(ties), int(flips), int(asked), int(longer), int(decided))
        )
    return stats


def _sample_words(session: Session, round_ids: list[int]) -> dict[int, tuple[int, float | None]]:
    """(samples, mean words) of each round's own policy samples; word counts need Python."""
    totals: dict[int, list[int]] = {}
    rows = session.execute(
        select(ResponseRow.round_id, ResponseRow.text)
        .join(
            RoundRow, and_(RoundRow.id == ResponseRow.round_id, RoundRow.policy_id == ResponseRow.policy_id)
        )
        .where(ResponseRow.round_id.in_(round_ids), ResponseRow.origin == "sample")
        .execution_options(yield_per=1000)
    )
    for round_id, text in rows:
        count_words = totals.setdefault(round_id, [0, 0])
        count_words[0] += 1
        count_words[1] += len(text.split())
    return {r: (n, words / n if n else None) for r, (n, words) in totals.items()}


def _sample_rule_pass_rates(session: Session, round_ids: list[int]) -> dict[int, dict[str, float]]:
    """Share of each round's sampled responses that pass each rule, from the rule checks made
    while judging (a response checked in several pairs counts once)."""
    rows = session.execute(
        select(
            PairRow.round_id,
            PrincipleRow.key,
            PairRow.response_a_id,
            PairRow.response_b_id,
            JudgmentRow.raw_output,
        )
        .select_from(JudgmentRow)
        .join(PairRow, PairRow.id == JudgmentRow.pair_id)
        .join(PrincipleRow, PrincipleRow.id == JudgmentRow.principle_id)
        .where(
            PairRow.round_id.in_(round_ids),
            PairRow.kind == "sample",
            PrincipleRow.kind == "rule",
            JudgmentRow.status == "ok",
        )
    )
    passes: dict[tuple[int, str], dict[int, bool]] = {}
    for round_id, key, response_a, response_b, raw in rows:
        try:
            checked = json.loads(raw or "{}")
        except json.JSONDecodeError:
            continue
        seen = passes.setdefault((round_id, key), {})
        seen[response_a] = bool(checked.get("a_passes"))
        seen[response_b] = bool(checked.get("b_passes"))
    rates: dict[int, dict[str, float]] = {}
    for (round_id, key), seen in sorted(passes.items()):
        rates.setdefault(round_id, {})[key] = sum(seen.values()) / len(seen)
    return rates


def _training(session: Session, round_id: int) -> TrainingCurve | None:
    """The round's finished run if it has one, else its latest attempt."""
    runs = session.execute(
        select(TrainingRunRow.id, TrainingRunRow.status)
        .where(TrainingRunRow.round_id == round_id)
        .order_by(TrainingRunRow.id)
    ).all()
    if not runs:
        return None
    run_id, status = max(runs, key=lambda run: (run.status == "done", run.id))
    steps = training_steps(session, run_id)

    def curve(key: str) -> list[tuple[int, float]]:
        return [(step, float(m[key])) for step, m in steps if isinstance(m.get(key), int | float)]

    return TrainingCurve(run_id, status, len(steps), curve(ACCURACY_KEY), curve(MARGIN_KEY))


def _evaluation(session: Session, round_id: int) -> EvaluationSummary | None:
    record = latest_evaluation(session, round_id)
    if record is None:
        return None
    # The metrics JSON is written by the evaluation stage: tolerate any key being absent.
    metrics = record.metrics if isinstance(record.metrics, dict) else {}
    judge_only = metrics.get("judge_only")
    return EvaluationSummary(
        id=record.id,
        prompts=record.prompts,
        wins=record.wins,
        ties=record.ties,
        losses=record.losses,
        candidate=_policy_eval(metrics.get("candidate"), record.candidate),
        baseline=_policy_eval(metrics.get("baseline"), record.baseline),
        samples_per_prompt=int(spp)
        if (spp := _float(metrics.get("samples_per_prompt"))) is not None
        else None,
        judge_only={k: v for k, v in judge_only.items() if isinstance(v, int)}
        if isinstance(judge_only, dict)
        else {},
    )


def _policy_eval(side: Any, policy: str) -> PolicyEval:
    side = side if isinstance(side, dict) else {}
    rates = side.get("rule_pass_rate")
    return PolicyEval(
        policy=policy,
        mean_words=_float(side.get("mean_words")),
        rule_pass_rate={str(k): float(v) for k, v in rates.items() if _float(v) is not None}
        if isinstance(rates, dict)
        else {},
        all_rules_pass_rate=_float(side.get("all_rules_pass_rate")),
    )


def _float(value: Any) -> float | None:
    """`value` when it is a number (bools excluded), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None
