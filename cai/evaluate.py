"""Evaluation of a round: p_{r+1} (candidate) against p_r (baseline) on the held-out eval prompts.
Both policies answer every prompt with the same seeds; each pair is judged in both orders by the
round's judge under its constitution, and the rule principles are checked on every answer. The
outcome is decided as labels are (rules first, then the judge), and the judge's own verdicts are
kept beside it. Every step is stored as it finishes, so a rerun resumes."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from cai.backends.base import Sampler
from cai.constitution import Constitution
from cai.labelling import judged_label
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
    outcomes: dict[int, float] = field(default_factory=dict)
    """Pair id -> the candidate's result on it: 1 a win, 0.5 a tie, 0 a loss (decided pairs)."""

    @property
    def decided(self) -> int:
        return self.wins + self.ties + self.losses


def tally(
    pairs: Sequence[evaluation.JudgedEvalPair],
    identical: int,
    has_llm: bool,
    band: tuple[float, float] | None = None,
) -> Tally:
    """Identical answers are ties without a judge call; A is always the candidate. The judge's
    verdicts are combined as labels are (cai.labelling.judged_label)."""
    result = Tally(ties=identical)
    for pair in pairs:
        judged = judged_label(pair.llm, band) if has_llm and pair.llm else None
        if judged is not None:
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
        result.outcomes[pair.pair_id] = {"A": 1.0, "B": 0.0}.get(decision_verdict, 0.5)
    return result


@dataclass(frozen=True)
class LengthControlled:
    """A win rate with the length difference regressed out (AlpacaEval's length-controlled idea):
    fit P(win) = sigmoid(b0 + b1 * d / s), d = candidate words - baseline words and s the standard
    deviation of d, by penalised maximum likelihood; the length-controlled win rate is the fitted
    P(win) at d = 0, the result had the two answers been the same length. Ties count half in both
    rates. With few pairs near d = 0 it is a wide estimate: read it beside the raw rate."""

    win_rate: float
    raw_win_rate: float
    length_coef: float
    """b1: how much being longer moved the outcome (0: not at all)."""
    pairs: int


LENGTH_PENALTY = 0.1
"""L2 penalty on b1 alone: keeps the fit finite when length separates the outcomes perfectly
(the intercept, which carries the answer, is not shrunk)."""


def length_controlled(outcomes: Sequence[tuple[float, int]]) -> LengthControlled | None:
    """From (outcome, candidate words - baseline words) per decided pair; None without pairs."""
    if not outcomes:
        return None
    ys = [y for y, _ in outcomes]
    diffs = [float(d) for _, d in outcomes]
    scale = statistics.pstdev(diffs) or 1.0
    xs = [d / scale for d in diffs]
    b0 = b1 = 0.0
    for _ in range(100):  # Newton's method on a concave 2-parameter log-likelihood
        g0 = g1 = h00 = h01 = h11 = 0.0
        for x, y in zip(xs, ys, strict=True):
            p = 1 / (1 + math.exp(-(b0 + b1 * x)))
            w = p * (1 - p)
            g0, g1 = g0 + (y - p), g1 + (y - p) * x
            h00, h01, h11 = h00 + w, h01 + w * x, h11 + w * x * x
        g1 -= LENGTH_PENALTY * b1
        h11 += LENGTH_PENALTY
        h00 += 1e-9  # all wins or all losses: the intercept runs off, slowly and harmlessly
        det = h00 * h11 - h01 * h01
        step0, step1 = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det
        b0, b1 = b0 + step0, b1 + step1
        if abs(step0) + abs(step1) < 1e-10:
            break
    return LengthControlled(
        win_rate=1 / (1 + math.exp(-b0)), raw_win_rate=statistics.fmean(ys), length_coef=b1, pairs=len(ys)
    )


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
