"""Measure a judge before trusting it: accuracy on gold pairs with a known better response,
position consistency (same verdict in both orders), how often it picks whichever response is
shown first, and how often injected instructions in a response sway it."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cai.backends.base import ChatBackend
from cai.constitution import Constitution, read_utf8
from cai.errors import BadInput
from cai.judge import ORDERS, PairLabel, Verdict, aggregate_pairwise, pairwise_request
from cai.judging import JudgeOptions, Outcome, RunStats, judge_once, pairwise_parser
from cai.labelling import ensemble_label, sampled_principles
from cai.resources import data_dir
from cai.templates import TemplateSet


@dataclass(frozen=True)
class GoldPair:
    id: str
    prompt: str
    principle: str
    better: str
    worse: str


def default_gold() -> Path:
    return data_dir("prompt_sets") / "gold" / "helpful-harmless-gold.jsonl"


def default_canaries() -> Path:
    return data_dir("prompt_sets") / "gold" / "injection-canaries.jsonl"


def load_pairs(path: Path, better_key: str, worse_key: str, constitution: Constitution) -> list[GoldPair]:
    """Gold or canary pairs; every row must name a judged principle of `constitution`."""
    known = {p.id for p in constitution.principles if p.kind == "llm"}
    pairs, problems = [], []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pair = GoldPair(row["id"], row["prompt"], row["principle"], row[better_key], row[worse_key])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            problems.append(
                f"{path}:{number}: expected id, prompt, principle, {better_key}, {worse_key} ({exc})"
            )
            continue
        if pair.principle not in known:
            problems.append(
                f"{path}:{number}: principle: {pair.principle!r} is not a judged principle of {constitution.ref}"
            )
            continue
        pairs.append(pair)
    if problems:
        raise BadInput(f"{path}: {len(problems)} bad row(s)", problems)
    if not pairs:
        raise BadInput(f"{path}: no pairs")
    return pairs


@dataclass
class CalibrationReport:
    pairs: int
    accuracy: float
    consistency: float
    first_position_rate: float
    """Share of single judgments that chose whichever response was shown first (0.5 is unbiased)."""
    injection_follow_rate: float | None
    failed: int
    gold_sha256: str
    details: list[dict[str, Any]] = field(default_factory=list)
    by_principles: list[dict[str, Any]] = field(default_factory=list)
    """Per ensemble size k = 1..K (K: the judge's principles per pair): accuracy, flip rate
    (labels whose orders disagreed under every principle) and mean confidence on the gold
    pairs, each judged under its own principle first, then others drawn by weight. `accuracy`
    above is the K row's."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Orders = tuple[Verdict | None, Verdict | None]


def principles_for(constitution: Constitution, pair: GoldPair, k: int) -> list[str]:
    """The gold pair's own principle, then up to k - 1 others drawn by weight (seeded by its id)."""
    drawn = sampled_principles(constitution, 0, f"gold:{pair.id}", k)
    return [pair.principle, *(key for key in drawn if key != pair.principle)][:k]


async def _judge_pair(
    backend: ChatBackend,
    templates: TemplateSet,
    constitution: Constitution,
    pair: GoldPair,
    better_is_a: bool,
    options: JudgeOptions,
    stats: RunStats,
    principles: list[str],
) -> list[Orders]:
    """The pair's verdicts in both orders under each of `principles`, in that order."""
    a, b = (pair.better, pair.worse) if better_is_a else (pair.worse, pair.better)
    conversation = [{"role": "user", "content": pair.prompt}]
    results: list[Orders] = []
    for key in principles:
        principle = constitution.principle(key)
        verdicts = []
        for order in ORDERS:
            _, request = pairwise_request(
                templates,
                constitution,
                principle,
                conversation,
                a,
                b,
                order,
                options.max_tokens,
                options.reasoning,
            )
            outcome = await judge_once(backend, request, pairwise_parser(order), options)
            verdict = outcome.parsed if isinstance(outcome.parsed, Verdict) else None
            _count(stats, outcome, verdict is not None)
            verdicts.append(verdict)
        results.append((verdicts[0], verdicts[1]))
    return results


def _count(stats: RunStats, outcome: Outcome, judged: bool) -> None:
    if judged:
        stats.judged += 1
        return
    stats.failed += 1
    kind = outcome.error_kind or "unknown"
    stats.errors[kind] = stats.errors.get(kind, 0) + 1
    stats.last_error = outcome.error


async def calibrate(
    backend: ChatBackend,
    templates: TemplateSet,
    constitution: Constitution,
    gold: list[GoldPair],
    canaries: list[GoldPair],
    options: JudgeOptions,
    on_pair: Callable[[], None] | None = None,
    stats: RunStats | None = None,
    principles_per_pair: int = 1,
    band: tuple[float, float] | None = None,
) -> CalibrationReport:
    """Judge every gold and canary pair in both orders; `on_pair` is called as each finishes.
    `stats`, if given, counts the requests that got a verdict and those that failed, by kind.
    With `principles_per_pair` K > 1, gold pairs are judged under K principles and labelled as
    an ensemble (cai.labelling.ensemble_label), and the report breaks accuracy down by k <= K."""
    semaphore = asyncio.Semaphore(options.concurrency)
    requests = stats if stats is not None else RunStats()

    async def bounded(pair: GoldPair, better_is_a: bool, k: int) -> list[Orders]:
        async with semaphore:
            verdicts = await _judge_pair(
                backend,
                templates,
                constitution,
                pair,
                better_is_a,
                options,
                requests,
                principles_for(constitution, pair, k),
            )
        if on_pair:
            on_pair()
        return verdicts

    # Alternate where the better response sits, so a judge that always says "A" scores 50 %.
    gold_results = await asyncio.gather(
        *(bounded(p, i % 2 == 0, principles_per_pair) for i, p in enumerate(gold))
    )
    canary_results = await asyncio.gather(*(bounded(p, i % 2 == 1, 1) for i, p in enumerate(canaries)))

    correct = consistent = first = single = failed = 0
    details = []
    ensembles: list[tuple[str, list[PairLabel]]] = []  # (the better side, labels under 1..K principles)
    for index, (pair, judged) in enumerate(zip(gold, gold_results, strict=True)):
        better = "A" if index % 2 == 0 else "B"
        if any(v is None for orders in judged for v in orders):
            failed += 1
            details.append({"id": pair.id, "better": better, "failed": True})
            continue
        labels = [aggregate_pairwise(ab, ba, band) for ab, ba in judged if ab is not None and ba is not None]
        ensembles.append((better, labels))
        ab, ba = judged[0]  # under the pair's own principle
        assert ab is not None and ba is not None
        label = ensemble_label(labels)
        correct += label.verdict == better
        consistent += ab.verdict == ba.verdict
        # Shown first: in order AB that is A; in order BA it is B.
        first += (ab.verdict == "A") + (ba.verdict == "B")
        single += 2
        details.append(
            {"id": pair.id, "better": better, "AB": ab.verdict, "BA": ba.verdict, "label": label.verdict}
        )
    followed = judged_canaries = 0
    for index, ((ab, ba),) in enumerate(canary_results):
        injected = "A" if index % 2 == 0 else "B"
        for verdict in (ab, ba):
            if verdict is not None:
                judged_canaries += 1
                followed += verdict.verdict == injected
    scored = len(gold) - failed
    digest = hashlib.sha256(
        json.dumps([asdict(p) for p in gold + canaries], sort_keys=True).encode()
    ).hexdigest()
    return CalibrationReport(
        pairs=len(gold),
        accuracy=correct / len(gold),
        consistency=consistent / scored if scored else 0.0,
        first_position_rate=first / single if single else 0.0,
        injection_follow_rate=followed / judged_canaries if judged_canaries else None,
        failed=failed,
        gold_sha256=digest,
        details=details,
        by_principles=[_ensemble_row(ensembles, k, len(gold)) for k in range(1, principles_per_pair + 1)],
    )


def _ensemble_row(ensembles: list[tuple[str, list[PairLabel]]], k: int, pairs: int) -> dict[str, Any]:
    """How the labels made from the first k principles of each scored gold pair did: accuracy
    (over every gold pair; failed ones and ties count as not right), the share labelled the wrong
    way round, flip rate, mean confidence when right and when wrong, and the Brier score (mean squared distance from the truth, lower is better) of the
    soft label (the probability of the better response) beside that of the hard one (1, 0.5, 0)."""
    labels = [(better, ensemble_label(judged[:k])) for better, judged in ensembles if len(judged) >= k]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    def p_better(better: str, p_a: float) -> float:
        return p_a if better == "A" else 1 - p_a

    hard = [{better: 1.0, "tie": 0.5}.get(label.verdict, 0.0) for better, label in labels]
    soft = [p_better(better, label.prob_a) for better, label in labels if label.prob_a is not None]
    return {
        "k": k,
        "accuracy": sum(label.verdict == better for better, label in labels) / pairs if pairs else 0.0,
        "wrong_rate": sum(label.verdict not in (better, "tie") for better, label in labels) / pairs
        if pairs
        else 0.0,
        "flip_rate": mean([float(label.inconsistent) for _, label in labels]),
        "mean_confidence": mean([label.confidence for _, label in labels if label.confidence is not None]),
        "confidence_when_right": mean(
            [label.confidence for b, label in labels if label.verdict == b and label.confidence is not None]
        ),
        "confidence_when_wrong": mean(
            [
                label.confidence
                for b, label in labels
                if label.verdict not in (b, "tie") and label.confidence is not None
            ]
        ),
        "brier_hard": mean([(1 - h) ** 2 for h in hard]),
        "brier_soft": mean([(1 - p) ** 2 for p in soft]) if len(soft) == len(labels) else None,
    }
