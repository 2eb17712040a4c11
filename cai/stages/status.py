"""The round's state machine: its statuses, the stages that move it, and the one transition
function every stage goes through. A stage *starts* (the round enters the stage's running
status), *finishes* (its done status) or *fails* (`failed`, with the stage and the reason, so a
rerun resumes there). Every stage skips the work it finds stored, so resuming redoes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from cai.errors import BadInput
from cai.stages.progress import Stopped
from cai.store import repo

if TYPE_CHECKING:
    from cai.workspace import Workspace


class RoundStatus(StrEnum):
    CREATED = "created"
    REVISING = "revising"
    REVISED = "revised"
    GENERATING = "generating"
    GENERATED = "generated"
    JUDGING = "judging"
    JUDGED = "judged"
    EXPORTED = "exported"
    TRAINING = "training"
    TRAINED = "trained"
    EVALUATING = "evaluating"
    DONE = "done"
    FAILED = "failed"


class Stage(StrEnum):
    GENERATE = "generate"
    JUDGE = "judge"
    EXPORT = "export"
    TRAIN = "train"
    EVAL = "eval"
    REVISE = "revise"
    SFT_EXPORT = "sft-export"
    SFT = "sft"


class Event(StrEnum):
    START = "start"
    FINISH = "finish"
    FAIL = "fail"


STEPS: tuple[Stage, ...] = (Stage.GENERATE, Stage.JUDGE, Stage.EXPORT, Stage.TRAIN, Stage.EVAL)
"""A preference ('rl') round's stages in the order the loop runs them."""
SL_STEPS: tuple[Stage, ...] = (Stage.REVISE, Stage.SFT_EXPORT, Stage.SFT)
"""A supervised ('sl') round's stages: critique-revision chains, their SFT snapshot, SFT."""
STEPS_OF_KIND = {"rl": STEPS, "sl": SL_STEPS}
OPTIONAL_STEPS = {"rl": (), "sl": (Stage.JUDGE,)}
"""Stages a round of the kind may run without its status moving: an SL round's judge confirms
(or not) that each chain's final revision beats its first answer."""

S = RoundStatus
STAGE_STATUSES: dict[Stage, tuple[RoundStatus, RoundStatus, RoundStatus]] = {
    # stage: (status it starts from at the earliest, status while it runs, status when done)
    Stage.GENERATE: (S.CREATED, S.GENERATING, S.GENERATED),
    Stage.JUDGE: (S.GENERATED, S.JUDGING, S.JUDGED),
    # Export takes a moment and has no running status: it finishes from `judged`.
    Stage.EXPORT: (S.JUDGED, S.JUDGED, S.EXPORTED),
    Stage.TRAIN: (S.EXPORTED, S.TRAINING, S.TRAINED),
    Stage.EVAL: (S.TRAINED, S.EVALUATING, S.DONE),
    Stage.REVISE: (S.CREATED, S.REVISING, S.REVISED),
    Stage.SFT_EXPORT: (S.REVISED, S.REVISED, S.EXPORTED),
    # An SL round ends when its SFT model is registered: there is no eval stage of its own (the
    # RL rounds that start from that model evaluate against it).
    Stage.SFT: (S.EXPORTED, S.TRAINING, S.DONE),
}
NO_RUNNING_STATUS = (Stage.EXPORT, Stage.SFT_EXPORT)
PROGRESS_ORDER = (
    S.CREATED,
    S.REVISING,
    S.REVISED,
    S.GENERATING,
    S.GENERATED,
    S.JUDGING,
    S.JUDGED,
    S.EXPORTED,
    S.TRAINING,
    S.TRAINED,
    S.EVALUATING,
    S.DONE,
)
RANK = {status: rank for rank, status in enumerate(PROGRESS_ORDER)}
FINISHED_BY = {stage: done for stage, (_, _, done) in STAGE_STATUSES.items()}
KIND_NAMES = {"rl": "preference (RL-CAI)", "sl": "supervised (SL-CAI)"}
"""The status a stage leaves when it completed; anything else means it stopped early."""


