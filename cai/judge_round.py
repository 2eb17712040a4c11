"""Judge one round in one mode: for each phase, plan the work (idempotently, under the round's
lock), run the judge over it, then aggregate labels. pairwise: sampled pairs, both orders.
score: every sample scored, best vs worst labelled. revise: first samples revised, then each
revision judged against its original in both orders. One event loop for all phases: the
backend's connection pool belongs to it. Database work between phases is brief and synchronous."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session

from cai.backends.base import ChatBackend
from cai.backends.negotiation import EndpointFeatures
from cai.constitution import Constitution
from cai.errors import BadInput
from cai.judging import JudgeOptions, JudgeRun, RunStats
from cai.labelling import LabelPolicy
from cai.store import judges, labels, queue, repo
from cai.store.db import session_scope
from cai.store.samples import EVAL_KIND
from cai.templates import TemplateSet

TEMPLATES = {"pairwise": "judge_pairwise", "score": "judge_score", "revise": "revision"}
PAIR_PHASES = ("sample", "revision", EVAL_KIND)
PLANNING_PASSES = 3
Runner = Callable[[JudgeRun, int, str], Coroutine[Any, Any, RunStats]]


@dataclass(frozen=True)
class JudgeSpec:
    """Who judges: everything that makes up a judge's identity, minus the mode."""

    backend: str
    model: str
    base_url: str | None
    params: dict[str, object]

    def config(self, mode: str, templates: TemplateSet) -> judges.JudgeConfig:
        template = TEMPLATES[mode]
        return judges.JudgeConfig(
            self.backend, self.model, mode, templates.sha256[template], self.params, self.base_url
        )


@dataclass
class RoundJudgement:
    summary: labels.JudgeSummary
    stats: RunStats
    planned: int
    retried: int
    reclaimed: int
    calibration: judges.CalibrationRecord | None = None
    """The judge's latest calibration under this constitution (accuracy, injection-follow rate)."""


async def plain_runner(run: JudgeRun, pending: int, phase: str) -> RunStats:
    return await run.run()


@dataclass(frozen=True)
class Claimant:
    """Who claims the work and when to stop claiming (a job's owner, its cancel flag)."""

    worker: str
    should_stop: Callable[[], bool] | None = None


async def judge_round(
    engine: Engine,
    round_id: int,
    spec: JudgeSpec,
    backend: ChatBackend,
    templates: TemplateSet,
    options: JudgeOptions,
    claimant: Claimant,
    mode: str = "pairwise",
    runner: Runner = plain_runner,
) -> RoundJudgement:
    """Every phase of `mode`, then the summary of the labels it made. Status changes are the
    judge stage's (cai.stages.judge)."""
    result = RoundJudgement(labels.JudgeSummary(0, 0, 0, 0, 0, 0, 0, 0, 0.0), RunStats(), 0, 0, 0)
    pairwise = spec.config("pairwise", templates)
    run = (engine, round_id, backend, templates, options, runner, result, claimant)
    if mode == "score":
        labelling = spec.config("score", templates)
        await _phase(*run, labelling, "score")
    elif mode == "revise":
        labelling, reviser = pairwise, spec.config("revise", templates)
        if not await _phase(*run, reviser, "revise"):
            with session_scope(engine) as session:
                repo.lock_round(session, round_id)
                labels.materialise_revisions(session, round_id, judges.ensure_judge(session, reviser))
            await _phase(*run, pairwise, "revision")
    else:
        labelling = pairwise
        with session_scope(engine) as session:
            kind = repo.get_round(session, round_id).kind
        await _phase(*run, pairwise, first_phase(mode, kind))
    with session_scope(engine) as session:
        result.summary = labels.judge_summary(session, round_id, judges.ensure_judge(session, labelling))
        constitution_id = repo.get_round(session, round_id).constitution_id
        result.calibration = judges.latest_calibration(
            session, judges.ensure_judge(session, pairwise), constitution_id
        )
    return result


