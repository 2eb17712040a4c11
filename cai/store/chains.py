"""Queries for critique-revision chains (SL-CAI): planning a round's steps, claiming the steps that
are ready (their predecessor is done), recording each step once, and reading chains back for
the SFT snapshot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from cai.store import claims
from cai.store.models import PrincipleRow, PromptRow, ResponseRow, RevisionStepRow

CHAIN_ORIGIN = "chain"
"""ResponseRow.origin of the answer a chain starts from (sample index 0); its revisions are
origin 'revision' with the step as their sample index."""


def plan_steps(session: Session, round_id: int, todo: list[tuple[int, int, int, int]]) -> int:
    """Add a pending step for each (prompt id, step, principle row id, seed) not planned yet;
    returns how many were added. Call under the round's lock."""
    planned = set(
        session.execute(
            select(RevisionStepRow.prompt_id, RevisionStepRow.step).where(
                RevisionStepRow.round_id == round_id
            )
        ).all()
    )
    new = [t for t in todo if (t[0], t[1]) not in planned]
    session.add_all(
        RevisionStepRow(
            round_id=round_id, prompt_id=prompt_id, step=step, principle_id=principle_id, seed=seed
        )
        for prompt_id, step, principle_id, seed in new
    )
    session.flush()
    return len(new)


def _ready(round_id: int) -> Any:
    """A pending step is ready when what it revises exists: the chain's first answer for step 1,
    the previous step's revision after that."""
    before = aliased(RevisionStepRow)
    first_answer = exists().where(
        ResponseRow.round_id == round_id,
        ResponseRow.prompt_id == RevisionStepRow.prompt_id,
        ResponseRow.origin == CHAIN_ORIGIN,
    )
    previous_done = exists().where(
        before.round_id == round_id,
        before.prompt_id == RevisionStepRow.prompt_id,
        before.step == RevisionStepRow.step - 1,
        before.status == "done",
    )
    return and_(
        RevisionStepRow.round_id == round_id,
        or_(and_(RevisionStepRow.step == 1, first_answer), previous_done),
    )


@dataclass(frozen=True)
class StepWork:
    id: int
    prompt_id: int
    step: int
    principle_key: str
    seed: int
    conversation: list[dict[str, str]]
    answer_id: int
    answer: str
    """The text this step critiques and revises."""


def claim_steps(session: Session, round_id: int, worker: str, n: int, lease_s: float) -> list[StepWork]:
    """Lease up to n ready steps to `worker` (never two steps of one chain: a step is ready only
    once its predecessor is done), with what each revises."""
    claimed = claims.claim_ids(session, RevisionStepRow, worker, n, lease_s, _ready(round_id))
    if not claimed:
        return []
    rows = session.execute(
        select(
            RevisionStepRow.id,
            RevisionStepRow.prompt_id,
            RevisionStepRow.step,
            PrincipleRow.key,
            RevisionStepRow.seed,
            PromptRow.messages,
        )
        .join(PrincipleRow, PrincipleRow.id == RevisionStepRow.principle_id)
        .join(PromptRow, PromptRow.id == RevisionStepRow.prompt_id)
        .where(RevisionStepRow.id.in_(claimed))
        .order_by(RevisionStepRow.id)
    ).all()
    answers = current_answers(session, round_id, [row.prompt_id for row in rows])
    work = []
    for step_id, prompt_id, step, key, seed, messages in rows:
        answer_id, text = answers[prompt_id]
        work.append(StepWork(step_id, prompt_id, step, key, seed, messages, answer_id, text))
    return work


def current_answers(session: Session, round_id: int, prompt_ids: list[int]) -> dict[int, tuple[int, str]]:
    """Per prompt: (response id, text) of its chain's latest answer (the last revision, else the
    first answer)."""
    rows = session.execute(
        select(ResponseRow.prompt_id, ResponseRow.sample_index, ResponseRow.id, ResponseRow.text)
        .where(
            ResponseRow.round_id == round_id,
            ResponseRow.prompt_id.in_(prompt_ids),
            ResponseRow.origin.in_((CHAIN_ORIGIN, "revision")),
        )
        .order_by(ResponseRow.sample_index)
    ).all()
    return {prompt_id: (rid, text) for prompt_id, _, rid, text in rows}  # the highest index wins


def complete_step(
    session: Session,
    worker: str,
    work: StepWork,
    *,
    critique: str,
    revision: str,
    policy_id: int,
    reviser_model: str,
    template_sha256: str,
    sampling: dict[str, Any],
    principle_id: int,
) -> bool:
    """Record a step's critique and revision, if `worker` still holds the step (a step whose lease
    went to another worker is left to it: no duplicate). Returns whether it was recorded."""
    taken = session.scalar(
        update(RevisionStepRow)
        .where(
            RevisionStepRow.id == work.id,
            RevisionStepRow.claimed_by == worker,
            RevisionStepRow.status == "pending",
        )
        .values(status="done", claimed_by=None, claimed_until=None, attempts=RevisionStepRow.attempts + 1)
        .returning(RevisionStepRow.round_id),
        execution_options={"synchronize_session": False},
    )
    if taken is None:
        return False
    response = ResponseRow(
        round_id=taken,
        prompt_id=work.prompt_id,
        policy_id=policy_id,
        sample_index=work.step,
        origin="revision",
        revised_from_id=work.answer_id,
        text=revision,
        sampling=sampling | {"principle_id": principle_id, "step": work.step},
        seed=work.seed + 1,
    )
    session.add(response)
    session.flush()
    session.execute(
        update(RevisionStepRow)
        .where(RevisionStepRow.id == work.id)
        .values(
            source_response_id=work.answer_id,
            revision_response_id=response.id,
            critique=critique,
            reviser_model=reviser_model,
            template_sha256=template_sha256,
        ),
        execution_options={"synchronize_session": False},
    )
    return True


