"""Labelling decisions, as pure functions: which principle a subject is judged under, a pair's
label from its rule checks and the judge's two verdicts, score mode's best-vs-worst pair, which
response is chosen, and the judge's flip rate. The store applies them; it decides nothing."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

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


def pair_label(
    checks: Sequence[RuleCheck], llm: Mapping[str, Verdict | None], has_llm: bool
) -> PairLabel | None:
    """A pair's label, or None while it cannot be decided yet.

    `llm` maps each order the LLM judge was asked in to its verdict (None: not done, or failed);
    an empty mapping means it was not asked. Rules that separate the pair decide it; otherwise
    the judge's two orders are aggregated (opposite verdicts: an inconsistent tie). Without LLM
    principles the rules alone decide, and a pair they do not separate is a tie."""
    if has_llm and not llm and rule_winner(list(checks)) is not None:
        judged = None  # planned rules-first: the judge was never asked
    elif has_llm and (set(llm) != set(ORDERS) or any(v is None for v in llm.values())):
        return None
    elif has_llm:
        first, second = (llm[order] for order in ORDERS)
        assert first is not None and second is not None
        judged = aggregate_pairwise(first, second)
    else:
        judged = None
    return combine(list(checks), judged) or PairLabel("tie", None, False)


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
