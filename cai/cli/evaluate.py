"""`cai eval`: the round's trained policy against the policy it started from, on held-out prompts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from cai.cli.app import JSON_OPTION, engine, out, print_json, progress_bar, transaction
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
    judge_setup,
    policy_sampler,
    run_with_progress,
)

if TYPE_CHECKING:
    from cai.evaluate import EvaluationResult
    from cai.judging import JudgeOptions


def evaluate(
    ctx: typer.Context,
    round_id: int = typer.Option(..., "--round", "-r", metavar="ID", show_default=False),
    samples: int = typer.Option(1, "--samples", "-n", min=1, help="Answers per eval prompt and policy."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first K eval prompts."),
    backend: str = SAMPLER_BACKEND_OPTION,
    base_url: str = SAMPLER_URL_OPTION,
    temperature: float = TEMPERATURE_OPTION,
    top_p: float = TOP_P_OPTION,
    max_new_tokens: int = MAX_NEW_TOKENS_OPTION,
    batch_size: int = SAMPLER_BATCH_OPTION,
    judge_base_url: str = BASE_URL_OPTION,
    judge_model: str = MODEL_OPTION,
    concurrency: int = CONCURRENCY_OPTION,
    timeout: float = TIMEOUT_OPTION,
    max_attempts: int = ATTEMPTS_OPTION,
    max_tokens: int = MAX_TOKENS_OPTION,
    rules_first: bool = RULES_FIRST_OPTION,
    max_judge_pairs: int = MAX_JUDGE_PAIRS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Sample the trained policy p_{r+1} and the round's policy p_r on the eval prompts (same
    seeds), judge each pair in both orders with the round's judge and constitution, and store
    win / tie / loss, rule pass rates and mean answer length. Resumable like every stage."""
    from cai.judging import JudgeOptions

    result = run_eval(
        ctx,
        round_id,
        samples=samples,
        limit=limit,
        backend=backend,
        base_url=base_url,
        sampling={"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens},
        batch_size=batch_size,
        judge_base_url=judge_base_url,
        judge_model=judge_model,
        timeout=timeout,
        options=JudgeOptions(
            concurrency=concurrency,
            max_attempts=max_attempts,
            max_tokens=max_tokens,
            rules_first=rules_first,
            max_judge_pairs=max_judge_pairs,
        ),
    )
    print_evaluation(result, as_json)


def run_eval(
    ctx: typer.Context,
    round_id: int,
    *,
    samples: int,
    limit: int | None,
    backend: str,
    base_url: str | None,
    sampling: dict[str, Any],
    batch_size: int,
    judge_base_url: str | None,
    judge_model: str | None,
    timeout: float,
    options: JudgeOptions,
) -> EvaluationResult:
    """The `cai eval` stage, shared with `cai loop`."""
    from cai.backends.base import Sampler, SamplingParams
    from cai.evaluate import run_evaluation
    from cai.store import evaluation
    from cai.store.evaluation import Contestant

    with transaction(ctx) as session:  # refuse bad input before any model loads
        evaluation.contest(session, round_id)
        evaluation.eval_prompts(session, round_id, limit)
    judge_backend, spec, templates = judge_setup(
        ctx, judge_base_url, judge_model, timeout, {"max_tokens": options.max_tokens, "temperature": 0.0}
    )

    def sampler_for(policy: Contestant) -> Sampler:
        return policy_sampler(ctx, backend, policy.name, policy.model_ref, base_url, batch_size)

    with progress_bar() as progress:
        tasks: dict[str, Any] = {}

        def on_sampling(policy: str, done: int, total: int) -> None:
            if policy not in tasks:
                tasks[policy] = progress.add_task(f"round {round_id} eval: sampling {policy}", total=total)
            progress.update(tasks[policy], completed=done, total=total)

        return run_evaluation(
            engine(ctx),
            round_id,
            sampler_for,
            spec,
            judge_backend,
            templates,
            options,
            samples=samples,
            limit=limit,
            params=SamplingParams(**sampling),
            runner=run_with_progress,
            on_sampling=on_sampling,
        )


def print_evaluation(result: EvaluationResult, as_json: bool) -> None:
    from dataclasses import asdict

    from rich.box import SIMPLE
    from rich.table import Table

    record = result.record
    if as_json:
        print_json(asdict(record) | {"win_rate": record.win_rate, "sampled": result.sampled})
        return
    metrics = record.metrics
    out.print(
        f"round {record.round_id}: {record.candidate} vs {record.baseline} on {record.prompts} pairs: "
        f"win {record.wins} / tie {record.ties} / loss {record.losses} (win rate {record.win_rate:.0%})",
        highlight=False,
    )
    judge = metrics.get("judge_only", {})
    if any(judge.values()):
        out.print(
            f"LLM judge alone: win {judge['wins']} / tie {judge['ties']} / loss {judge['losses']}, "
            f"{judge['inconsistent']} order flips, {judge['failed']} failed",
            highlight=False,
        )
    table = Table("", "candidate", "baseline", box=SIMPLE)
    candidate, baseline = metrics["candidate"], metrics["baseline"]

    def fmt(value: Any, percent: bool = False) -> str:
        if value is None:
            return "-"
        return f"{value:.0%}" if percent else f"{value:.1f}"

    table.add_row("mean words", fmt(candidate["mean_words"]), fmt(baseline["mean_words"]))
    table.add_row("mean tokens", fmt(candidate["mean_tokens"]), fmt(baseline["mean_tokens"]))
    for key in candidate["rule_pass_rate"]:
        table.add_row(
            f"rule {key}",
            fmt(candidate["rule_pass_rate"][key], True),
            fmt(baseline["rule_pass_rate"].get(key), True),
        )
    if candidate["all_rules_pass_rate"] is not None:
        table.add_row(
            "all rules pass",
            fmt(candidate["all_rules_pass_rate"], True),
            fmt(baseline["all_rules_pass_rate"], True),
        )
    out.print(table)
