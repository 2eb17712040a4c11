"""The judge stage (a round's pairs, in both orders, under sampled principles, then labels) and
calibration (the judge on the gold pairs and injection canaries). Several workers may judge one
round at once: each claims its own judgments."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from cai.calibrate import CalibrationReport, default_canaries, default_gold, load_pairs
from cai.calibrate import calibrate as run_calibration_pairs
from cai.constitution import parse_ref
from cai.judge_round import Claimant, RoundJudgement, Runner, require_calibration
from cai.judge_round import judge_round as judge_all_phases
from cai.judging import JudgeRun, RunStats
from cai.stages.progress import Progress, Silent, Stopped
from cai.stages.settings import CalibrateSettings, JudgeEndpoint, JudgeSettings
from cai.stages.status import Event, Stage, advance, failure_recorded
from cai.store import judges, repo
from cai.workspace import Judge, Workspace

T = TypeVar("T")
PHASE_LABELS = {"sample": "judging pairs", "revision": "judging revisions", "eval": "judging eval pairs"}


class JudgeUnreachable(RuntimeError):
    """No judge request of a run succeeded: every one failed in transport."""


def check_reachable(stats: RunStats, what: str = "requests") -> None:
    """Raise JudgeUnreachable when no request of the run got an answer from the judge."""
    if stats.unreachable:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(stats.errors.items()))
        raise JudgeUnreachable(
            f"the judge answered none of {stats.failed} {what} ({errors}); last error: {stats.last_error}"
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


def run_judge(
    ws: Workspace, round_id: int, settings: JudgeSettings, progress: Progress | None = None
) -> RoundJudgement:
    """Judge the round in `settings.mode`; the round is `judged` once no judgment is pending.
    Fails (round `failed`, resumable) when the judge answered none of its requests."""
    progress = progress or Silent()
    with ws.session() as session:
        repo.get_round(session, round_id)  # unknown round: bad input, before any model loads
    judge = open_judge(ws, settings, progress)
    if settings.min_calibration is not None:
        with ws.session() as session:
            require_calibration(session, judge.spec, judge.templates, round_id, settings.min_calibration)
    with ws.session() as session:
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
                ws.leased(settings.options()),
                Claimant(ws.worker_id, progress.stop_requested),
                settings.mode,
                progress_runner(progress, round_id),
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
    judge and constitution version, for `min_calibration`."""
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
        ),
    )
    with ws.session() as session:
        judge_id = judges.ensure_judge(session, config)
        judges.save_calibration(session, judge_id, stored.record.id, report)
    return Calibration(config.model, stored.record.ref, report)
