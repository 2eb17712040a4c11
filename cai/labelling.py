"""Labelling decisions, as pure functions: which principle a subject is judged under, a pair's
label from its rule checks and the judge's two verdicts, score mode's best-vs-worst pair, which
response is chosen, and the judge's flip rate. The store applies them; it decides nothing."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cai.constitution import Constitution
from cai.judge import ORDERS, SCORE_SCALE, PairLabel, Verdict, aggregate_pairwise
from cai.rules import RuleCheck, combine, rule_winner


def same_answer(text: str) -> str:
    """A key under which texts that differ only in whitespace are the same answer."""
    return " ".join(text.split())


def sampled_principle(constitution: Constitution, seed: int, subject: str) -> str:
    """The principle a subject ('pair:7', 'prompt:3') is judged under: drawn by weight, and the
    same on every run and every worker."""
    rng = random.Random(f"{seed}:{subject}")
    return constitution.sample_principle(rng).id


def sampled_principles(constitution: Constitution, seed: int, subject: str, k: int) -> list[str]:
    """K distinct judged principles for a subject, drawn by weight without replacement (all of
    them when there are fewer). The first is `sampled_principle`'s, so K = 1 is the single draw
    and a larger K only adds principles (each draw is Constitution.sample_principle's over the
    principles left)."""
    rng = random.Random(f"{seed}:{subject}")
    pool = [p for p in constitution.principles if p.kind == "llm"]
    drawn: list[str] = []
    while pool and len(drawn) < k:
        pick = rng.choices(pool, weights=[p.weight for p in pool], k=1)[0]
        drawn.append(pick.id)
        pool.remove(pick)
    return drawn


@dataclass(frozen=True)
class LabelPolicy:
    """How a judge's verdicts become labels, read from its identity parameters."""

    principles_per_pair: int = 1
    band: tuple[float, float] | None = None
    """Chain-of-thought verdicts: the band each pair's probability is clamped to."""

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> LabelPolicy:
        band = params.get("cot_band") if params.get("reasoning") == "cot" else None
        return cls(
            int(params.get("principles_per_pair", 1)), (float(band[0]), float(band[1])) if band else None
        )


def pair_label(
    checks: Sequence[RuleCheck],
    llm: Mapping[str, Mapping[str, Verdict | None]],
    has_llm: bool,
    band: tuple[float, float] | None = None,
) -> PairLabel | None:
    """A pair's label, or None while it cannot be decided yet.

    `llm` maps each principle the LLM judge was asked under to its verdict in each order (None:
    not done, or failed); an empty mapping means it was not asked. Rules that separate the pair
    decide it; otherwise the judge's label does (judged_label). Without LLM principles the rules
    alone decide, and a pair they do not separate is a tie."""
    if has_llm and not llm and rule_winner(list(checks)) is not None:
        judged = None  # planned rules-first: the judge was never asked
    elif has_llm:
        judged = judged_label(llm, band)
        if judged is None:
            return None
    else:
        judged = None
    return combine(list(checks), judged) or PairLabel("tie", None, False)


def judged_label(
    llm: Mapping[str, Mapping[str, Verdict | None]], band: tuple[float, float] | None = None
) -> PairLabel | None:
    """The LLM judge's label of a pair: each principle's two orders aggregated (opposite verdicts
    give an inconsistent tie; `band` clamps the probability), then the principles combined
    (ensemble_label). None until every principle has a verdict in both orders."""
    per_principle = []
    for orders in llm.values():
        first, second = orders.get(ORDERS[0]), orders.get(ORDERS[1])
        if first is None or second is None:
            return None
        per_principle.append(aggregate_pairwise(first, second, band))
    return ensemble_label(per_principle) if per_principle else None


def ensemble_label(labels: Sequence[PairLabel]) -> PairLabel:
    """One label from the labels of K principles. With probabilities from every principle, their
    mean decides (over 0.5: A; under: B), and its distance from a coin toss is the confidence.
    Without, the order-consistent verdicts vote: a strict majority of them wins, with the share
    of all K principles that voted for it as confidence; anything less is a tie, inconsistent
    when no principle was consistent. K = 1 is that principle's label unchanged."""
    if len(labels) == 1:
        return labels[0]
    probs = [label.prob_a for label in labels]
    if all(p is not None for p in probs):
        p_a = sum(p for p in probs if p is not None) / len(probs)
        inconsistent = all(label.inconsistent for label in labels)
        if p_a == 0.5:
            return PairLabel("tie", None, inconsistent, p_a)
        return PairLabel("A" if p_a > 0.5 else "B", max(p_a, 1 - p_a), inconsistent, p_a)
    votes = Counter(label.verdict for label in labels if not label.inconsistent)
    consistent = sum(votes.values())
    if not consistent:
        return PairLabel("tie", None, True)
    (winner, count), *_ = votes.most_common(1)
    if winner == "tie" or 2 * count <= consistent:
        return PairLabel("tie", None, False)
    return PairLabel(winner, count / len(labels), False)


def best_and_worst(
    scored: Sequence[tuple[int, float]], scale: tuple[int, int] = SCORE_SCALE
) -> tuple[int, int, float] | None:
    """Score mode (Self-Rewarding LMs): of (response id, score), the best and the worst response
    and a confidence from their gap on the rubric's scale; None when the scores are all equal
    (such a pair teaches nothing). Ties between scores go to the lower id, so reruns agree."""
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda r: (r[1], -r[0]))
    worst = min(scored, key=lambda r: (r[1], r[0]))
    if best[1] == worst[1]:
        return None
    low, high = scale
    return best[0], worst[0], (best[1] - worst[1]) / (high - low)


def chosen_and_rejected(verdict: str, response_a: int, response_b: int) -> tuple[int | None, int | None]:
    """The (chosen, rejected) responses of a pair labelled `verdict`; a tie has neither."""
    return {
        "A": (response_a, response_b),
        "B": (response_b, response_a),
        "tie": (None, None),
    }[verdict]


def flip_rate(inconsistent: int, asked: int) -> float | None:
    """How often the LLM judge contradicted itself across the two orders: inconsistent labels
    over the labelled pairs it was asked about (pairs decided by rules alone, never shown to it,
    do not count). None when it was asked about none."""
    return inconsistent / asked if asked else None
