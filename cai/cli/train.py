"""`cai train`: a thin adapter over the train stage (cai.stages.train): DPO on a round's snapshot
with TRL; the result is registered as the next policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from cai.cli.app import JSON_OPTION, RichProgress, out, print_json, quiet_libraries, workspace
from cai.cli.flags import Flags, with_settings
from cai.cli.jobs import SUBMIT_OPTION, submit
from cai.stages.settings import TRAIN_FLAGS, TRAIN_HELP, TrainSettings
from cai.train import TrainConfig


def train_config_flags(
    rename: dict[str, tuple[str, ...]] | None = None, only: tuple[str, ...] | None = None
) -> Flags:
    """The DPO settings a command exposes as flags, merged over a config file's."""
    return Flags(
        TrainConfig,
        only=only or tuple(TRAIN_FLAGS),
        rename=TRAIN_FLAGS | (rename or {}),
        overrides=True,
        help=TRAIN_HELP,
    )


def train_settings(config_file: Path | None, overrides: dict[str, Any], **rest: Any) -> TrainSettings:
    """TrainSettings with the config file's DPO settings and the flags given on top."""
    from cai.train import load_config

    return TrainSettings(dpo=load_config(config_file, **overrides), **rest)


@with_settings(settings=Flags(TrainSettings), dpo=train_config_flags())
def train(
    ctx: typer.Context,
    round_id: int = typer.Option(..., "--round", "-r", metavar="ID", show_default=False),
    config_file: Path = typer.Option(
        None, "--config", help="YAML/JSON with DPO settings (see cai.train.TrainConfig)."
    ),
    *,
    settings: TrainSettings,
    dpo: dict[str, Any],
    submit_job: bool = SUBMIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Train the round's policy with DPO on its snapshot (reference: the round's starting policy,
    or --reference sft). Per-step metrics go to the database; a killed run resumes from its last
    complete checkpoint when run again (one a kill cut short is moved to
    OUTPUT/incomplete-checkpoints/); the result becomes policy p_{r+1} with its lineage."""
    from cai.stages.train import run_train

    settings = train_settings(config_file, dpo, **settings.model_dump(exclude={"dpo"}))
    if submit_job:
        submit(ctx, "train", round_id, settings)
        return
    quiet_libraries()
    with RichProgress() as progress:
        summary = run_train(workspace(ctx), round_id, settings, progress)
    if summary.get("worker_rank"):
        return  # another process of a multi-process launch: rank 0 reports the run
    if as_json:
        print_json(summary)
        return
    accuracy = summary["last_step"].get("rewards/accuracies")
    margin = summary["last_step"].get("rewards/margins")
    out.print(
        f"round {round_id}: trained {summary['steps']} steps -> policy {summary['policy_id']} "
        f"at {summary['model_dir']}"
        + (
            f"; last reward accuracy {accuracy:.2f}, margin {margin:.3f}"
            if accuracy is not None and margin is not None
            else ""
        ),
        highlight=False,
    )
