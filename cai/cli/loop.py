"""`cai loop`: rounds of generate -> judge -> export -> train -> eval, each round starting from the
policy the previous one trained. The round's stored status decides where a rerun resumes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cai.cli.app import JSON_OPTION, err, out, print_json, quiet_libraries, transaction
from cai.cli.labeling import (
    ATTEMPTS_OPTION,
    BASE_URL_OPTION,
    CONCURRENCY_OPTION,
    MAX_JUDGE_PAIRS_OPTION,
    MAX_NEW_TOKENS_OPTION,
    MAX_TOKENS_OPTION,
    MODEL_OPTION,
    RULES_FIRST_OPTION,
    SAMPLER_BACKEND_OPTION,
    SAMPLER_BATCH_OPTION,
    SAMPLER_URL_OPTION,
    TEMPERATURE_OPTION,
    TIMEOUT_OPTION,
    TOP_P_OPTION,
)

if TYPE_CHECKING:
    from cai.judging import JudgeOptions
    from cai.store.progress import RoundSummary
    from cai.train import TrainConfig


@dataclass
class LoopSettings:
    """Everything the steps need, gathered once from the command line."""

    samples: int
    limit: int | None
    eval_samples: int
    eval_limit: int | None
    backend: str
    base_url: str | None
    sampling: dict[str, Any]
    batch_size: int
    judge_mode: str
    judge_base_url: str | None
    judge_model: str | None
    timeout: float
    judge_options: JudgeOptions
    min_confidence: float | None
    train_config: TrainConfig
    artifacts: Path
    log: list[str] = field(default_factory=list)


class LoopStopped(Exception):
    """A step ended without finishing its round's stage (budget, pending work)."""


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
    samples: int = typer.Option(2, "--samples", "-n", min=2, help="Responses per train prompt."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first K train prompts per round."),
    eval_samples: int = typer.Option(1, "--eval-samples", min=1, help="Answers per eval prompt and policy."),
    eval_limit: int = typer.Option(None, "--eval-limit", min=1, help="Only the first K eval prompts."),
    backend: str = SAMPLER_BACKEND_OPTION,
    base_url: str = SAMPLER_URL_OPTION,
    temperature: float = TEMPERATURE_OPTION,
    top_p: float = TOP_P_OPTION,
    max_new_tokens: int = MAX_NEW_TOKENS_OPTION,
    batch_size: int = SAMPLER_BATCH_OPTION,
    mode: str = typer.Option("pairwise", "--mode", help="Judge mode: pairwise, score or revise."),
    judge_base_url: str = BASE_URL_OPTION,
    judge_model: str = MODEL_OPTION,
    concurrency: int = CONCURRENCY_OPTION,
    timeout: float = TIMEOUT_OPTION,
    max_attempts: int = ATTEMPTS_OPTION,
    max_tokens: int = MAX_TOKENS_OPTION,
    rules_first: bool = RULES_FIRST_OPTION,
    max_judge_pairs: int = MAX_JUDGE_PAIRS_OPTION,
    min_confidence: float = typer.Option(
        None, "--min-confidence", min=0.0, max=1.0, help="Export: drop judge labels less sure than this."
    ),
    train_config: Path = typer.Option(
        None, "--train-config", help="YAML/JSON DPO settings (cai.train.TrainConfig)."
    ),
    max_steps: int = typer.Option(
        None, "--max-steps", help="DPO optimizer steps per round (overrides epochs)."
    ),
    epochs: float = typer.Option(None, "--epochs", min=0.0),
    learning_rate: float = typer.Option(None, "--lr", min=0.0),
    beta: float = typer.Option(None, "--beta", min=0.0),
    train_batch_size: int = typer.Option(None, "--train-batch-size", min=1),
    max_length: int = typer.Option(None, "--max-length", min=16),
    artifacts: Path = typer.Option(
        Path("."), "--artifacts", help="Where snapshots/round-ID and runs/round-ID go."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run rounds until the chain starting at --from-round has K finished rounds. Each round:
    generate -> judge -> export -> train -> eval; the next round samples from the policy this
    one trained. Rerun the same command after a crash: every round resumes at its stored status
    and nothing stored is redone. Ends with a summary table per round."""
    from cai.judging import JudgeOptions
    from cai.train import load_config

    settings_ = LoopSettings(
        samples=samples,
        limit=limit,
        eval_samples=eval_samples,
        eval_limit=eval_limit,
        backend=backend,
        base_url=base_url,
        sampling={"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens},
        batch_size=batch_size,
        judge_mode=mode,
        judge_base_url=judge_base_url,
        judge_model=judge_model,
        timeout=timeout,
        judge_options=JudgeOptions(
            concurrency=concurrency,
            max_attempts=max_attempts,
            max_tokens=max_tokens,
            rules_first=rules_first,
            max_judge_pairs=max_judge_pairs,
        ),
        min_confidence=min_confidence,
        train_config=load_config(
            train_config,
            max_steps=max_steps,
            num_train_epochs=epochs,
            learning_rate=learning_rate,
            beta=beta,
            per_device_train_batch_size=train_batch_size,
            max_length=max_length,
        ),
        artifacts=artifacts,
    )
    summaries = run_loop(ctx, rounds, from_round, settings_)
    print_summaries(summaries, as_json)


def run_loop(
    ctx: typer.Context, rounds: int, from_round: int | None, settings_: LoopSettings
) -> list[RoundSummary]:
    """Walk (and extend) the chain of rounds, finishing each; returns their summaries."""
    from cai.errors import BadInput
    from cai.store import progress, repo

    quiet_libraries()
    with transaction(ctx) as session:
        first = from_round if from_round is not None else progress.latest_first_round(session)
        if first is None:
            raise BadInput(
                "no rounds yet: start one with `cai round start -c NAME@VERSION`, then run cai loop"
            )
        repo.get_round(session, first)  # unknown id: exit 2
    chain: list[int] = []
    current: int | None = first
    while current is not None and len(chain) < rounds:
        chain.append(current)
        _finish_round(ctx, current, settings_)
        if len(chain) == rounds:
            break
        with transaction(ctx) as session:
            current = progress.next_round(session, current)
            if current is None:
                current = progress.start_next_round(session, chain[-1])
                err.print(f"round {current} started from round {chain[-1]}'s trained policy", highlight=False)
    with transaction(ctx) as session:
        return [progress.round_summary(session, round_id) for round_id in chain]


def _finish_round(ctx: typer.Context, round_id: int, settings_: LoopSettings) -> None:
    from cai.loop import FINISHED_BY, steps_left
    from cai.store import repo

    with transaction(ctx) as session:
        status = repo.get_round(session, round_id).status
    todo = steps_left(status)
    if todo:
        err.print(f"[bold]round {round_id}[/bold]: {status} -> {' -> '.join(todo)}", highlight=False)
    for step in todo:
        STEP_RUNNERS[step](ctx, round_id, settings_)
        with transaction(ctx) as session:
            status = repo.get_round(session, round_id).status
        if status != FINISHED_BY[step]:
            raise LoopStopped(
                f"round {round_id}: {step} stopped with the round at '{status}' "
                f"(see the messages above); rerun the same cai loop command to resume"
            )


def _generate(ctx: typer.Context, round_id: int, s: LoopSettings) -> None:
    from cai.cli.labeling import run_generate

    stats = run_generate(ctx, round_id, s.samples, s.limit, s.backend, s.base_url, s.sampling, s.batch_size)
    err.print(f"round {round_id}: {stats.sampled} sampled, {stats.pairs_added} new pairs", highlight=False)


def _judge(ctx: typer.Context, round_id: int, s: LoopSettings) -> None:
    from cai.cli.labeling import run_judge

    outcome = run_judge(
        ctx, round_id, s.judge_mode, s.judge_base_url, s.judge_model, s.timeout, s.judge_options
    )
    summary = outcome.summary
    err.print(
        f"round {round_id}: {summary.labeled} labels ({summary.ties} ties), {summary.failed} failed judgments",
        highlight=False,
    )


def _export(ctx: typer.Context, round_id: int, s: LoopSettings) -> None:
    from cai.cli.export import run_export
    from cai.export import ExportFilters

    target = s.artifacts / "snapshots" / f"round-{round_id}"
    result = run_export(ctx, round_id, target, ExportFilters(min_confidence=s.min_confidence))
    counts = result.manifest["counts"]
    err.print(f"round {round_id}: snapshot {result.path} (train {counts['train']}, eval {counts['eval']})")


def _train(ctx: typer.Context, round_id: int, s: LoopSettings) -> None:
    from cai.cli.train import run_train

    summary = run_train(ctx, round_id, s.train_config, output=s.artifacts / "runs" / f"round-{round_id}")
    err.print(f"round {round_id}: trained {summary['steps']} steps -> policy {summary['policy_id']}")


def _eval(ctx: typer.Context, round_id: int, s: LoopSettings) -> None:
    from cai.cli.evaluate import run_eval

    result = run_eval(
        ctx,
        round_id,
        samples=s.eval_samples,
        limit=s.eval_limit,
        backend=s.backend,
        base_url=s.base_url,
        sampling=s.sampling,
        batch_size=s.batch_size,
        judge_base_url=s.judge_base_url,
        judge_model=s.judge_model,
        timeout=s.timeout,
        options=s.judge_options,
    )
    record = result.record
    err.print(
        f"round {round_id}: eval win {record.wins} / tie {record.ties} / loss {record.losses}",
        highlight=False,
    )


STEP_RUNNERS = {"generate": _generate, "judge": _judge, "export": _export, "train": _train, "eval": _eval}


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

    # One column per round, one row per figure: stays readable in an 80-column terminal.
    table = Table("", *(f"round {s.round_id}" for s in summaries), title="cai loop: per round")
    rows: list[tuple[str, Callable[[RoundSummary], str]]] = [
        ("status", lambda s: s.status),
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
    ]
    for name, cell in rows:
        table.add_row(name, *(cell(s) for s in summaries))
    out.print(table)
