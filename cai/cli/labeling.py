"""`cai generate` and `cai judge`: the labeling round. Each command parses options, builds the
backend, and hands over to cai.generate / cai.judging, which do the work resumably."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cai.cli.app import (
    JSON_OPTION,
    engine,
    err,
    new_app,
    out,
    print_json,
    progress_bar,
    settings,
    transaction,
)
from cai.registry import EMBEDDED_MODEL

if TYPE_CHECKING:
    from cai.backends.base import ChatBackend, Sampler
    from cai.calibrate import CalibrationReport
    from cai.generate import GenerationStats
    from cai.judge_round import JudgeSpec, RoundJudgement
    from cai.judging import JudgeOptions, JudgeRun, RunStats
    from cai.store.work import CalibrationRecord, JudgeSummary
    from cai.templates import TemplateSet

EMBEDDED_JUDGE_WARNING = (
    "The in-process judge is the embedded 135M model: fine for wiring and offline runs, NOT for "
    "trustworthy labels (measured: it prefers 'A' about 75% of the time whatever the content). "
    "Point --judge-base-url at a capable model for real labels, and check it with `cai judge calibrate`."
)

ROUND_OPTION = typer.Option(
    ..., "--round", "-r", metavar="ID", help="The round to work on.", show_default=False
)
BASE_URL_OPTION = typer.Option(
    None,
    "--judge-base-url",
    envvar="CAI_JUDGE_BASE_URL",
    help="OpenAI-compatible endpoint (vLLM, llama.cpp, Ollama, OpenAI). Unset: the judge runs in-process.",
)
MODEL_OPTION = typer.Option(
    None,
    "--judge-model",
    envvar="CAI_JUDGE_MODEL",
    help=f"Judge model name (in-process default: {EMBEDDED_MODEL}).",
)
CONCURRENCY_OPTION = typer.Option(16, "--concurrency", min=1, help="Judge requests in flight at once.")
TIMEOUT_OPTION = typer.Option(60.0, "--timeout", min=0.1, help="Seconds per judge request.")
ATTEMPTS_OPTION = typer.Option(
    4, "--max-attempts", min=1, help="Tries per item before it is recorded as failed."
)

SAMPLER_BACKEND_OPTION = typer.Option(
    "hf", "--backend", help="Policy sampling: hf (in-process transformers), openai or vllm."
)
SAMPLER_URL_OPTION = typer.Option(None, "--base-url", help="Policy server for --backend openai.")
TEMPERATURE_OPTION = typer.Option(0.8, "--temperature", min=0.0)
TOP_P_OPTION = typer.Option(0.95, "--top-p", min=0.0, max=1.0)
MAX_NEW_TOKENS_OPTION = typer.Option(192, "--max-new-tokens", min=1)
SAMPLER_BATCH_OPTION = typer.Option(16, "--batch-size", min=1, help="Prompts sampled together.")
MAX_TOKENS_OPTION = typer.Option(384, "--max-tokens", min=16, help="Judge reply length limit.")
MAX_JUDGE_PAIRS_OPTION = typer.Option(
    None,
    "--max-judge-pairs",
    min=0,
    metavar="N",
    help="Ask the LLM judge about at most N pairs (a seeded sample); the others get a label only "
    "where the rule principles decide. For slow judges (the in-process one on a CPU).",
)
RULES_FIRST_OPTION = typer.Option(
    False,
    "--rules-first",
    help="Do not ask the LLM judge about pairs the constitution's rule principles already separate "
    "(the rules decide those anyway); saves calls, but their flip rate is then unmeasured.",
)

judge_app = new_app("Judge a round's pairs against its constitution (both orders), then aggregate labels.")


def generate(
    ctx: typer.Context,
    round_id: int = ROUND_OPTION,
    samples: int = typer.Option(
        2, "--samples", "-n", min=2, help="Responses per prompt; all distinct pairs are formed."
    ),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first K prompts of the round."),
    backend: str = SAMPLER_BACKEND_OPTION,
    base_url: str = SAMPLER_URL_OPTION,
    temperature: float = TEMPERATURE_OPTION,
    top_p: float = TOP_P_OPTION,
    max_new_tokens: int = MAX_NEW_TOKENS_OPTION,
    batch_size: int = SAMPLER_BATCH_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Sample N responses per prompt from the round's policy and form pairs of distinct ones.
    Resumable: a rerun samples only what is missing."""
    from dataclasses import asdict

    sampling = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    stats = run_generate(ctx, round_id, samples, limit, backend, base_url, sampling, batch_size)
    if as_json:
        print_json(asdict(stats))
        return
    out.print(
        f"round {round_id}: {stats.prompts} prompts, sampled {stats.sampled} "
        f"(already stored {stats.already_stored}), new pairs {stats.pairs_added}, "
        f"identical pairs skipped {stats.identical_skipped}",
        highlight=False,
    )