@dataclass(frozen=True)
class PhasePlan:
    """A phase's work once planned: whose it is, and how much of it is pending."""

    judge_id: int
    rules_judge_id: int
    constitution: Constitution
    pending: int
    planned: int
    retried: int
    reclaimed: int


def plan_phase(
    engine: Engine | Connection, round_id: int, options: JudgeOptions, config: judges.JudgeConfig, phase: str
) -> PhasePlan:
    """Plan a phase's judgments (idempotently, under the round's lock), put back the failures to
    retry and the claims of dead workers. `engine` may be a connection in a transaction, which an
    estimate rolls back: the same planning, nothing kept."""
    evaluation = phase == EVAL_KIND
    with session_scope(engine) as session:
        round_ = repo.get_round(session, round_id)
        name, version = round_.constitution.split("@")
        stored = repo.get_constitution(session, name, int(version))
        judge_id = judges.ensure_judge(session, config)
        rules_judge_id = judges.ensure_judge(session, judges.RULES_JUDGE)
        seed = int(round_.config.get("seed", 0))
    common = (stored.constitution, stored.record.id, stored.record.sha256, config.template_sha256, seed)
    planned = retried = reclaimed = pending = 0
    for planning_pass in range(1, PLANNING_PASSES + 1):
        rule_checks = {}
        if phase in PAIR_PHASES:
            # Rules run before the lock is taken: they are user-supplied patterns.
            with session_scope(engine) as session:
                rule_checks = queue.check_pair_rules(
                    session, round_id, judge_id, rules_judge_id, *common[:2], phase, options.rules_first
                )
        with session_scope(engine) as session:
            repo.lock_round(session, round_id)  # concurrent workers plan one at a time
            if phase in PAIR_PHASES:
                made = queue.plan_judgments(
                    session,
                    round_id,
                    judge_id,
                    rules_judge_id,
                    *common,
                    rule_checks,
                    kind=phase,
                    rules_first=options.rules_first,
                    max_judge_pairs=options.max_judge_pairs,
                    principles_per_pair=LabelPolicy.of(config.params).principles_per_pair,
                )
                planned += made.created
                # Pairs added since the rules ran (by another worker) wait for another pass, or
                # for the next run if pairs keep coming.
                if made.deferred and planning_pass < PLANNING_PASSES:
                    continue
            else:
                planned += queue.plan_single(
                    session, round_id, judge_id, *common, first_sample_only=phase == "revise"
                )
            retried += queue.reset_failures(
                session, round_id, judge_id, every_failure=options.retry_failed, evaluation=evaluation
            )
            reclaimed += queue.release_dead_local_claims(session)
            pending = queue.pending_count(session, round_id, judge_id, evaluation)
            break
    return PhasePlan(judge_id, rules_judge_id, stored.constitution, pending, planned, retried, reclaimed)


def first_phase(mode: str, round_kind: str) -> str:
    """The phase a mode starts with: the only one that can be planned before any judging."""
    if mode in ("score", "revise"):
        return mode
    return "revision" if round_kind == "sl" else "sample"  # an SL round's pairs are its chains'


async def _phase(
    engine: Engine,
    round_id: int,
    backend: ChatBackend,
    templates: TemplateSet,
    options: JudgeOptions,
    runner: Runner,
    result: RoundJudgement,
    claimant: Claimant,
    config: judges.JudgeConfig,
    phase: str,
) -> bool:
    """phase: 'sample', 'revision' or 'eval' (pairs of that kind, judged pairwise), 'score' or
    'revise'. Returns True when it stopped early (budget, or asked to)."""
    evaluation = phase == EVAL_KIND
    plan = plan_phase(engine, round_id, options, config, phase)
    result.planned += plan.planned
    result.retried += plan.retried
    result.reclaimed += plan.reclaimed
    judge_id, rules_judge_id, pending = plan.judge_id, plan.rules_judge_id, plan.pending
    with session_scope(engine) as session:
        recall_features(session, judge_id, backend)
    mode = "pairwise" if phase in PAIR_PHASES else phase
    run = JudgeRun(
        engine,
        round_id,
        judge_id,
        plan.constitution,
        backend,
        templates,
        options,
        mode=mode,
        evaluation=evaluation,
        worker=claimant.worker,
        should_stop=claimant.should_stop,
    )
    stats = await runner(run, pending, phase)
    _merge(result.stats, stats)
    with session_scope(engine) as session:
        remember_features(session, judge_id, backend)
        repo.lock_round(session, round_id)  # another worker may be aggregating the same pairs
        if phase == "score":
            labels.aggregate_scores(session, round_id, judge_id)
        elif phase in ("sample", "revision"):
            labels.aggregate_labels(session, round_id, judge_id, rules_judge_id, plan.constitution)
    return stats.stopped_by_budget or stats.stopped_on_request


