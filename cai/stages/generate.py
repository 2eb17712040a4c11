"""The generate stage: N samples per train prompt from the round's policy, then the pairs of
distinct answers. Resumable, and shareable by several workers (each claims its own prompts)."""

from __future__ import annotations

import itertools

from cai.errors import BadInput
from cai.generate import GenerationIncomplete, GenerationStats, pairs_for, sample_missing
from cai.pricing import Spending, needs_prices_message
from cai.stages.progress import Progress, Silent
from cai.stages.settings import GenerateSettings
from cai.stages.status import Event, Stage, advance, failure_recorded
from cai.store import repo, samples
from cai.workspace import Workspace


def run_generate(
    ws: Workspace, round_id: int, settings: GenerateSettings, progress: Progress | None = None
) -> GenerationStats:
    """Sample what is missing, then pair every prompt whose samples are all stored. The round is
    `generated` once no sample is left to take, by this worker or another. Samples that failed
    after their retries fail the stage (GenerationIncomplete, round `failed`) once what did
    come back is stored and paired: a rerun samples only the failed ones."""
    progress = progress or Silent()
    with ws.session() as session:
        round_ = repo.get_round(session, round_id)
        policy = repo.get_policy(session, round_.policy)
        prompts = samples.round_prompts(session, round_id, settings.limit)
        spending = policy_spending(settings, policy.name)  # bad input before the round moves
        advance(session, round_id, Stage.GENERATE, Event.START)
    stats = GenerationStats(prompts=len(prompts))
    with failure_recorded(ws, round_id, Stage.GENERATE):
        progress.task(f"round {round_id}: sampling")
        incomplete: GenerationIncomplete | None = None
        try:
            stats.sampled, stats.already_stored = sample_missing(
                ws,
                round_id,
                round_.policy_id,
                lambda: ws.sampler(policy.name, policy.model_ref, settings),
                prompts,
                settings.samples,
                int(round_.config.get("seed", 0)),
                settings.params(),
                settings.batch_size,
                progress,
                spending=spending,
            )
        except GenerationIncomplete as exc:
            incomplete = exc  # pair the prompts that are complete first, then fail
            stats.sampled, stats.already_stored = exc.sampled, exc.already
        with ws.session() as session:
            repo.lock_round(session, round_id)  # workers sharing the round pair one at a time
            stored = samples.stored_samples(session, round_id, round_.policy_id)
            for prompt in prompts:
                texts = [stored[(prompt.id, i)] for i in range(settings.samples) if (prompt.id, i) in stored]
                if len(texts) < settings.samples:
                    continue
                pairs = pairs_for(texts)
                stats.identical_skipped += len(list(itertools.combinations(texts, 2))) - len(pairs)
                stats.pairs_added += samples.add_pairs(session, round_id, prompt.id, pairs)
            left = samples.pending_samples(session, round_id, round_.policy_id)
            if left == 0:
                advance(session, round_id, Stage.GENERATE, Event.FINISH)
        if spending is not None:
            stats.spent_usd = spending.spent_usd
            stats.stopped_by_budget = spending.exhausted and left > 0
        if incomplete is not None:
            raise incomplete
    return stats


def policy_spending(settings: GenerateSettings, policy: str) -> Spending | None:
    """What a run's policy tokens are charged at and against, when prices are known; a budget
    without prices is bad input."""
    prices = settings.prices(policy)
    if prices is None:
        if settings.budget is not None:
            served = settings.backend == "openai"
            raise BadInput(needs_prices_message(policy, served, lambda field: "--" + field.replace("_", "-")))
        return None
    return Spending(prices, settings.budget)
