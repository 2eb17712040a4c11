"""The sft stage of an SL round: TRL's SFTTrainer on the round's SFT snapshot; the result is
registered as a policy whose lineage names the round's snapshot, and the RL rounds that follow
start from it (and take it as the reference with `cai train --reference sft`)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai.stages.progress import Progress, Silent
from cai.stages.settings import SftSettings
from cai.stages.status import Event, Stage, advance, check_kind
from cai.stages.train import default_run_dir, snapshot_to_train, tracked_run_of, train_and_register
from cai.store import repo, training
from cai.workspace import Workspace

if TYPE_CHECKING:
    from cai.train import OnLog, TrainResult


def run_sft(
    ws: Workspace, round_id: int, settings: SftSettings, progress: Progress | None = None
) -> dict[str, Any]:
    """Fine-tune the round's policy on its final revisions and register the result; returns a
    summary of the run. A killed or stopped run resumes from its last complete checkpoint."""
    from cai.backends import policy_location
    from cai.sft import train_sft
    from cai.sft_export import SFT_FORMAT

    progress = progress or Silent()
    config = settings.sft
    with ws.session() as session:
        round_ = repo.get_round(session, round_id)
        check_kind(round_.kind, Stage.SFT, round_id)
        policy = repo.get_policy(session, round_.policy)
        snapshot_dir, digest, snapshot_id = snapshot_to_train(
            session, round_id, settings.snapshot, SFT_FORMAT
        )
        output_dir = (settings.output or default_run_dir(round_id)).resolve()
        settings_json = config.model_dump(mode="json") | {"method": "sft"}
        run_id, resumed = training.start_or_resume_run(
            session, round_id, snapshot_id, policy.id, settings_json, str(output_dir), method="sft"
        )
        advance(session, round_id, Stage.SFT, Event.START)
        tracked = tracked_run_of(session, round_, policy.id, "sft", digest, run_id)
    policy_dir = Path(policy_location(policy.name, policy.model_ref, ws.cache_dir))
    progress.note(f"SFT run {run_id}{' (resuming)' if resumed else ''}: {policy.name} on {snapshot_dir}")
    progress.task(f"round {round_id}: SFT")

    def train(on_log: OnLog) -> TrainResult:
        # transformers' progress callback prints logs to stdout; keep stdout for --json.
        with contextlib.redirect_stdout(sys.stderr):
            return train_sft(snapshot_dir, policy_dir, output_dir, config, on_log, tracked)

    return train_and_register(
        ws, round_, policy, Stage.SFT, "sft", run_id, digest, settings_json, progress, train
    )