async def judge_evaluation(
    engine: Engine,
    round_id: int,
    spec: JudgeSpec,
    backend: ChatBackend,
    templates: TemplateSet,
    options: JudgeOptions,
    claimant: Claimant,
    runner: Runner = plain_runner,
) -> RoundJudgement:
    """Judge the round's evaluation pairs pairwise, in both orders, with the labeling judge's
    identity; no labels are made (cai.evaluate tallies the verdicts)."""
    result = RoundJudgement(labels.JudgeSummary(0, 0, 0, 0, 0, 0, 0, 0, 0.0), RunStats(), 0, 0, 0)
    await _phase(
        engine,
        round_id,
        backend,
        templates,
        options,
        runner,
        result,
        claimant,
        spec.config("pairwise", templates),
        "eval",
    )
    return result


def recall_features(session: Session, judge_id: int, backend: ChatBackend) -> None:
    """Start a backend that negotiates with its server (OpenAIChat) from what the endpoint
    accepted last time for this judge, unless it has negotiated already in this process."""
    features, base_url = getattr(backend, "features", None), getattr(backend, "base_url", None)
    if isinstance(features, EndpointFeatures) and base_url and features == EndpointFeatures():
        stored = judges.endpoint_features(session, judge_id, base_url)
        if stored is not None:
            backend.features = EndpointFeatures.from_json(stored)  # type: ignore[attr-defined]


def remember_features(session: Session, judge_id: int, backend: ChatBackend) -> None:
    features, base_url = getattr(backend, "features", None), getattr(backend, "base_url", None)
    if isinstance(features, EndpointFeatures) and base_url:
        judges.remember_endpoint_features(session, judge_id, base_url, features.as_json())


def _merge(total: RunStats, more: RunStats) -> None:
    total.judged += more.judged
    total.failed += more.failed
    total.spent_usd += more.spent_usd
    total.stopped_by_budget |= more.stopped_by_budget
    total.stopped_on_request |= more.stopped_on_request
    total.last_error = more.last_error or total.last_error
    total.wall_s += more.wall_s
    for kind, count in more.errors.items():
        total.errors[kind] = total.errors.get(kind, 0) + count


def require_calibration(
    session: Session, spec: JudgeSpec, templates: TemplateSet, round_id: int, minimum: float
) -> None:
    """Refuse a judge whose latest calibration under the round's constitution (of its pairwise
    verdicts, whatever the mode) is missing or below `minimum`."""
    constitution_id = repo.get_round(session, round_id).constitution_id
    judge_id = judges.ensure_judge(session, spec.config("pairwise", templates))
    record = judges.latest_calibration(session, judge_id, constitution_id)
    if record is None:
        raise BadInput(
            f"min_calibration: judge {spec.model!r} has no calibration for this constitution; "
            "run `cai judge calibrate` first"
        )
    if record.accuracy < minimum:
        raise BadInput(
            f"min_calibration: judge {spec.model!r} scored {record.accuracy:.2f} on the gold set "
            f"(consistency {record.consistency:.2f}), below {minimum:.2f}; use a stronger judge"
        )
