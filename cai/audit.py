"""Auditing the judge: judge-human agreement, Cohen's kappa, per-principle summaries and the
stratified review queue. Pure functions over plain values; cai.store.audit feeds them."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cai.labelling import flip_rate

VERDICTS = ("A", "B", "tie")
ALL = "(all)"
"""The name of the summary row that covers every pair once."""


class AuditedPair(Protocol):
    """What the summaries and the review queue need to know about one pair."""

    @property
    def pair_id(self) -> int: ...
    @property
    def principles(self) -> list[str]: ...
    @property
    def judge_verdict(self) -> str | None: ...
    @property
    def human_verdict(self) -> str | None:
        """The human's verdict: an override's, or the judge's when a reviewer agreed with it."""
        ...

    @property
    def confidence(self) -> float | None: ...
    @property
    def inconsistent(self) -> bool: ...
    @property
    def judge_asked(self) -> bool:
        """The LLM judge was asked about the pair (it was not decided by rules alone)."""
        ...

    @property
    def lengths(self) -> tuple[int, int]:
        """The lengths of response A and response B."""
        ...

    @property
    def failed(self) -> int: ...


# --- agreement ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    pairs: int
    agreed: int
    rate: float | None
    kappa: float | None


def cohen_kappa(ratings: Sequence[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two raters over the categories A, B and tie. None when it is undefined:
    no ratings, or chance agreement is certain (both raters only ever used one and the same
    category), where (p_o - p_e) / (1 - p_e) divides by zero."""
    _check(ratings)
    n = len(ratings)
    if n == 0:
        return None
    first = Counter(a for a, _ in ratings)
    second = Counter(b for _, b in ratings)
    # Kept in integers (counts x n) so the degenerate case is detected exactly, not to a tolerance.
    chance = sum(first[c] * second[c] for c in VERDICTS)
    if chance == n * n:
        return None
    observed = sum(a == b for a, b in ratings)
    return (observed * n - chance) / (n * n - chance)


def agreement(ratings: Sequence[tuple[str, str]]) -> Agreement:
    """Raw agreement and kappa for (judge verdict, human verdict) pairs."""
    _check(ratings)
    agreed = sum(a == b for a, b in ratings)
    rate = agreed / len(ratings) if ratings else None
    return Agreement(len(ratings), agreed, rate, cohen_kappa(ratings))


@dataclass(frozen=True)
class HumanAgreement:
    """How far humans agree with each other, over the pairs that two or more of them labeled."""

    items: int
    """Pairs with labels from at least two people: what alpha is computed over."""
    raters: int
    """People with a label on at least one of those pairs."""
    alpha: float | None
    """Krippendorff's alpha (nominal); None when undefined (see krippendorff_alpha)."""


def krippendorff_alpha(units: Iterable[Sequence[str]]) -> float | None:
    """Krippendorff's alpha for nominal verdicts (A, B, tie): 1 - observed / expected
    disagreement, over the units (pairs) given as the verdicts their raters gave. Units with
    fewer than two verdicts carry no pairable values and are left out. None when it is
    undefined: fewer than two pairable values, or a single category used throughout (no
    disagreement could be expected). Unlike Cohen's kappa it takes any number of raters per
    unit, and missing ratings."""
    # The coincidence matrix: every ordered pair of verdicts within a unit, weighted 1/(m - 1).
    coincidences: defaultdict[tuple[str, str], float] = defaultdict(float)
    for unit in units:
        values = list(unit)
        _check([(v, v) for v in values])
        m = len(values)
        if m < 2:
            continue
        for i, first in enumerate(values):
            for j, second in enumerate(values):
                if i != j:
                    coincidences[first, second] += 1 / (m - 1)
    marginals: defaultdict[str, float] = defaultdict(float)
    for (first, _), weight in coincidences.items():
        marginals[first] += weight
    n = sum(marginals.values())
    expected = sum(marginals[c] * marginals[k] for c in VERDICTS for k in VERDICTS if c != k)
    if n < 2 or expected < 1e-9:
        return None
    observed = sum(weight for (c, k), weight in coincidences.items() if c != k)
    return 1 - (n - 1) * observed / expected


def human_agreement(ratings: dict[int, dict[str, str]]) -> HumanAgreement:
    """Krippendorff's alpha over `ratings` (pair id -> rater -> verdict), using the pairs that at
    least two raters labeled."""
    shared = {pair: by_rater for pair, by_rater in ratings.items() if len(by_rater) >= 2}
    raters = {rater for by_rater in shared.values() for rater in by_rater}
    return HumanAgreement(
        items=len(shared),
        raters=len(raters),
        alpha=krippendorff_alpha(list(by_rater.values()) for by_rater in shared.values()),
    )


def _check(ratings: Iterable[tuple[str, str]]) -> None:
    for pair in ratings:
        for verdict in pair:
            if verdict not in VERDICTS:
                raise ValueError(f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}")


# --- per-principle summaries -------------------------------------------------------------------


@dataclass(frozen=True)
class PrincipleStats:
    principle: str
    pairs: int
    labeled: int
    ties: int
    inconsistent: int
    flip_rate: float | None
    """Inconsistent labels (the two orders disagreed) over the labeled pairs the LLM judge was
    asked about (cai.labelling.flip_rate)."""
    failed: int
    """Failed judgments (not pairs)."""
    mean_confidence: float | None
    human_checked: int
    """Labeled pairs a human overrode or reviewed: what agreement and kappa are computed over."""
    agreement: float | None
    kappa: float | None
    longer_won: float | None = None
    """Of the judge's decisive labels on pairs of unequal length, the share that chose the
    longer response (0.5 is no length preference; a FastChat study found about 0.68)."""
    length_decided: int = 0
    """How many labels longer_won is over."""


def longer_won(pairs: Sequence[AuditedPair]) -> tuple[float | None, int]:
    """(share of decisive judge labels that chose the longer response, how many there were)."""
    decided = [p for p in pairs if p.judge_verdict in ("A", "B") and p.lengths[0] != p.lengths[1]]
    longer = sum((p.judge_verdict == "A") == (p.lengths[0] > p.lengths[1]) for p in decided)
    return (longer / len(decided) if decided else None), len(decided)


def summarize(principle: str, pairs: Sequence[AuditedPair]) -> PrincipleStats:
    labeled = [p for p in pairs if p.judge_verdict is not None]
    confidences = [p.confidence for p in labeled if p.confidence is not None]
    inconsistent = sum(p.inconsistent for p in labeled)
    ratings = [(p.judge_verdict, p.human_verdict) for p in labeled]
    checked = agreement([(judge, human) for judge, human in ratings if judge and human])
    longer, decided = longer_won(labeled)
    return PrincipleStats(
        principle=principle,
        pairs=len(pairs),
        labeled=len(labeled),
        ties=sum(p.judge_verdict == "tie" for p in labeled),
        inconsistent=inconsistent,
        flip_rate=flip_rate(inconsistent, sum(p.judge_asked for p in labeled)),
        failed=sum(p.failed for p in pairs),
        mean_confidence=sum(confidences) / len(confidences) if confidences else None,
        human_checked=checked.pairs,
        agreement=checked.rate,
        kappa=checked.kappa,
        longer_won=longer,
        length_decided=decided,
    )


def principle_stats(pairs: Sequence[AuditedPair]) -> list[PrincipleStats]:
    """One row per principle (a pair judged under several counts in each), then the overall row,
    which counts every pair once."""
    by_principle: dict[str, list[AuditedPair]] = {}
    for pair in pairs:
        for key in pair.principles or ["(none)"]:
            by_principle.setdefault(key, []).append(pair)
    rows = [summarize(key, members) for key, members in sorted(by_principle.items())]
    return [*rows, summarize(ALL, pairs)]


# --- review queue ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pick:
    pair_id: int
    reason: str
    """'inconsistent', 'low-confidence' or 'principle'."""
    principle: str | None


def review_queue(pairs: Sequence[AuditedPair], n: int, seed: int = 0) -> list[Pick]:
    """Up to n distinct pairs for a human to check, the same for the same inputs and seed:
    first inconsistent pairs (up to a third of n, drawn by seed), then the least confident ones
    (up to a third; a confidence of 1.0 is not low), then the rest of the budget round-robin over
    principles (drawn by seed), so every principle gets looked at. Callers pass only pairs that
    have a judge label and no human check yet."""
    if n < 0:
        raise ValueError("n must not be negative")
    pool = sorted(
        {p.pair_id: p for p in pairs}.values(), key=lambda p: p.pair_id
    )  # input order is irrelevant
    share = -(-n // 3)
    picks: dict[int, Pick] = {}

    def take(candidates: Iterable[AuditedPair], reason: str, limit: int) -> None:
        for pair in candidates:
            if len(picks) >= limit:
                return
            if pair.pair_id not in picks:
                picks[pair.pair_id] = Pick(pair.pair_id, reason, _principle(pair))

    take(_shuffled([p for p in pool if p.inconsistent], seed, "inconsistent"), "inconsistent", min(share, n))
    unsure = [p for p in pool if p.confidence is not None and p.confidence < 1.0 and p.pair_id not in picks]
    unsure.sort(key=lambda p: (p.confidence, p.pair_id))
    take(unsure, "low-confidence", min(len(picks) + share, n))
    by_principle: dict[str, list[AuditedPair]] = {}
    for pair in pool:
        if pair.pair_id not in picks:
            by_principle.setdefault(_principle(pair) or "", []).append(pair)
    queues = [_shuffled(members, seed, f"principle:{key}") for key, members in sorted(by_principle.items())]
    while len(picks) < n and any(queues):
        for queue in queues:
            if queue and len(picks) < n:
                take([queue.pop(0)], "principle", n)
    return list(picks.values())


def queue_size(annotators: int, per_annotator: int, overlap: float) -> int:
    """How many distinct pairs `split_queues` needs to fill every queue."""
    shared = round(overlap * per_annotator)
    return shared + (per_annotator - shared) * annotators


def split_queues(
    picks: Sequence[int], annotators: Sequence[str], per_annotator: int, overlap: float
) -> dict[str, list[int]]:
    """Queues of up to `per_annotator` pairs each, cut from `picks` (a stratified review queue,
    in order): the first `overlap` share of every queue is the same pairs for everyone, so that
    agreement between humans can be measured on them, and the rest is dealt out in turn, each
    pair to one annotator. With overlap 1 everyone gets the same queue; with 0 none overlap."""
    if not 0 <= overlap <= 1:
        raise ValueError("overlap must be between 0 and 1")
    if per_annotator < 0:
        raise ValueError("per_annotator must not be negative")
    if len(set(annotators)) != len(annotators):
        raise ValueError("annotators must be distinct")
    shared = list(picks[: round(overlap * per_annotator)])
    queues = {name: list(shared) for name in annotators}
    rest = iter(picks[len(shared) :])
    for _ in range(per_annotator - len(shared)):
        for name in annotators:
            pick = next(rest, None)
            if pick is None:
                return queues
            queues[name].append(pick)
    return queues


def _principle(pair: AuditedPair) -> str | None:
    return pair.principles[0] if pair.principles else None


def _shuffled(pairs: list[AuditedPair], seed: int, stratum: str) -> list[AuditedPair]:
    # A string seed hashes the same in every process (unlike hash()), so queues are reproducible.
    rng = random.Random(f"{seed}:{stratum}")
    shuffled = list(pairs)
    rng.shuffle(shuffled)
    return shuffled
