"""The generate stage: N samples per train prompt from the round's policy, then the pairs of
distinct answers. Resumable, and shareable by several workers (each claims its own prompts)."""

from __future__ import annotations

import itertools

from cai.generate import GenerationIncomplete, GenerationStats, pairs_for, sample_missing
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
            if samples.pending_samples(session, round_id, round_.policy_id) == 0:
                advance(session, round_id, Stage.GENERATE, Event.FINISH)
        if incomplete is not None:
            raise incomplete
    return stats
