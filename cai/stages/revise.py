"""The revise stage of an SL round: each train prompt gets a first answer from the round's policy,
then a chain of critique-revision steps (cai.chains). Resumable and exactly-once like sampling:
steps are claimed, each batch is committed as it finishes, and a rerun takes up the first step of
each chain that is not done."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cai.backends.base import Sample, Sampler, SampleRequest, SamplingIncomplete
from cai.chains import (
    UnusableRevision,
    chain_turns,
    check_revision,
    critique_messages,
    revision_messages,
    step_principle,
    step_seed,
)
from cai.constitution import Constitution, Principle
from cai.errors import BadInput
from cai.generate import sample_missing
from cai.registry import EMBEDDED_MODEL
from cai.stages.progress import Progress, Silent, check
from cai.stages.settings import ReviseSettings
from cai.stages.status import Event, Stage, advance, check_kind, failure_recorded
from cai.store import chains, claims, repo, samples
from cai.store.models import RevisionStepRow
from cai.store.queue import principle_ids
from cai.workspace import Workspace

EMBEDDED_REVISER_WARNING = (
    "The reviser is the embedded 135M model: it runs the chain end to end, but its critiques and "
    "revisions are mostly off the mark (the paper's model critiqued itself at 52B). For real SFT data "
    "pass --reviser-model (a capable model's directory, or its name with --reviser-base-url)."
)
STEP_LEASE_S = 900.0
"""As long as a sampling batch's lease (cai.generate): a batch of steps is two sampling calls."""


@dataclass
class ReviseStats:
    prompts: int = 0
    answered: int = 0
    """First answers sampled by this run."""
    steps_done: int = 0
    steps_failed: int = 0
    """Steps this run found unusable (an empty or unchanged revision): their chains end before them."""
    retried: int = 0
    unanswered: int = 0
    """Steps whose critique or revision the reviser's server failed after its retries: left
    pending for a rerun."""
    chains_complete: int = 0
    """Chains of the round with every step done, after this run."""


class RevisionIncomplete(RuntimeError):
    """Some steps could not be sampled (a server kept failing); what was done is stored and the
    rest stays pending, so a rerun does exactly those."""


def run_revise(
    ws: Workspace, round_id: int, settings: ReviseSettings, progress: Progress | None = None
) -> ReviseStats:
    """Sample the first answers still missing, then run every chain's steps that are left. The
    round is `revised` once no step is pending. The reviser is the round's policy unless
    `settings.reviser_model` names another model."""
    progress = progress or Silent()
    with ws.session() as session:
        round_ = repo.get_round(session, round_id)
        check_kind(round_.kind, Stage.REVISE, round_id)
        policy = repo.get_policy(session, round_.policy)
        name, version = round_.constitution.split("@")
        constitution = repo.get_constitution(session, name, int(version)).constitution
        principles = principle_ids(session, round_.constitution_id)
        if not any(p.kind == "llm" for p in constitution.principles):
            raise BadInput(
                f"{round_.constitution} has no LLM principle to critique under (rule principles only)"
            )
        prompts = samples.round_prompts(session, round_id, settings.limit)
        stats = ReviseStats(prompts=len(prompts))
        if settings.retry_failed:
            stats.retried = chains.retry_failed(session, round_id)
        advance(session, round_id, Stage.REVISE, Event.START)
    seed = int(round_.config.get("seed", 0))
    if (settings.reviser_model or policy.name) == EMBEDDED_MODEL:
        progress.note(EMBEDDED_REVISER_WARNING)
    loaded: dict[str, Sampler] = {}

    def policy_sampler() -> Sampler:
        if "policy" not in loaded:
            loaded["policy"] = ws.sampler(policy.name, policy.model_ref, settings)
        return loaded["policy"]

    def reviser() -> Sampler:
        if settings.reviser_model is None:
            return policy_sampler()
        if "reviser" not in loaded:
            reviser_settings = settings.model_copy(
                update={
                    "backend": "openai" if settings.reviser_base_url else "hf",
                    "base_url": settings.reviser_base_url,
                }
            )
            loaded["reviser"] = ws.sampler(settings.reviser_model, settings.reviser_model, reviser_settings)
        return loaded["reviser"]

    with failure_recorded(ws, round_id, Stage.REVISE):
        progress.task(f"round {round_id}: first answers")
        stats.answered, _ = sample_missing(
            ws,
            round_id,
            round_.policy_id,
            policy_sampler,
            prompts,
            1,
            seed,
            settings.params(),
            settings.batch_size,
            progress,
            origin=chains.CHAIN_ORIGIN,
        )
        todo = []
        for prompt in prompts:
            for step in range(1, settings.revisions + 1):
                principle = step_principle(constitution, seed, prompt.id, step)
                todo.append((prompt.id, step, principles[principle.id], step_seed(seed, prompt.id, step)))
        with ws.session() as session:
            repo.lock_round(session, round_id)
            chains.plan_steps(session, round_id, todo)
            claims.release_dead_local(session, RevisionStepRow)
            pending = chains.step_counts(session, round_id)["pending"]
        progress.task(f"round {round_id}: critique and revise", pending)
        try:
            _run_steps(
                ws,
                round_id,
                round_.policy_id,
                constitution,
                principles,
                reviser,
                settings,
                progress,
                stats,
                pending,
            )
        finally:
            with ws.session() as session:
                claims.release(session, RevisionStepRow, ws.worker_id)
        with ws.session() as session:
            repo.lock_round(session, round_id)  # workers sharing the round pair one at a time
            counts = chains.step_counts(session, round_id)
            round_chains = chains.round_chains(session, round_id)
            stats.chains_complete = sum(len(c.steps) == settings.revisions for c in round_chains)
            if counts["pending"] == 0:
                # Each chain's first answer (A) against its final revision (B), for a judge to
                # confirm the revision is better (cai judge; cai export --kind sft --judge-agrees).
                for chain in round_chains:
                    if chain.steps:
                        pair = [(chain.first_answer_id, chain.final_id)]
                        samples.add_pairs(session, round_id, chain.prompt_id, pair, kind="revision")
                advance(session, round_id, Stage.REVISE, Event.FINISH)
        if stats.unanswered:
            raise RevisionIncomplete(
                f"round {round_id}: {stats.unanswered} steps got no critique or revision from the reviser "
                f"after its retries; {stats.steps_done} steps done by this run are stored, "
                f"{counts['pending']} are left: rerun to resume"
            )
    return stats


