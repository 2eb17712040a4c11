"""The loop driver: rounds of generate -> judge -> export -> train -> eval, each round starting from
the policy the previous one trained (after an SL round, if the chain has one: revise -> export
-> sft, whose model the first preference round starts from). The round's stored status (cai.stages.status) decides where
a rerun resumes; every stage skips what is stored, so nothing is redone."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from cai.errors import BadInput
from cai.stages.evaluate import run_eval
from cai.stages.export import default_snapshot_dir, run_export
from cai.stages.generate import run_generate
from cai.stages.judge import run_judge
from cai.stages.progress import Progress, Silent, check
from cai.stages.revise import run_revise
from cai.stages.settings import LoopSettings
from cai.stages.sft import run_sft
from cai.stages.status import FINISHED_BY, Stage, steps_left
from cai.stages.train import default_run_dir, run_train
from cai.store import progress as chain
from cai.store import repo
from cai.store.progress import RoundSummary
from cai.workspace import Workspace

Trainer = Callable[[Workspace, int, Any, Progress], dict[str, Any]]
"""Runs the train stage: in-process (run_train), or launched on several devices by a worker."""


class LoopStopped(Exception):
    """A stage ended without finishing its round's part (budget, pending work)."""


def run_loop(
    ws: Workspace,
    rounds: int,
    from_round: int | None,
    settings: LoopSettings,
    progress: Progress | None = None,
    train: Trainer = run_train,
) -> list[RoundSummary]:
    """Walk (and extend) the chain of rounds that starts at `from_round` (default: the newest
    round that continues no other) until it has `rounds` rounds, finishing each; returns their
    summaries. `train` runs the train stage (a worker may launch it on several devices)."""
    progress = progress or Silent()
    with ws.session() as session:
        first = from_round if from_round is not None else chain.latest_first_round(session)
        if first is None:
            raise BadInput("no rounds yet: start one (cai round start -c NAME@VERSION), then run the loop")
        head = repo.get_round(session, first)  # unknown id: bad input
        if settings.sl_first and head.kind == "rl":
            first = chain.supervised_round_before(session, first)
            if first != head.id:
                progress.note(f"SL round {first} runs first; round {head.id} will start from its SFT model")
    done: list[int] = []
    rl_rounds = 0
    seconds: dict[int, dict[str, float]] = {}
    current: int | None = first
    # An SL round is the chain's prelude: `rounds` counts the preference rounds after it.
    while current is not None and rl_rounds < rounds:
        done.append(current)
        seconds[current] = finish_round(ws, current, settings, progress, train)
        with ws.session() as session:
            rl_rounds += repo.get_round(session, current).kind == "rl"
            if rl_rounds == rounds:
                break
            previous, current = current, chain.next_round(session, current)
            if current is None:
                current = chain.start_next_round(session, previous)
                progress.note(f"round {current} started from round {previous}'s trained policy")
            else:
                chain.follow_trained_policy(session, current, previous)
    with ws.session() as session:
        return [
            dataclasses.replace(chain.round_summary(session, round_id), stage_seconds=seconds[round_id])
            for round_id in done
        ]


def finish_round(
    ws: Workspace,
    round_id: int,
    settings: LoopSettings,
    progress: Progress,
    train: Trainer = run_train,
) -> dict[str, float]:
    """Run the stages `round_id` has left; returns each one's wall time in seconds."""
    with ws.session() as session:
        round_ = repo.get_round(session, round_id)
    todo = steps_left(round_.status, round_.failed_step, round_.kind)
    if todo:
        progress.note(f"round {round_id}: {round_.status} -> {' -> '.join(todo)}")
    seconds: dict[str, float] = {}
    for stage in todo:
        check(progress, f"before round {round_id}'s {stage} stage")
        started = time.perf_counter()
        _run_stage(ws, round_id, stage, settings, progress, train)
        seconds[str(stage)] = time.perf_counter() - started
        with ws.session() as session:
            status = repo.get_round(session, round_id).status
        if status != FINISHED_BY[stage]:
            raise LoopStopped(
                f"round {round_id}: {stage} stopped with the round at '{status}' "
                "(see the messages above); run the loop again to resume"
            )
    return seconds


def _run_stage(
    ws: Workspace,
    round_id: int,
    stage: Stage,
    s: LoopSettings,
    progress: Progress,
    train: Trainer,
) -> None:
    if stage is Stage.GENERATE:
        stats = run_generate(ws, round_id, s.generate, progress)
        progress.note(f"round {round_id}: {stats.sampled} sampled, {stats.pairs_added} new pairs")
    elif stage is Stage.JUDGE:
        summary = run_judge(ws, round_id, s.judge, progress).summary
        progress.note(
            f"round {round_id}: {summary.labeled} labels ({summary.ties} ties), {summary.failed} failed judgments"
        )
    elif stage is Stage.EXPORT:
        export = s.export.model_copy(update={"out": default_snapshot_dir(round_id, s.artifacts)})
        result = run_export(ws, round_id, export, progress)
        counts = result.manifest["counts"]
        progress.note(
            f"round {round_id}: snapshot {result.path} (train {counts['train']}, eval {counts['eval']})"
        )
    elif stage is Stage.REVISE:
        revised = run_revise(ws, round_id, s.revise, progress)
        progress.note(
            f"round {round_id}: {revised.steps_done} revisions, {revised.steps_failed} unusable, "
            f"{revised.chains_complete} chains complete"
        )
    elif stage is Stage.SFT_EXPORT:
        export = s.sft_export.model_copy(update={"out": default_snapshot_dir(round_id, s.artifacts)})
        counts = run_export(ws, round_id, export, progress).manifest["counts"]
        progress.note(f"round {round_id}: SFT snapshot (train {counts['train']}, eval {counts['eval']})")
    elif stage is Stage.SFT:
        tuned = s.sft.model_copy(update={"output": default_run_dir(round_id, s.artifacts)})
        tuned_run = run_sft(ws, round_id, tuned, progress)
        progress.note(f"round {round_id}: SFT {tuned_run['steps']} steps -> policy {tuned_run['policy_id']}")
    elif stage is Stage.TRAIN:
        trained = s.train.model_copy(update={"output": default_run_dir(round_id, s.artifacts)})
        summary_ = train(ws, round_id, trained, progress)
        progress.note(
            f"round {round_id}: trained {summary_['steps']} steps -> policy {summary_['policy_id']}"
        )
    else:
        record = run_eval(ws, round_id, s.eval, progress).record
        progress.note(f"round {round_id}: eval win {record.wins} / tie {record.ties} / loss {record.losses}")