def transition(
    current: RoundStatus, stage: Stage, event: Event, failed_step: Stage | None = None
) -> RoundStatus | None:
    """The round's status after `event` of `stage`, or None when it stays as it is.

    A failed round counts as being in its failed stage. Running a stage the round is already
    past (judging again in another mode, exporting again) never moves it back, and such a rerun
    failing does not mark the round failed. A stage may start before its predecessor finished
    (its own work decides what there is to do), but it finishes only from its running status."""
    _, running, done = STAGE_STATUSES[stage]
    effective = current
    if current is RoundStatus.FAILED:
        # A failure recorded without its stage (an older cai) starts over; nothing is redone.
        effective = STAGE_STATUSES[failed_step][1] if failed_step else RoundStatus.CREATED
    if RANK[effective] > RANK[done]:
        return None
    if event is Event.START:
        if current is RoundStatus.FAILED:
            return running
        # Export has no running status of its own (its "running" is the status it starts from).
        return None if stage in NO_RUNNING_STATUS or effective is running else running
    if event is Event.FINISH:
        return done if effective is running else None
    return RoundStatus.FAILED


def steps_left(status: str, failed_step: str | None = None, kind: str = "rl") -> list[Stage]:
    """The stages still to run for a round of `kind` in `status`, in order (a failed round
    resumes at the stage that failed)."""
    steps = STEPS_OF_KIND[kind]
    try:
        current = RoundStatus(status)
    except ValueError:
        raise ValueError(f"unknown round status {status!r}") from None
    if current is RoundStatus.DONE:
        return []
    if current is RoundStatus.FAILED:
        first = Stage(failed_step) if failed_step else steps[0]
    else:
        first = next(s for s in steps if RANK[current] <= RANK[STAGE_STATUSES[s][1]])
    return list(steps[steps.index(first) :])


def check_kind(kind: str, stage: Stage, round_id: int) -> None:
    """Refuse a stage that is not one of the round kind's (sampling pairs on an SL round, say)."""
    if stage not in STEPS_OF_KIND[kind] and stage not in OPTIONAL_STEPS[kind]:
        commands = {"rl": "generate, judge, export, train, eval", "sl": "revise, export --kind sft, sft"}
        command = {Stage.EXPORT: "export --kind dpo", Stage.SFT_EXPORT: "export --kind sft"}.get(stage, stage)
        raise BadInput(
            f"round {round_id} is a {KIND_NAMES[kind]} round: its stages are cai {commands[kind]}, "
            f"not cai {command}"
        )


def advance(session: Session, round_id: int, stage: Stage, event: Event, error: str | None = None) -> str:
    """Apply `event` of `stage` to the stored round (under the round's lock); returns its status.
    Failing records the stage and `error`; leaving `failed` clears them."""
    repo.lock_round(session, round_id)
    current, failed_step, kind = repo.round_status(session, round_id)
    check_kind(kind, stage, round_id)
    if stage in OPTIONAL_STEPS[kind]:
        return current
    status = RoundStatus(current)
    new = transition(status, stage, event, Stage(failed_step) if failed_step else None)
    if new is None:
        return current
    if new is RoundStatus.FAILED:
        repo.set_round_status(session, round_id, new, error=error or "failed", failed_step=stage)
    else:
        repo.set_round_status(session, round_id, new)
    return new


@contextmanager
def failure_recorded(ws: Workspace, round_id: int, stage: Stage) -> Iterator[None]:
    """Run a stage's work; if it raises, the round is marked failed at `stage` with the reason
    (bad input and a requested stop are not failures: they change nothing, or resume)."""
    try:
        yield
    except (BadInput, Stopped):
        raise
    except Exception as exc:
        with ws.session() as session:
            advance(session, round_id, stage, Event.FAIL, f"{type(exc).__name__}: {exc}")
        raise