def fail_step(session: Session, worker: str, step_id: int, error: str, critique: str | None) -> bool:
    """A step whose revision cannot continue the chain: the chain ends before it (its later steps
    fail with it), the reason and the raw text are kept. `--retry-failed` tries them again."""
    row = session.get(RevisionStepRow, step_id)
    if row is None or row.claimed_by != worker or row.status != "pending":
        return False
    session.execute(
        update(RevisionStepRow)
        .where(RevisionStepRow.id == step_id)
        .values(
            status="failed",
            error=error,
            critique=critique,
            claimed_by=None,
            claimed_until=None,
            attempts=RevisionStepRow.attempts + 1,
        ),
        execution_options={"synchronize_session": False},
    )
    session.execute(
        update(RevisionStepRow)
        .where(
            RevisionStepRow.round_id == row.round_id,
            RevisionStepRow.prompt_id == row.prompt_id,
            RevisionStepRow.step > row.step,
            RevisionStepRow.status == "pending",
        )
        .values(status="failed", error=f"step {row.step} failed", claimed_by=None, claimed_until=None),
        execution_options={"synchronize_session": False},
    )
    return True


def retry_failed(session: Session, round_id: int) -> int:
    """Make the round's failed steps pending again; returns how many."""
    result = session.execute(
        update(RevisionStepRow)
        .where(RevisionStepRow.round_id == round_id, RevisionStepRow.status == "failed")
        .values(status="pending", error=None),
        execution_options={"synchronize_session": False},
    )
    return result.rowcount or 0  # type: ignore[attr-defined]


def step_counts(session: Session, round_id: int) -> dict[str, int]:
    """Steps of the round by status ('pending', 'done', 'failed'), zeros included."""
    rows = session.execute(
        select(RevisionStepRow.status, func.count())
        .where(RevisionStepRow.round_id == round_id)
        .group_by(RevisionStepRow.status)
    ).all()
    return {"pending": 0, "done": 0, "failed": 0} | {status: int(n) for status, n in rows}


@dataclass(frozen=True)
class ChainStep:
    step: int
    principle: str
    critique: str
    revision: str
    revision_id: int


@dataclass(frozen=True)
class Chain:
    prompt_id: int
    prompt_sha256: str
    conversation: list[dict[str, str]]
    first_answer: str
    first_answer_id: int
    steps: list[ChainStep]
    """The steps done, in order; the chain's length is how many."""

    @property
    def final(self) -> str:
        return self.steps[-1].revision if self.steps else self.first_answer

    @property
    def final_id(self) -> int:
        return self.steps[-1].revision_id if self.steps else self.first_answer_id


def round_chains(session: Session, round_id: int) -> list[Chain]:
    """Every chain of the round with its first answer, in prompt order: its done steps up to the
    first one that is not done."""
    firsts = session.execute(
        select(ResponseRow.prompt_id, ResponseRow.id, ResponseRow.text, PromptRow.sha256, PromptRow.messages)
        .join(PromptRow, PromptRow.id == ResponseRow.prompt_id)
        .where(ResponseRow.round_id == round_id, ResponseRow.origin == CHAIN_ORIGIN)
        .order_by(ResponseRow.prompt_id)
    ).all()
    revision = aliased(ResponseRow)
    steps = session.execute(
        select(
            RevisionStepRow.prompt_id,
            RevisionStepRow.step,
            RevisionStepRow.status,
            PrincipleRow.key,
            RevisionStepRow.critique,
            revision.text,
            revision.id,
        )
        .join(PrincipleRow, PrincipleRow.id == RevisionStepRow.principle_id)
        .outerjoin(revision, revision.id == RevisionStepRow.revision_response_id)
        .where(RevisionStepRow.round_id == round_id)
        .order_by(RevisionStepRow.prompt_id, RevisionStepRow.step)
    ).all()
    by_prompt: dict[int, list[ChainStep]] = {}
    stopped: set[int] = set()
    for prompt_id, step, status, key, critique, text, revision_id in steps:
        if prompt_id in stopped or status != "done":
            stopped.add(prompt_id)
            continue
        by_prompt.setdefault(prompt_id, []).append(ChainStep(step, key, critique or "", text, revision_id))
    return [
        Chain(prompt_id, sha, messages, text, rid, by_prompt.get(prompt_id, []))
        for prompt_id, rid, text, sha, messages in firsts
    ]


def revisers(session: Session, round_id: int) -> list[dict[str, str | None]]:
    """Who critiqued and revised the round's chains, under which turn templates."""
    rows = session.execute(
        select(RevisionStepRow.reviser_model, RevisionStepRow.template_sha256)
        .where(RevisionStepRow.round_id == round_id, RevisionStepRow.status == "done")
        .distinct()
        .order_by(RevisionStepRow.reviser_model, RevisionStepRow.template_sha256)
    ).all()
    return [{"model": model, "template_sha256": sha} for model, sha in rows]
