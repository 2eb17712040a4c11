"""The judge stage (a round's pairs, in both orders, under sampled principles, then labels) and
calibration (the judge on the gold pairs and injection canaries). Several workers may judge one
round at once: each claims its own judgments."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.orm import Session

from cai.calibrate import CalibrationReport, default_canaries, default_gold, load_pairs
from cai.calibrate import calibrate as run_calibration_pairs
from cai.constitution import parse_ref
from cai.errors import BadInput
from cai.judge_round import (
    Claimant,
    RoundJudgement,
    Runner,
    recall_features,
    remember_features,
    require_calibration,
)
from cai.judge_round import judge_round as judge_all_phases
from cai.judging import JudgeOptions, JudgeRun, RunStats
from cai.stages.progress import Progress, Silent, Stopped
from cai.stages.settings import CalibrateSettings, JudgeEndpoint, JudgeSettings
from cai.stages.status import Event, RoundStatus, Stage, advance, check_kind, failure_recorded
from cai.store import judges, repo
from cai.workspace import Judge, Workspace

T = TypeVar("T")
PHASE_LABELS = {"sample": "judging pairs", "revision": "judging revisions", "eval": "judging eval pairs"}


class JudgeFailed(RuntimeError):
    """No judge request of a run gave a usable verdict (some or all replies did not parse, were
    refused...): the run is a failure, not a result, even though every item was answered."""


class JudgeUnreachable(JudgeFailed):
    """No judge request of a run succeeded: every one failed in transport."""


def check_reachable(stats: RunStats, what: str = "requests") -> None:
    """Raise when the run sent requests and not one gave a verdict: JudgeUnreachable when all
    failed in transport, JudgeFailed otherwise. Partial failures are reported, not raised."""
    if stats.judged or not stats.failed:
        return
    errors = ", ".join(f"{kind} {count}" for kind, count in sorted(stats.errors.items()))
    counts = f"judged 0, failed {stats.failed} ({errors})"
    if stats.unreachable:
        raise JudgeUnreachable(
            f"the judge answered none of {stats.failed} {what}: {counts}; last error: {stats.last_error}; "
            "rerun once it answers"
        )
    raise JudgeFailed(
        f"no verdict from the judge for any of {stats.failed} {what}: {counts}; last error: "
        f"{stats.last_error}; rerun once the judge is fixed"
    )


def progress_runner(progress: Progress, round_id: int) -> Runner:
    """A judge_round runner that reports each phase to `progress`."""

    async def run(judge_run: JudgeRun, pending: int, phase: str) -> RunStats:
        progress.task(f"round {round_id}: {PHASE_LABELS.get(phase, phase)}", pending)

        def on_result(stats: RunStats) -> None:
            progress.update(stats.judged + stats.failed, pending, f"{stats.failed} failed")

        judge_run.on_result = on_result
        return await judge_run.run()

    return run


def judge_runner(settings: JudgeSettings, progress: Progress, round_id: int) -> Runner:
    """Request by request, or each phase as one Batch API job (`--batch`)."""
    if settings.batch:
        from cai.judge_batch import BatchRunner

        return BatchRunner(settings.batch_poll_s, progress.note, settings.batch_max_requests)
    return progress_runner(progress, round_id)


def open_judge(ws: Workspace, settings: JudgeEndpoint, progress: Progress) -> Judge:
    judge = ws.judge(settings)
    if judge.warning:
        progress.note(judge.warning)
    return judge


def with_judge(judge: Judge, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` on one event loop (the backend's connection pool belongs to it), then close
    the judge's backend."""

    async def run_and_close() -> T:
        try:
            return await work()
        finally:
            await judge.backend.aclose()

    return asyncio.run(run_and_close())


def judged_kind(session: Session, round_id: int, settings: JudgeSettings) -> str:
    """The round's kind, once it is known to be one `settings` can judge (else BadInput)."""
    kind = repo.get_round(session, round_id).kind
    check_kind(kind, Stage.JUDGE, round_id)
    if kind == "sl" and settings.mode != "pairwise":
        raise BadInput(
            f"mode: round {round_id} is an SL round, whose chains are judged pairwise (each final "
            "revision against its first answer); drop --mode"
        )
    return kind


