"""Evaluation of a round: p_{r+1} (candidate) against p_r (baseline) on the held-out eval prompts.
Both policies answer every prompt with the same seeds; each pair is judged in both orders by the
round's judge under its constitution, and the rule principles are checked on every answer. The
outcome is decided as labels are (rules first, then the judge), and the judge's own verdicts are
kept beside it. Every step is stored as it finishes, so a rerun resumes."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from cai.backends.base import Sampler
from cai.constitution import Constitution
from cai.judge import aggregate_pairwise
from cai.rules import combine
from cai.store import evaluation, samples
from cai.store.samples import EVAL_KIND

SamplerFactory = Callable[[evaluation.Contestant], Sampler]


@dataclass
class Tally:
    """Outcomes from the candidate's side. `judge_*` count the LLM judge's verdicts alone, on
    the pairs it was asked about."""

    wins: int = 0
    ties: int = 0
    losses: int = 0
    undecided: int = 0
    """Pairs whose LLM judgments failed and that the rules do not separate: left out."""
    judge: dict[str, int] = field(
        default_factory=lambda: {"wins": 0, "ties": 0, "losses": 0, "inconsistent": 0, "failed": 0}
    )

    @property
    def decided(self) -> int:
        return self.wins + self.ties + self.losses


def tally(pairs: Sequence[evaluation.JudgedEvalPair], identical: int, has_llm: bool) -> Tally:
    """Identical answers are ties without a judge call; A is always the candidate."""
    result = Tally(ties=identical)
    for pair in pairs:
        judged = None
        if has_llm and len(pair.llm) == 2:
            judged = aggregate_pairwise(pair.llm["AB"], pair.llm["BA"])
            result.judge[{"A": "wins", "B": "losses", "tie": "ties"}[judged.verdict]] += 1
            result.judge["inconsistent"] += judged.inconsistent
        elif pair.llm_failed:
            result.judge["failed"] += 1
        decision = combine(pair.checks, judged)
        if decision is None:
            if has_llm:
                result.undecided += 1
                continue
            decision_verdict = "tie"  # no LLM principles and the rules do not separate them
        else:
            decision_verdict = decision.verdict
        if decision_verdict == "A":
            result.wins += 1
        elif decision_verdict == "B":
            result.losses += 1
        else:
            result.ties += 1
    return result


def policy_metrics(
    constitution: Constitution, texts: Sequence[str], completion_tokens: Sequence[int | None]
) -> dict[str, Any]:
    """Mean length and rule pass rates of one policy's eval answers."""
    rules = [p for p in constitution.principles if p.kind == "rule" and p.rule is not None]
    tokens = [t for t in completion_tokens if t is not None]
    passes = {p.id: [p.rule.passes(t) for t in texts] for p in rules if p.rule is not None}
    return {
        "responses": len(texts),
        "mean_words": statistics.fmean(len(t.split()) for t in texts) if texts else None,
        "mean_tokens": statistics.fmean(tokens) if tokens else None,
        "rule_pass_rate": {key: statistics.fmean(v) for key, v in passes.items() if v},
        "all_rules_pass_rate": (
            statistics.fmean(all(p.rule.passes(t) for p in rules if p.rule is not None) for t in texts)
            if rules and texts
            else None
        ),
    }


@dataclass(frozen=True)
class EvaluationResult:
    record: evaluation.EvaluationRecord
    tally: Tally
    sampled: int
    planned_judgments: int


def pair_up(
    session: Session,
    round_id: int,
    contest: evaluation.Contest,
    prompts: Sequence[samples.PromptWork],
    count: int,
) -> int:
    """Store (candidate answer, baseline answer) pairs with the same prompt and sample index;
    returns how many were identical (ties, never judged)."""
    identical = 0
    mine = samples.stored_samples(session, round_id, contest.candidate.id, EVAL_KIND)
    theirs = samples.stored_samples(session, round_id, contest.baseline.id, EVAL_KIND)
    for prompt in prompts:
        pairs = []
        for index in range(count):
            a, b = mine.get((prompt.id, index)), theirs.get((prompt.id, index))
            if a is None or b is None:
                continue
            if " ".join(a[1].split()) == " ".join(b[1].split()):
                identical += 1
            else:
                pairs.append((a[0], b[0]))
        samples.add_pairs(session, round_id, prompt.id, pairs, kind=EVAL_KIND)
    return identical
