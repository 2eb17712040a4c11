"""`cai loop`: a thin adapter over the loop driver (cai.stages.loop): rounds of generate -> judge
-> export -> train -> eval, each round starting from the policy the previous one trained."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cai.cli.app import JSON_OPTION, RichProgress, out, print_json, quiet_libraries, workspace
from cai.cli.flags import Flags, with_settings
from cai.cli.jobs import SUBMIT_OPTION, submit
from cai.cli.train import train_config_flags, train_settings
from cai.sft import SftConfig, load_sft_config
from cai.stages.settings import (
    EvalSettings,
    ExportSettings,
    GenerateSettings,
    JudgeSettings,
    LoopJob,
    LoopSettings,
    ReviseSettings,
    SftSettings,
)

if TYPE_CHECKING:
    from cai.store.progress import RoundSummary

LOOP_JUDGE_FLAGS = Flags(
    JudgeSettings, exclude=("retry_failed", "budget", "price_in", "price_out", "min_calibration")
)
LOOP_TRAIN_FLAGS = train_config_flags(
    rename={"per_device_train_batch_size": ("--train-batch-size",)},
    only=(
        "max_steps",
        "num_train_epochs",
        "learning_rate",
        "beta",
        "per_device_train_batch_size",
        "max_length",
        "confidence_loss",
    ),
)


@with_settings(
    generate=Flags(GenerateSettings, exclude=("budget", "price_in", "price_out")),  # as the judge's
    judge=LOOP_JUDGE_FLAGS,
    evaluation=Flags(EvalSettings, only=("samples", "limit"), prefix="eval-"),
    export=Flags(ExportSettings, only=("min_confidence",)),
    dpo=LOOP_TRAIN_FLAGS,
    loop=Flags(LoopSettings, only=("artifacts", "sl_first")),
    revise=Flags(
        ReviseSettings,
        only=("revisions", "reviser_model", "reviser_base_url", "critique_max_tokens"),
        rename={"revisions": ("--revisions",)},  # -n is --samples here
    ),
    sft_overrides=Flags(
        SftConfig,
        only=("max_steps", "learning_rate"),
        rename={"max_steps": ("--sft-max-steps",), "learning_rate": ("--sft-lr",)},
        overrides=True,
        help={
            "max_steps": "SL round: stop SFT after N optimizer steps.",
            "learning_rate": "SL round: SFT learning rate.",
        },
    ),
)
def loop(
    ctx: typer.Context,
    rounds: int = typer.Option(
        ..., "--rounds", "-k", min=1, help="How many rounds the chain should have in all.", show_default=False
    ),
    from_round: int = typer.Option(
        None,
        "--from-round",
        metavar="ID",
        help="The chain's first round (default: the newest round that does not continue another).",
    ),
    train_config: Path = typer.Option(
        None, "--train-config", help="YAML/JSON DPO settings (cai.train.TrainConfig)."
    ),
    *,
    generate: GenerateSettings,
    judge: JudgeSettings,
    evaluation: EvalSettings,
    export: ExportSettings,
    dpo: dict[str, Any],
    loop: LoopSettings,
    revise: ReviseSettings,
    sft_overrides: dict[str, Any],
    submit_job: bool = SUBMIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Run rounds until the chain starting at --from-round has K finished rounds. Each round:
    generate -> judge -> export -> train -> eval; the next round samples from the policy this
    one trained. With --sl-first (or a chain that starts with an SL round), the supervised stage
    runs once before them: critique-revision chains -> SFT snapshot -> SFT, and the first RL
    round samples from the SFT model. Rerun the same command after a crash: every round resumes
    at its stored status and nothing stored is redone. Ends with a summary table per round."""
    from cai.stages.loop import run_loop

    settings = LoopSettings.compose(
        generate,
        judge,
        eval_samples=evaluation.samples,
        eval_limit=evaluation.limit,
        export=export,
        train=train_settings(train_config, dpo),
        artifacts=loop.artifacts,
        revise=revise,
        sft=SftSettings(sft=load_sft_config(None, **sft_overrides)),
        sl_first=loop.sl_first,
    )
    if submit_job:
        submit(ctx, "loop", from_round, LoopJob(rounds=rounds, loop=settings))
        return
    quiet_libraries()
    with RichProgress() as progress:
        summaries = run_loop(workspace(ctx), rounds, from_round, settings, progress)
    print_summaries(summaries, as_json)


def print_summaries(summaries: list[RoundSummary], as_json: bool) -> None:
    from dataclasses import asdict

    from rich.table import Table

    if as_json:
        print_json([asdict(s) | {"flip_rate": s.flip_rate} for s in summaries])
        return

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    def pair(values: tuple[float | None, float | None] | None, fmt: str) -> str:
        """parent -> trained"""
        if values is None or None in values:
            return "-"
        return f"{values[0]:{fmt}} -> {values[1]:{fmt}}"

    # Wall time per stage this run did, so that everyone sees where the time went; a stage an
    # earlier (resumed) run finished shows "-".
    stages_timed = list(dict.fromkeys(stage for s in summaries for stage in s.stage_seconds))
    if stages_timed:
        stages_timed.append("total")

    def stage_time(stage: str) -> Callable[[RoundSummary], str]:
        def cell(s: RoundSummary) -> str:
            seconds = sum(s.stage_seconds.values()) if stage == "total" else s.stage_seconds.get(stage)
            return "-" if seconds is None or not s.stage_seconds else f"{seconds / 60:.1f} min"

        return cell

    # One column per round, one row per figure: stays readable in an 80-column terminal.
    table = Table("", *(f"round {s.round_id}" for s in summaries), title="cai loop: per round")
    rows: list[tuple[str, Callable[[RoundSummary], str]]] = [
        ("status", lambda s: s.status if s.kind == "rl" else f"{s.status} (SL)"),
        ("policy", lambda s: s.policy),
        ("pairs", lambda s: str(s.pairs)),
        ("labels (ties)", lambda s: f"{s.labels} ({s.ties})"),
        (
            "exported, by source",
            lambda s: ", ".join(f"{k} {v}" for k, v in sorted(s.label_sources.items())) or "-",
        ),
        ("judge flip rate", lambda s: f"{pct(s.flip_rate)} of {s.judge_asked} pairs"),
        ("train reward accuracy", lambda s: pct(s.train_reward_accuracy)),
        (
            "eval win / tie / loss",
            lambda s: " / ".join(map(str, s.wins_ties_losses)) if s.wins_ties_losses else "-",
        ),
        ("eval win rate", lambda s: pct(s.win_rate)),
        ("eval mean words", lambda s: pair(s.mean_words, ".1f")),
        ("eval all rules pass", lambda s: pair(s.all_rules_pass, ".0%")),
        *((f"time: {stage}", stage_time(stage)) for stage in stages_timed),
    ]
    for name, cell in rows:
        table.add_row(name, *(cell(s) for s in summaries))
    out.print(table)