def _run_steps(
    ws: Workspace,
    round_id: int,
    policy_id: int,
    constitution: Constitution,
    principles: dict[str, int],
    reviser: Callable[[], Sampler],
    settings: ReviseSettings,
    progress: Progress,
    stats: ReviseStats,
    pending: int,
) -> None:
    critique_params = dataclasses.replace(settings.params(), max_new_tokens=settings.critique_max_tokens)
    while True:
        check(progress, "between revision batches")
        with ws.session() as session:
            batch = chains.claim_steps(
                session, round_id, ws.worker_id, settings.batch_size, ws.claim_lease_s or STEP_LEASE_S
            )
        if not batch:
            return
        sampler = reviser()
        turns = {
            w.id: chain_turns(ws.templates, constitution, _principle(constitution, w.principle_key))
            for w in batch
        }
        critiques = _sample(
            sampler,
            [SampleRequest(critique_messages(w.conversation, w.answer, turns[w.id]), w.seed) for w in batch],
            critique_params,
        )
        asked = [(w, c.text.strip()) for w, c in zip(batch, critiques, strict=True) if c is not None]
        revisions = _sample(
            sampler,
            [
                SampleRequest(revision_messages(w.conversation, w.answer, c, turns[w.id]), w.seed + 1)
                for w, c in asked
            ],
            settings.params(),
        )
        meta = {**settings.params().as_dict(), "backend": type(sampler).__name__, "model": sampler.model}
        sampled = 0
        with ws.session() as session:
            for (work, critique), result in zip(asked, revisions, strict=True):
                if result is None:
                    continue  # left pending (the server failed it); the next run takes it up
                sampled += 1
                try:
                    text = check_revision(result.text, work.answer)
                except UnusableRevision as exc:
                    if chains.fail_step(
                        session, ws.worker_id, work.id, f"{exc}: {result.text[:2000]!r}", critique
                    ):
                        stats.steps_failed += 1
                    continue
                if chains.complete_step(
                    session,
                    ws.worker_id,
                    work,
                    critique=critique,
                    revision=text,
                    policy_id=policy_id,
                    reviser_model=sampler.model,
                    template_sha256=turns[work.id].template_sha256,
                    sampling=meta,
                    principle_id=principles[work.principle_key],
                ):
                    stats.steps_done += 1
            left = chains.step_counts(session, round_id)["pending"]
        stats.unanswered += len(batch) - sampled
        progress.update(
            max(0, pending - left), pending, f"{stats.steps_failed} unusable" if stats.steps_failed else ""
        )
        if sampled == 0:
            raise RevisionIncomplete(
                f"round {round_id}: no critique or revision of a whole batch came back from {sampler.model}; "
                f"{stats.steps_done} steps done by this run are stored, {left} are left: rerun to resume"
            )


def _sample(sampler: Sampler, requests: list[SampleRequest], params: Any) -> list[Sample | None]:
    if not requests:
        return []
    try:
        return list(sampler.sample(requests, params))
    except SamplingIncomplete as exc:
        return exc.samples


def _principle(constitution: Constitution, key: str) -> Principle:
    return next(p for p in constitution.principles if p.id == key)
