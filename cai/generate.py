"""Sampling a round's responses: per-request seeds, the pairs of distinct answers, and the sampling
loop itself. What is left to sample is stored as claimable items, so several workers can sample
one round at once; each batch is committed as it finishes, keyed by (round, prompt, policy,
sample index), so a rerun continues where the last one stopped and nothing is sampled twice."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from cai.backends.base import Sampler, SampleRequest, SamplingParams
from cai.stages.progress import Progress, check
from cai.store import claims, repo, samples
from cai.store.models import GenerationItemRow
from cai.workspace import Workspace

SAMPLE_LEASE_S = 900.0
"""How long a claimed batch is a worker's: longer than any batch takes, short enough that the
work of a worker that died on another machine is taken up again the same hour."""


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


def sample_missing(
    ws: Workspace,
    round_id: int,
    policy_id: int,
    make_sampler: Callable[[], Sampler],
    prompts: list[samples.PromptWork],
    count: int,
    seed: int,
    params: SamplingParams,
    batch_size: int,
    progress: Progress,
    origin: str = "sample",
) -> tuple[int, int]:
    """Sample the (prompt, index) responses of `policy_id` not stored yet, a claimed batch at a
    time, and return (sampled by this worker, already stored). `make_sampler` is called only
    when there is something to sample (loading a model takes a while). Stops at a batch boundary
    when `progress` asks (the unfinished claims are given back)."""
    todo = [(p.id, i, sample_seed(seed, p.id, i)) for p in prompts for i in range(count)]
    with ws.session() as session:
        repo.lock_round(session, round_id)  # workers sharing the round plan one at a time
        samples.plan_samples(session, round_id, policy_id, todo, origin)
        claims.release_dead_local(session, GenerationItemRow)
        stored = samples.stored_samples(session, round_id, policy_id, origin)
        pending = samples.pending_samples(session, round_id, policy_id, origin)
    already = sum((prompt_id, index) in stored for prompt_id, index, _ in todo)
    progress.update(0, pending)
    sampler: Sampler | None = None
    sampled = 0
    try:
        while True:
            check(progress, "between sampling batches")
            with ws.session() as session:
                batch = samples.claim_samples(
                    session,
                    round_id,
                    policy_id,
                    origin,
                    ws.worker_id,
                    batch_size,
                    ws.claim_lease_s or SAMPLE_LEASE_S,
                )
            if not batch:
                break
            sampler = sampler or make_sampler()
            requests = [SampleRequest(item.messages, item.seed) for item in batch]
            results = sampler.sample(requests, params)
            meta = {**params.as_dict(), "backend": type(sampler).__name__, "model": sampler.model}
            with ws.session() as session:
                mine = samples.complete_samples(session, ws.worker_id, [item.id for item in batch])
                for item, request, result in zip(batch, requests, results, strict=True):
                    if item.id not in mine:
                        continue  # its lease ran out and another worker took it: no duplicate
                    samples.add_response(
                        session,
                        origin=origin,
                        round_id=round_id,
                        prompt_id=item.prompt_id,
                        policy_id=policy_id,
                        sample_index=item.sample_index,
                        text=result.text,
                        sampling=meta,
                        seed=request.seed if result.seed is None else result.seed,
                        prompt_tokens=result.prompt_tokens,
                        completion_tokens=result.completion_tokens,
                        finish_reason=result.finish_reason,
                    )
                left = samples.pending_samples(session, round_id, policy_id, origin)
            sampled += len(mine)
            progress.update(max(0, pending - left), pending)
    finally:
        with ws.session() as session:
            claims.release(session, GenerationItemRow, ws.worker_id)
    return sampled, already
