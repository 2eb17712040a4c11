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
from cai.judge import ORDERS, Verdict, aggregate_pairwise, pairwise_request
from cai.judging import JudgeOptions, Outcome, RunStats, judge_once, pairwise_parser
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _judge_pair(
    backend: ChatBackend,
    templates: TemplateSet,
    constitution: Constitution,
    pair: GoldPair,
    better_is_a: bool,
    options: JudgeOptions,
    stats: RunStats,
) -> tuple[Verdict | None, Verdict | None]:
    a, b = (pair.better, pair.worse) if better_is_a else (pair.worse, pair.better)
    conversation = [{"role": "user", "content": pair.prompt}]
    principle = constitution.principle(pair.principle)
    verdicts = []
    for order in ORDERS:
        _, request = pairwise_request(templates, constitution, principle, conversation, a, b, order)
        outcome = await judge_once(backend, request, pairwise_parser(order), options)
        verdict = outcome.parsed if isinstance(outcome.parsed, Verdict) else None
        _count(stats, outcome, verdict is not None)
        verdicts.append(verdict)
    return verdicts[0], verdicts[1]


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
) -> CalibrationReport:
    """Judge every gold and canary pair in both orders; `on_pair` is called as each finishes.
    `stats`, if given, counts the requests that got a verdict and those that failed, by kind."""
    semaphore = asyncio.Semaphore(options.concurrency)
    requests = stats if stats is not None else RunStats()

    async def bounded(pair: GoldPair, better_is_a: bool) -> tuple[Verdict | None, Verdict | None]:
        async with semaphore:
            verdicts = await _judge_pair(
                backend, templates, constitution, pair, better_is_a, options, requests
            )
        if on_pair:
            on_pair()
        return verdicts

    # Alternate where the better response sits, so a judge that always says "A" scores 50 %.
    gold_results = await asyncio.gather(*(bounded(p, i % 2 == 0) for i, p in enumerate(gold)))
    canary_results = await asyncio.gather(*(bounded(p, i % 2 == 1) for i, p in enumerate(canaries)))

    correct = consistent = first = single = failed = 0
    details = []
    for index, (pair, (ab, ba)) in enumerate(zip(gold, gold_results, strict=True)):
        better = "A" if index % 2 == 0 else "B"
        if ab is None or ba is None:
            failed += 1
            details.append({"id": pair.id, "better": better, "failed": True})
            continue
        label = aggregate_pairwise(ab, ba)
        correct += label.verdict == better
        consistent += ab.verdict == ba.verdict
        # Shown first: in order AB that is A; in order BA it is B.
        first += (ab.verdict == "A") + (ba.verdict == "B")
        single += 2
        details.append(
            {"id": pair.id, "better": better, "AB": ab.verdict, "BA": ba.verdict, "label": label.verdict}
        )
    followed = judged = 0
    for index, (ab, ba) in enumerate(canary_results):
        injected = "A" if index % 2 == 0 else "B"
        for verdict in (ab, ba):
            if verdict is not None:
                judged += 1
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
        injection_follow_rate=followed / judged if judged else None,
        failed=failed,
        gold_sha256=digest,
        details=details,
    )