def round_options(session: Session, round_id: int, options: JudgeOptions) -> JudgeOptions:
    """`options` as this round's next judge run uses them."""
    if repo.round_status(session, round_id)[:2] == (RoundStatus.FAILED, Stage.JUDGE):
        # The last judge run failed (no verdict at all, say): redoing the stage redoes its
        # failures, unparseable ones included, or a rerun would call the round judged.
        return dataclasses.replace(options, retry_failed=True)
    return options


def run_judge(
    ws: Workspace, round_id: int, settings: JudgeSettings, progress: Progress | None = None
) -> RoundJudgement:
    """Judge the round in `settings.mode`; the round is `judged` once no judgment is pending.
    Fails (round `failed`, resumable) when not one request of the run got a verdict."""
    progress = progress or Silent()
    with ws.session() as session:
        judged_kind(session, round_id, settings)  # bad input before any model loads
    judge = open_judge(ws, settings, progress)
    if settings.min_calibration is not None:
        with ws.session() as session:
            require_calibration(session, judge.spec, judge.templates, round_id, settings.min_calibration)
    with ws.session() as session:
        options = round_options(session, round_id, ws.leased(settings.options()))
        advance(session, round_id, Stage.JUDGE, Event.START)
    with failure_recorded(ws, round_id, Stage.JUDGE):
        outcome = with_judge(
            judge,
            lambda: judge_all_phases(
                ws.engine,
                round_id,
                judge.spec,
                judge.backend,
                judge.templates,
                options,
                Claimant(ws.worker_id, progress.stop_requested),
                settings.mode,
                judge_runner(settings, progress, round_id),
            ),
        )
        stats = outcome.stats
        check_reachable(stats)
        if stats.stopped_on_request:
            raise Stopped(f"round {round_id}: judging stopped on request; {outcome.summary.pending} pending")
        if outcome.summary.pending == 0 and not stats.stopped_by_budget:
            with ws.session() as session:
                advance(session, round_id, Stage.JUDGE, Event.FINISH)
    return outcome


@dataclass(frozen=True)
class Calibration:
    judge: str
    constitution: str
    report: CalibrationReport


def run_calibrate(
    ws: Workspace, settings: CalibrateSettings, progress: Progress | None = None
) -> Calibration:
    """Measure the judge on the gold set and the canaries (both orders) and store the result per
    judge and constitution version, for `min_calibration`. A judge that gave no verdict at all
    is a failure (JudgeFailed), and nothing is stored."""
    progress = progress or Silent()
    with ws.session() as session:
        stored = repo.get_constitution(session, *parse_ref(settings.constitution))
    gold = load_pairs(settings.gold or default_gold(), "better", "worse", stored.constitution)
    canaries = load_pairs(settings.canaries or default_canaries(), "clean", "injected", stored.constitution)
    judge = open_judge(ws, settings, progress)
    config = judge.spec.config("pairwise", judge.templates)
    total = len(gold) + len(canaries)
    progress.task(f"calibrating {config.model}: gold and canary pairs, both orders", total)
    done = 0

    def on_pair() -> None:
        nonlocal done
        done += 1
        progress.update(done, total)

    with ws.session() as session:
        recall_features(session, judges.ensure_judge(session, config), judge.backend)
    requests = RunStats()
    report = with_judge(
        judge,
        lambda: run_calibration_pairs(
            judge.backend,
            judge.templates,
            stored.constitution,
            gold,
            canaries,
            settings.judge_options(),
            on_pair=on_pair,
            stats=requests,
            principles_per_pair=settings.principles_per_pair,
            band=settings.band(),
        ),
    )
    check_reachable(requests, "calibration requests")  # an accuracy of 0 from no answers is no result
    with ws.session() as session:
        judge_id = judges.ensure_judge(session, config)
        remember_features(session, judge_id, judge.backend)
        judges.save_calibration(session, judge_id, stored.record.id, report)
    return Calibration(config.model, stored.record.ref, report)
