"""Sampling a round's responses: per-request seeds, the pairs of distinct answers, and the sampling
loop itself. What is left to sample is stored as claimable items, so several workers can sample
one round at once; each batch is committed as it finishes, keyed by (round, prompt, policy,
sample index), so a rerun continues where the last one stopped and nothing is sampled twice."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from cai.backends.base import (
    Sample,
    Sampler,
    SampleRequest,
    SamplingIncomplete,
    SamplingParams,
    TokenUsage,
)
from cai.labelling import same_answer
from cai.pricing import Spending
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
    """One pair per two distinct texts among (response id, text) samples, each text represented
    by its first response. Identical answers teach nothing, and a text sampled twice must not
    put the same comparison in front of the judge (and into the snapshot) twice."""
    first_of_text: dict[str, int] = {}
    for response_id, text in samples:
        first_of_text.setdefault(same_answer(text), response_id)
    return list(itertools.combinations(first_of_text.values(), 2))


class GenerationIncomplete(RuntimeError):
    """Some samples still failed after their retries. What was sampled is stored and the failed
    items stay pending, so a rerun samples exactly those."""

    def __init__(self, message: str, sampled: int, already: int) -> None:
        super().__init__(message)
        self.sampled = sampled
        self.already = already


@dataclass
class GenerationStats:
    prompts: int = 0
    sampled: int = 0
    already_stored: int = 0
    pairs_added: int = 0
    identical_skipped: int = 0
    spent_usd: float | None = None
    """What this run's policy tokens cost, when prices are known (given, or the price table's)."""
    stopped_by_budget: bool = False


def plan_sampling(
    session: Session,
    round_id: int,
    policy_id: int,
    prompts: list[samples.PromptWork],
    count: int,
    seed: int,
    origin: str = "sample",
) -> list[tuple[int, int, int]]:
    """Make a pending item of each (prompt, sample index) not stored or planned yet, and free the
    items of dead workers on this host; returns every (prompt id, index, seed) asked for."""
    todo = [(p.id, i, sample_seed(seed, p.id, i)) for p in prompts for i in range(count)]
    repo.lock_round(session, round_id)  # workers sharing the round plan one at a time
    samples.plan_samples(session, round_id, policy_id, todo, origin)
    claims.release_dead_local(session, GenerationItemRow)
    return todo


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
    spending: Spending | None = None,
) -> tuple[int, int]:
    """Sample the (prompt, index) responses of `policy_id` not stored yet, a claimed batch at a
    time, and return (sampled by this worker, already stored). `make_sampler` is called only
    when there is something to sample (loading a model takes a while). Stops at a batch boundary
    when `progress` asks, or once `spending` reaches its budget (the unfinished claims are given
    back; what is left stays pending for a rerun). Samples that fail after the sampler's retries
    do not stop the others; they are left pending and GenerationIncomplete is raised at the end
    (at once, if a whole batch failed: the server is down or refuses)."""
    with ws.session() as session:
        todo = plan_sampling(session, round_id, policy_id, prompts, count, seed, origin)
        stored = samples.stored_samples(session, round_id, policy_id, origin)
        pending = samples.pending_samples(session, round_id, policy_id, origin)
    already = sum((prompt_id, index) in stored for prompt_id, index, _ in todo)
    progress.update(0, pending)
    sampler: Sampler | None = None
    sampled = failed = left = 0
    incomplete: SamplingIncomplete | None = None
    gave_up = False
    try:
        while True:
            check(progress, "between sampling batches")
            wanted = batch_size
            if spending is not None:
                if spending.exhausted:
                    break
                # Near the budget, batches shrink to what is left: a run stops about one sample
                # past it, not a whole batch.
                wanted = spending.affordable(_cost_each(spending, sampled, params), batch_size)
            with ws.session() as session:
                # Failed items stay claimed by this worker until the run ends (finally), so they
                # are not claimed again and again within one run.
                batch = samples.claim_samples(
                    session,
                    round_id,
                    policy_id,
                    origin,
                    ws.worker_id,
                    wanted,
                    ws.claim_lease_s or SAMPLE_LEASE_S,
                )
            if not batch:
                break
            sampler = sampler or make_sampler()
            requests = [SampleRequest(item.messages, item.seed) for item in batch]
            results: list[Sample | None]
            used_before = dataclasses.replace(_usage(sampler) or TokenUsage())
            try:
                results = list(sampler.sample(requests, params))
            except SamplingIncomplete as exc:
                results, incomplete = exc.samples, exc
            if spending is not None:
                spending.add(*_batch_tokens(sampler, used_before, results))
            drawn = [(i, r, s) for i, r, s in zip(batch, requests, results, strict=True) if s is not None]
            meta = {**params.as_dict(), "backend": type(sampler).__name__, "model": sampler.model}
            with ws.session() as session:
                mine = samples.complete_samples(session, ws.worker_id, [item.id for item, _, _ in drawn])
                for item, request, result in drawn:
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
            failed += len(batch) - len(drawn)
            progress.update(max(0, pending - left), pending, f"{failed} failed" if failed else "")
            if not drawn:
                gave_up = True  # nothing of a whole batch came back: the next would fare no better
                break
    finally:
        with ws.session() as session:
            claims.release(session, GenerationItemRow, ws.worker_id)
    if failed:
        raise GenerationIncomplete(
            f"round {round_id}: {failed} samples failed"
            f"{' (stopped: every sample of a batch failed)' if gave_up else ''}; "
            f"{sampled} sampled by this run are stored, "
            f"{left} are left to sample: rerun to resume. Last failed batch: {incomplete}",
            sampled,
            already,
        )
    return sampled, already


def _usage(sampler: Sampler) -> TokenUsage | None:
    """A server sampler's running usage (cai.backends.openai_compat.OpenAISampler.usage)."""
    usage = getattr(sampler, "usage", None)
    return usage if isinstance(usage, TokenUsage) else None


def _batch_tokens(sampler: Sampler, before: TokenUsage, results: list[Sample | None]) -> tuple[int, int]:
    """(prompt, completion) tokens one batch used: as its server reported them per request when
    the sampler keeps count (several samples of one request share a prompt), else summed over
    the samples (an in-process model counts its own)."""
    after = _usage(sampler)
    if after is not None:
        return after.prompt_tokens - before.prompt_tokens, after.completion_tokens - before.completion_tokens
    drawn = [r for r in results if r is not None]
    return sum(r.prompt_tokens or 0 for r in drawn), sum(r.completion_tokens or 0 for r in drawn)


def _cost_each(spending: Spending, sampled: int, params: SamplingParams) -> float:
    """What one more sample is expected to cost: this run's mean so far, else (before any came
    back) a sample of `max_new_tokens` completion tokens."""
    if sampled:
        return spending.spent_usd / sampled
    return spending.prices.cost(0, params.max_new_tokens)
