"""`cai revise` and `cai sft`: the supervised stage of Constitutional AI (SL-CAI) on an SL round,
as thin adapters over cai.stages.revise and cai.stages.sft."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from cai.cli.app import JSON_OPTION, RichProgress, out, print_json, quiet_libraries, workspace
from cai.cli.flags import Flags, with_settings
from cai.cli.jobs import SUBMIT_OPTION, submit
from cai.sft import SftConfig, load_sft_config
from cai.stages.settings import SFT_FLAGS, SFT_HELP, ReviseSettings, SftSettings


@with_settings(settings=Flags(ReviseSettings))
def revise(
    ctx: typer.Context,
    round_id: int = typer.Option(..., "--round", "-r", metavar="ID", show_default=False),
    *,
    settings: ReviseSettings,
    submit_job: bool = SUBMIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Critique-revision chains on an SL round (cai round start --sl): the round's policy answers
    each train prompt, then critiques and revises its answer --revisions times, each time under a
    principle drawn by weight. Every step is stored (principle, critique, revision, model and
    template hashes). Resumable: a rerun continues every chain at its first step not done."""
    from dataclasses import asdict

    from cai.stages.revise import run_revise

    if submit_job:
        submit(ctx, "revise", round_id, settings)
        return
    with RichProgress() as progress:
        stats = run_revise(workspace(ctx), round_id, settings, progress)
    if as_json:
        print_json(asdict(stats))
        return
    out.print(
        f"round {round_id}: {stats.prompts} prompts, {stats.answered} first answers sampled, "
        f"{stats.steps_done} steps done, {stats.steps_failed} unusable revisions "
        f"(their chains end before them); {stats.chains_complete} chains complete",
        highlight=False,
    )


@with_settings(
    settings=Flags(SftSettings),
    sft_overrides=Flags(SftConfig, only=tuple(SFT_FLAGS), rename=SFT_FLAGS, overrides=True, help=SFT_HELP),
)
def sft(
    ctx: typer.Context,
    round_id: int = typer.Option(..., "--round", "-r", metavar="ID", show_default=False),
    config_file: Path = typer.Option(
        None, "--config", help="YAML/JSON with SFT settings (see cai.sft.SftConfig)."
    ),
    *,
    settings: SftSettings,
    sft_overrides: dict[str, Any],
    submit_job: bool = SUBMIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Fine-tune an SL round's policy on its final revisions (TRL's SFTTrainer; the loss covers the
    revision only unless --full-loss). Per-step metrics go to the database; a killed run resumes
    from its last complete checkpoint. The result is registered as a policy whose lineage names
    the round's snapshot: `cai loop` starts the RL rounds from it, and `cai train --reference sft`
    takes it as the DPO reference."""
    from cai.stages.sft import run_sft

    settings = SftSettings(
        sft=load_sft_config(config_file, **sft_overrides), **settings.model_dump(exclude={"sft"})
    )
    if submit_job:
        submit(ctx, "sft", round_id, settings)
        return
    quiet_libraries()
    with RichProgress() as progress:
        summary = run_sft(workspace(ctx), round_id, settings, progress)
    if as_json:
        print_json(summary)
        return
    loss = summary["metrics"].get("train_loss")
    out.print(
        f"round {round_id}: SFT {summary['steps']} steps -> policy {summary['policy_id']} at {summary['model_dir']}"
        + (f"; train loss {loss:.3f}" if loss is not None else ""),
        highlight=False,
    )
