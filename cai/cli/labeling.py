"""`cai generate` and `cai judge` (+ `calibrate`): thin adapters over the generate and judge
stages (cai.stages): flags -> settings -> stage -> printing."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from cai.cli.app import JSON_OPTION, RichProgress, err, new_app, out, print_json, workspace
from cai.cli.estimates import ESTIMATE_OPTION, print_estimate
from cai.cli.flags import Flags, with_settings
from cai.cli.jobs import SUBMIT_OPTION, submit
from cai.stages.settings import CalibrateSettings, GenerateSettings, JudgeSettings

if TYPE_CHECKING:
    from cai.judging import RunStats
    from cai.store.judges import CalibrationRecord
    from cai.store.labels import JudgeSummary

ROUND_OPTION = typer.Option(
    ..., "--round", "-r", metavar="ID", help="The round to work on.", show_default=False
)

judge_app = new_app("Judge a round's pairs against its constitution (both orders), then aggregate labels.")


@with_settings(
    # Only the policy server here: its limits are plain --rpm/--tpm, as the judge's are on cai judge.
    settings=Flags(GenerateSettings, rename={"policy_rpm": ("--rpm",), "policy_tpm": ("--tpm",)})
)
def generate(
    ctx: typer.Context,
    round_id: int = ROUND_OPTION,
    *,
    settings: GenerateSettings,
    estimate: bool = ESTIMATE_OPTION,
    submit_job: bool = SUBMIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Sample N responses per prompt from the round's policy and form pairs of distinct ones.
    Resumable: a rerun samples only what is missing; several workers may share a round."""
    from dataclasses import asdict

    from cai.stages.generate import run_generate

    if estimate:
        from cai.estimate import estimate_generate

        print_estimate(round_id, estimate_generate(workspace(ctx), round_id, settings), as_json)
        return
    if submit_job:
        submit(ctx, "generate", round_id, settings)
        return

    with RichProgress() as progress:
        stats = run_generate(workspace(ctx), round_id, settings, progress)
    if stats.stopped_by_budget:
        err.print(
            f"[yellow]stopped:[/yellow] budget reached (${stats.spent_usd or 0:.4f}); "
            "rerun to sample the rest (each run spends up to --budget)"
        )
    if as_json:
        print_json(asdict(stats))
        return
    out.print(
        f"round {round_id}: {stats.prompts} prompts, sampled {stats.sampled} "
        f"(already stored {stats.already_stored}), new pairs {stats.pairs_added}, "
        f"identical pairs skipped {stats.identical_skipped}",
        highlight=False,
    )


@judge_app.callback(invoke_without_command=True)
@with_settings(settings=Flags(JudgeSettings))
def judge(
    ctx: typer.Context,
    round_id: int = typer.Option(None, "--round", "-r", metavar="ID", help="The round to judge."),
    *,
    settings: JudgeSettings,
    estimate: bool = ESTIMATE_OPTION,
    submit_job: bool = SUBMIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Judge every pair of the round under a sampled principle, in both orders; rule principles
    are checked in code. Rerunning skips what is stored and retries transient failures; several
    workers may run at once on PostgreSQL."""
    if ctx.invoked_subcommand is not None:
        return
    if round_id is None:
        from cai.errors import BadInput

        raise BadInput("--round is required (or use a subcommand: cai judge calibrate)")
    from cai.stages.judge import run_judge

    if estimate:
        from cai.estimate import estimate_judge

        print_estimate(round_id, estimate_judge(workspace(ctx), round_id, settings), as_json)
        return
    if submit_job:
        submit(ctx, "judge", round_id, settings)
        return

    with RichProgress() as progress:
        outcome = run_judge(workspace(ctx), round_id, settings, progress)
    if outcome.planned or outcome.retried or outcome.reclaimed:
        err.print(
            f"planned {outcome.planned} judgments, retried {outcome.retried} failed ones, "
            f"reclaimed {outcome.reclaimed} from dead workers"
        )
    _print_summary(round_id, outcome.summary, outcome.stats, outcome.calibration, as_json)


def _print_summary(
    round_id: int,
    summary: JudgeSummary,
    stats: RunStats,
    calibration: CalibrationRecord | None,
    as_json: bool,
) -> None:
    from dataclasses import asdict

    from rich.box import SIMPLE
    from rich.table import Table

    if stats.stopped_by_budget:
        err.print(
            f"[yellow]stopped:[/yellow] budget reached (${stats.spent_usd:.4f}); rerun with a larger --budget"
        )
    if stats.errors:
        err.print("failures this run: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.errors.items())))
    if calibration is None:
        err.print(
            "[yellow]note:[/yellow] this judge is not calibrated on this constitution: run `cai judge calibrate`"
        )
    if as_json:
        run = {"run": asdict(stats), "calibration": asdict(calibration) if calibration else None}
        print_json({"round": round_id, **asdict(summary), "flip_rate": summary.flip_rate, **run})
        return
    table = Table(f"round {round_id}", "", box=SIMPLE)
    for name, value in (
        ("pairs", summary.pairs),
        ("labeled", summary.labeled),
        ("ties", summary.ties),
        (
            "inconsistent (flip rate)",
            f"{summary.inconsistent} ({'-' if summary.flip_rate is None else f'{summary.flip_rate:.0%}'})",
        ),
        ("pending", summary.pending),
        ("failed", summary.failed),
        ("tokens", f"{summary.prompt_tokens + summary.completion_tokens:,}"),
        ("cost", f"${summary.cost_usd:.4f}" if summary.cost_usd else "-"),
        ("wall time", f"{stats.wall_s:.1f}s"),
        ("judge accuracy on gold", f"{calibration.accuracy:.0%}" if calibration else "not calibrated"),
        (
            "injection-follow rate",
            f"{calibration.injection_follow_rate:.0%}"
            if calibration and calibration.injection_follow_rate is not None
            else "-",
        ),
    ):
        table.add_row(name, str(value))
    out.print(table)


@judge_app.command()
@with_settings(settings=Flags(CalibrateSettings))
def calibrate(
    ctx: typer.Context,
    *,
    settings: CalibrateSettings,
    submit_job: bool = SUBMIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Measure the judge on the gold set (accuracy, position consistency, first-position rate)
    and on injection canaries; the result is stored per judge and constitution version and is
    what `cai judge --min-calibration` checks."""
    from cai.stages.judge import run_calibrate

    if submit_job:
        submit(ctx, "calibrate", None, settings)
        return

    with RichProgress() as progress:
        result = run_calibrate(workspace(ctx), settings, progress)
    report = result.report
    if as_json:
        print_json({"judge": result.judge, "constitution": result.constitution, **report.as_dict()})
        return
    follow = "-" if report.injection_follow_rate is None else f"{report.injection_follow_rate:.0%}"
    out.print(
        f"judge {result.judge} on {result.constitution}: accuracy {report.accuracy:.0%} over {report.pairs} gold pairs, "
        f"consistency {report.consistency:.0%}, first-position rate {report.first_position_rate:.0%} (50% is unbiased), "
        f"injection-follow rate {follow}, failed {report.failed}",
        highlight=False,
    )
    if len(report.by_principles) > 1:
        for row in report.by_principles:
            flips = "-" if row["flip_rate"] is None else f"{row['flip_rate']:.0%}"
            confidence = "-" if row["mean_confidence"] is None else f"{row['mean_confidence']:.2f}"
            out.print(
                f"  {row['k']} principle(s) a pair: accuracy {row['accuracy']:.0%}, flip rate {flips}, "
                f"mean confidence {confidence}",
                highlight=False,
            )
