"""Sample N responses per prompt from a round's policy and form pairs. Each batch is committed as
it finishes, keyed by (round, prompt, policy, sample index), so a rerun continues where the last
one stopped."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine

from cai.backends.base import Sampler, SampleRequest, SamplingParams
from cai.store import repo, work
from cai.store.db import session_scope


def sample_seed(round_seed: int, prompt_id: int, index: int) -> int:
    """A per-request seed that depends only on what is sampled, not on batching or order."""
    digest = hashlib.sha256(f"{round_seed}:{prompt_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def pairs_for(samples: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """All pairs of (response id, text) whose texts differ: identical answers teach nothing."""
    return [
        (a_id, b_id)
        for (a_id, a_text), (b_id, b_text) in itertools.combinations(samples, 2)
        if " ".join(a_text.split()) != " ".join(b_text.split())
    ]


@dataclass
class GenerationStats:
    prompts: int = 0
    sampled: int = 0
    already_stored: int = 0
    pairs_added: int = 0
    identical_skipped: int = 0


def run_generation(
    engine: Engine,
    round_id: int,
    sampler: Sampler,
    samples: int = 2,
    limit: int | None = None,
    params: SamplingParams | None = None,
    batch_size: int = 16,
    on_batch: Callable[[int, int], None] | None = None,
) -> GenerationStats:
    """Sample what is missing, then pair every prompt whose samples are all stored.
    `on_batch(done, total)` reports progress in responses."""
    with session_scope(engine) as session:
        round_ = repo.get_round(session, round_id)
        policy_id, seed = round_.policy_id, int(round_.config.get("seed", 0))
        prompts = work.round_prompts(session, round_id, limit)
        work.set_round_status(session, round_id, "generating")
    stats = GenerationStats(prompts=len(prompts))
    stats.sampled, stats.already_stored = sample_missing(
        engine, round_id, policy_id, sampler, prompts, samples, seed, params, batch_size, "sample", on_batch
    )
    with session_scope(engine) as session:
        stored = work.stored_samples(session, round_id, policy_id)
        for prompt in prompts:
            texts = [stored[(prompt.id, i)] for i in range(samples) if (prompt.id, i) in stored]
            if len(texts) < samples:
                continue
            pairs = pairs_for(texts)
            stats.identical_skipped += len(list(itertools.combinations(texts, 2))) - len(pairs)
            stats.pairs_added += work.add_pairs(session, round_id, prompt.id, pairs)
        work.set_round_status(session, round_id, "generated")
    return stats


def sample_missing(
    engine: Engine,
    round_id: int,
    policy_id: int,
    sampler: Sampler,
    prompts: list[work.PromptWork],
    samples: int,
    seed: int,
    params: SamplingParams | None = None,
    batch_size: int = 16,
    origin: str = "sample",
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Sample the (prompt, index) responses of `policy_id` not stored yet, committing each batch;
    returns (sampled now, already stored)."""
    params = params or SamplingParams()
    with session_scope(engine) as session:
        stored = work.stored_samples(session, round_id, policy_id, origin)
    todo = [(p, i) for p in prompts for i in range(samples) if (p.id, i) not in stored]
    if on_batch:
        on_batch(0, len(todo))
    sampled = 0
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        requests = [SampleRequest(p.messages, sample_seed(seed, p.id, i)) for p, i in batch]
        results = sampler.sample(requests, params)
        with session_scope(engine) as session:
            for (prompt, index), request, result in zip(batch, requests, results, strict=True):
                work.add_response(
                    session,
                    origin=origin,
                    round_id=round_id,
                    prompt_id=prompt.id,
                    policy_id=policy_id,
                    sample_index=index,
                    text=result.text,
                    sampling={**params.as_dict(), "backend": type(sampler).__name__, "model": sampler.model},
                    seed=request.seed if result.seed is None else result.seed,
                    prompt_tokens=result.prompt_tokens,
                    completion_tokens=result.completion_tokens,
                    finish_reason=result.finish_reason,
                )
        sampled += len(batch)
        if on_batch:
            on_batch(sampled, len(todo))
    return sampled, len(prompts) * samples - len(todo)