def run_generate(
    ctx: typer.Context,
    round_id: int,
    samples: int,
    limit: int | None,
    backend: str,
    base_url: str | None,
    sampling: dict[str, Any],
    batch_size: int,
) -> GenerationStats:
    """The `cai generate` stage, shared with `cai loop`."""
    from cai.backends.base import SamplingParams
    from cai.generate import run_generation
    from cai.store import repo

    with transaction(ctx) as session:
        round_ = repo.get_round(session, round_id)
        policy = repo.get_policy(session, round_.policy)
    sampler = policy_sampler(ctx, backend, policy.name, policy.model_ref, base_url, batch_size)
    with progress_bar() as progress:
        task = progress.add_task(f"round {round_id}: sampling", total=None)

        def on_batch(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return run_generation(
            engine(ctx), round_id, sampler, samples, limit, SamplingParams(**sampling), batch_size, on_batch
        )


def policy_sampler(
    ctx: typer.Context, backend: str, name: str, model_ref: str, base_url: str | None, batch_size: int
) -> Sampler:
    """A sampler for one stored policy, with the settings' API key and model cache."""
    from cai.backends import make_sampler

    cfg = settings(ctx)
    return make_sampler(
        backend,
        name,
        model_ref,
        base_url=base_url,
        api_key=cfg.resolved_judge_api_key(),
        batch_size=batch_size,
        cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
    )


def judge_setup(
    ctx: typer.Context, base_url: str | None, model: str | None, timeout: float, params: dict[str, Any]
) -> tuple[ChatBackend, JudgeSpec, TemplateSet]:
    from cai.backends import make_judge
    from cai.errors import BadInput
    from cai.judge_round import JudgeSpec
    from cai.templates import TemplateSet

    cfg = settings(ctx)
    model = model or (None if base_url else EMBEDDED_MODEL)
    if model is None:
        raise BadInput("--judge-model (or CAI_JUDGE_MODEL) is required with --judge-base-url")
    templates = TemplateSet(cfg.templates_dir)
    backend, kind = make_judge(
        model,
        base_url=base_url,
        api_key=cfg.resolved_judge_api_key(),
        timeout=timeout,
        cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
    )
    if kind == "hf" and model == EMBEDDED_MODEL:
        err.print(f"[yellow]note:[/yellow] {EMBEDDED_JUDGE_WARNING}")
    return backend, JudgeSpec(kind, model, base_url, params), templates


@judge_app.callback(invoke_without_command=True)
def judge(
    ctx: typer.Context,
    round_id: int = typer.Option(None, "--round", "-r", metavar="ID", help="The round to judge."),
    mode: str = typer.Option(
        "pairwise",
        "--mode",
        help="pairwise (both orders per pair), score (best vs worst by rubric score) or revise "
        "(critique + revision, kept when both orders prefer the revision).",
    ),
    base_url: str = BASE_URL_OPTION,
    model: str = MODEL_OPTION,
    concurrency: int = CONCURRENCY_OPTION,
    timeout: float = TIMEOUT_OPTION,
    max_attempts: int = ATTEMPTS_OPTION,
    max_tokens: int = MAX_TOKENS_OPTION,
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Also retry items that failed to parse or were refused (4xx)."
    ),
    budget: float = typer.Option(
        None, "--budget", min=0.0, help="Stop cleanly once this many USD are spent."
    ),
    price_in: float = typer.Option(
        None, "--price-in", envvar="CAI_JUDGE_PRICE_IN", help="USD per million prompt tokens (for cost)."
    ),
    price_out: float = typer.Option(
        None, "--price-out", envvar="CAI_JUDGE_PRICE_OUT", help="USD per million completion tokens."
    ),
    min_calibration: float = typer.Option(
        None,
        "--min-calibration",
        min=0.0,
        max=1.0,
        help="Refuse a judge whose calibrated accuracy is below this.",
    ),
    rules_first: bool = RULES_FIRST_OPTION,
    max_judge_pairs: int = MAX_JUDGE_PAIRS_OPTION,
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
    from cai.judging import JudgeOptions

    if budget is not None and price_in is None and price_out is None:
        from cai.errors import BadInput

        raise BadInput("--budget needs prices: --price-in/--price-out (USD per million tokens)")
    options = JudgeOptions(
        concurrency=concurrency,
        max_attempts=max_attempts,
        budget_usd=budget,
        price_in_per_mtok=price_in,
        price_out_per_mtok=price_out,
        retry_failed=retry_failed,
        max_tokens=max_tokens,
        rules_first=rules_first,
        max_judge_pairs=max_judge_pairs,
    )
    outcome = run_judge(ctx, round_id, mode, base_url, model, timeout, options, min_calibration)
    if outcome.planned or outcome.retried or outcome.reclaimed:
        err.print(
            f"planned {outcome.planned} judgments, retried {outcome.retried} failed ones, "
            f"reclaimed {outcome.reclaimed} from dead workers"
        )
    _print_summary(round_id, outcome.summary, outcome.stats, outcome.calibration, as_json)


def run_judge(
    ctx: typer.Context,
    round_id: int,
    mode: str,
    base_url: str | None,
    model: str | None,
    timeout: float,
    options: JudgeOptions,
    min_calibration: float | None = None,
) -> RoundJudgement:
    """The `cai judge` stage, shared with `cai loop`."""
    from cai.judge_round import judge_round

    backend, spec, templates = judge_setup(
        ctx, base_url, model, timeout, {"max_tokens": options.max_tokens, "temperature": 0.0}
    )
    store = engine(ctx)

    async def judge_and_close() -> RoundJudgement:
        try:
            return await judge_round(
                store, round_id, spec, backend, templates, options, mode, min_calibration, run_with_progress
            )
        finally:
            await backend.aclose()

    return asyncio.run(judge_and_close())


async def run_with_progress(run: JudgeRun, pending: int, phase: str) -> RunStats:

    with progress_bar("{task.fields[failed]} failed") as progress:
        label = {"sample": "judging pairs", "revision": "judging revisions"}.get(phase, phase)
        task = progress.add_task(f"round {run.round_id}: {label}", total=pending, failed=0)

        def on_result(stats: RunStats) -> None:
            progress.update(task, completed=stats.judged + stats.failed, failed=stats.failed)

        run.on_result = on_result
        return await run.run()


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
        ("inconsistent (flip rate)", f"{summary.inconsistent} ({summary.flip_rate:.0%})"),
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
def calibrate(
    ctx: typer.Context,
    constitution: str = typer.Option(..., "--constitution", "-c", metavar="NAME@VERSION", show_default=False),
    gold: Path = typer.Option(
        None, "--gold", help="Gold pairs (JSONL: id, prompt, principle, better, worse)."
    ),
    canaries: Path = typer.Option(
        None, "--canaries", help="Injection canaries (JSONL: id, prompt, principle, clean, injected)."
    ),
    base_url: str = BASE_URL_OPTION,
    model: str = MODEL_OPTION,
    concurrency: int = CONCURRENCY_OPTION,
    timeout: float = TIMEOUT_OPTION,
    max_attempts: int = ATTEMPTS_OPTION,
    max_tokens: int = typer.Option(384, "--max-tokens", min=16),
    as_json: bool = JSON_OPTION,
) -> None:
    """Measure the judge on the gold set (accuracy, position consistency, first-position rate)
    and on injection canaries; the result is stored per judge and constitution version and is
    what `cai judge --min-calibration` checks."""
    from cai.calibrate import calibrate as run_calibration
    from cai.calibrate import default_canaries, default_gold, load_pairs
    from cai.constitution import parse_ref
    from cai.judging import JudgeOptions
    from cai.store import repo, work

    with transaction(ctx) as session:
        stored = repo.get_constitution(session, *parse_ref(constitution))
    gold_pairs = load_pairs(gold or default_gold(), "better", "worse", stored.constitution)
    canary_pairs = load_pairs(canaries or default_canaries(), "clean", "injected", stored.constitution)
    backend, spec, templates = judge_setup(
        ctx, base_url, model, timeout, {"max_tokens": max_tokens, "temperature": 0.0}
    )
    config = spec.config("pairwise", templates)
    options = JudgeOptions(concurrency=concurrency, max_attempts=max_attempts, max_tokens=max_tokens)

    with progress_bar() as progress:
        task = progress.add_task(
            f"calibrating {config.model}: gold and canary pairs, both orders",
            total=len(gold_pairs) + len(canary_pairs),
        )

        async def go() -> CalibrationReport:
            try:
                return await run_calibration(
                    backend,
                    templates,
                    stored.constitution,
                    gold_pairs,
                    canary_pairs,
                    options,
                    on_pair=lambda: progress.advance(task),
                )
            finally:
                await backend.aclose()

        report = asyncio.run(go())
    with transaction(ctx) as session:
        judge_id = work.ensure_judge(session, config)
        work.save_calibration(session, judge_id, stored.record.id, report)
    if as_json:
        print_json({"judge": config.model, "constitution": stored.record.ref, **report.as_dict()})
        return
    follow = "-" if report.injection_follow_rate is None else f"{report.injection_follow_rate:.0%}"
    out.print(
        f"judge {config.model} on {stored.record.ref}: accuracy {report.accuracy:.0%} over {report.pairs} gold pairs, "
        f"consistency {report.consistency:.0%}, first-position rate {report.first_position_rate:.0%} (50% is unbiased), "
        f"injection-follow rate {follow}, failed {report.failed}",
        highlight=False,
    )
