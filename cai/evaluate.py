"""Evaluation of a round: p_{r+1} (candidate) against p_r (baseline) on the held-out eval prompts.
Both policies answer every prompt with the same seeds; each pair is judged in both orders by the
round's judge under its constitution, and the rule principles are checked on every answer. The
outcome is decided as labels are (rules first, then the judge), and the judge's own verdicts are
kept beside it. Every step is stored as it finishes, so a rerun resumes."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from cai.backends.base import ChatBackend, Sampler, SamplingParams
from cai.constitution import Constitution
from cai.generate import sample_missing
from cai.judge import aggregate_pairwise
from cai.judge_round import JudgeSpec, RoundJudgement, Runner, judge_evaluation, plain_runner
from cai.judging import JudgeOptions
from cai.rules import combine
from cai.store import evaluation, repo, work
from cai.store.db import session_scope
from cai.templates import TemplateSet

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


def run_evaluation(
    engine: Engine,
    round_id: int,
    sampler_for: SamplerFactory,
    spec: JudgeSpec,
    backend: ChatBackend,
    templates: TemplateSet,
    options: JudgeOptions,
    samples: int = 1,
    limit: int | None = None,
    params: SamplingParams | None = None,
    runner: Runner = plain_runner,
    on_sampling: Callable[[str, int, int], None] | None = None,
) -> EvaluationResult:
    """Sample both policies on the eval prompts, pair them, judge, tally and store the result.
    `sampler_for` builds a sampler for one policy (called once per policy, and only when it
    still has answers to give); `on_sampling(policy name, done, total)` reports progress."""
    with session_scope(engine) as session:
        round_ = repo.get_round(session, round_id)
        contest = evaluation.contest(session, round_id)
        prompts = evaluation.eval_prompts(session, round_id, limit)
        seed = int(round_.config.get("seed", 0))
        name, version = round_.constitution.split("@")
        constitution = repo.get_constitution(session, name, int(version)).constitution
        work.set_round_status(session, round_id, "evaluating")

    sampled = 0
    for contestant in (contest.candidate, contest.baseline):
        with session_scope(engine) as session:
            stored = work.stored_samples(session, round_id, contestant.id, work.EVAL_KIND)
        if all((p.id, i) in stored for p in prompts for i in range(samples)):
            continue

        def progress(done: int, total: int, who: str = contestant.name) -> None:
            if on_sampling:
                on_sampling(who, done, total)

        # Same seeds for both policies: the comparison sees their difference, not sampling luck.
        sampled += sample_missing(
            engine,
            round_id,
            contestant.id,
            sampler_for(contestant),
            prompts,
            samples,
            seed,
            params,
            origin=work.EVAL_KIND,
            on_batch=progress,
        )[0]

    identical = _pair_up(engine, round_id, contest, prompts, samples)
    judged = asyncio.run(_judge_and_close(engine, round_id, spec, backend, templates, options, runner))
    with session_scope(engine) as session:
        judge_id = work.ensure_judge(session, spec.config("pairwise", templates))
        rules_judge_id = work.ensure_judge(session, work.RULES_JUDGE)
        pairs = evaluation.judged_eval_pairs(session, round_id, judge_id, rules_judge_id)
        has_llm = any(p.kind == "llm" for p in constitution.principles)
        outcome = tally(pairs, identical, has_llm)
        metrics = {
            "samples_per_prompt": samples,
            "eval_prompts": len(prompts),
            "undecided": outcome.undecided,
            "judge_only": outcome.judge,
        }
        for side, contestant in (("candidate", contest.candidate), ("baseline", contest.baseline)):
            answers = evaluation.eval_responses(session, round_id, contestant.id)
            metrics[side] = {"policy": contestant.name} | policy_metrics(
                constitution, [a.text for a in answers], [a.completion_tokens for a in answers]
            )
        evaluation.save_evaluation(
            session,
            round_id,
            contest,
            judge_id,
            outcome.decided,
            outcome.wins,
            outcome.ties,
            outcome.losses,
            metrics,
        )
        pending = work.pending_count(session, round_id, judge_id, evaluation=True)
        if pending == 0 and not judged.stats.stopped_by_budget:
            work.set_round_status(session, round_id, "done")
        record = evaluation.latest_evaluation(session, round_id)
    assert record is not None
    return EvaluationResult(record, outcome, sampled, judged.planned)


def _pair_up(
    engine: Engine,
    round_id: int,
    contest: evaluation.Contest,
    prompts: Sequence[work.PromptWork],
    samples: int,
) -> int:
    """Store (candidate answer, baseline answer) pairs with the same prompt and sample index;
    returns how many were identical (ties, never judged)."""
    identical = 0
    with session_scope(engine) as session:
        mine = work.stored_samples(session, round_id, contest.candidate.id, work.EVAL_KIND)
        theirs = work.stored_samples(session, round_id, contest.baseline.id, work.EVAL_KIND)
        for prompt in prompts:
            pairs = []
            for index in range(samples):
                a, b = mine.get((prompt.id, index)), theirs.get((prompt.id, index))
                if a is None or b is None:
                    continue
                if " ".join(a[1].split()) == " ".join(b[1].split()):
                    identical += 1
                else:
                    pairs.append((a[0], b[0]))
            work.add_pairs(session, round_id, prompt.id, pairs, kind=work.EVAL_KIND)
    return identical


async def _judge_and_close(
    engine: Engine,
    round_id: int,
    spec: JudgeSpec,
    backend: ChatBackend,
    templates: TemplateSet,
    options: JudgeOptions,
    runner: Runner,
) -> RoundJudgement:
    try:
        return await judge_evaluation(engine, round_id, spec, backend, templates, options, runner)
    finally:
        await backend.aclose()
