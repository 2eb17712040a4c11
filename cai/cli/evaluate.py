"""`cai eval`: a thin adapter over the eval stage (cai.stages.evaluate): the round's trained
policy against the policy it started from, on held-out prompts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from cai.cli.app import JSON_OPTION, RichProgress, out, print_json, workspace
from cai.cli.flags import Flags, with_settings
from cai.cli.jobs import SUBMIT_OPTION, submit
from cai.stages.settings import EvalSettings

if TYPE_CHECKING:
    from cai.evaluate import EvaluationResult


@with_settings(settings=Flags(EvalSettings))
def evaluate(
    ctx: typer.Context,
    round_id: int = typer.Option(..., "--round", "-r", metavar="ID", show_default=False),
    *,
    settings: EvalSettings,
    submit_job: bool = SUBMIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Sample the trained policy p_{r+1} and the round's policy p_r on the eval prompts (same
    seeds), judge each pair in both orders with the round's judge and constitution, and store
    win / tie / loss, rule pass rates and mean answer length, and a length-controlled win rate:
    the win rate with the answers' length difference regressed out (see the README). Resumable
    like every stage."""
    if submit_job:
        submit(ctx, "eval", round_id, settings)
        return
    from cai.stages.evaluate import run_eval

    with RichProgress() as progress:
        result = run_eval(workspace(ctx), round_id, settings, progress)
    print_evaluation(result, as_json)


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
    controlled = metrics.get("length_controlled")
    if controlled:
        out.print(
            f"length-controlled win rate {controlled['win_rate']:.0%} (raw {controlled['raw_win_rate']:.0%}, "
            f"ties counted half; length coefficient {controlled['length_coef']:+.2f})",
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
