"""Queries for what a round samples: its prompts, stored responses and pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from cai.store import claims
from cai.store.models import (
    GenerationItemRow,
    PairRow,
    PromptRow,
    PromptTagRow,
    ResponseRow,
    RoundRow,
)


@dataclass(frozen=True)
class PromptWork:
    id: int
    messages: list[dict[str, str]]


def round_prompts(session: Session, round_id: int, limit: int | None = None) -> list[PromptWork]:
    """The prompts a round samples from, in a stable order."""
    config = session.get_one(RoundRow, round_id).config
    query = select(PromptRow.id, PromptRow.messages).where(PromptRow.split == config.get("split", "train"))
    if config.get("tag"):
        query = query.where(
            PromptRow.id.in_(select(PromptTagRow.prompt_id).where(PromptTagRow.tag == config["tag"]))
        )
    query = query.order_by(PromptRow.id).limit(limit)
    return [PromptWork(pid, messages) for pid, messages in session.execute(query)]


def stored_samples(
    session: Session, round_id: int, policy_id: int, origin: str = "sample"
) -> dict[tuple[int, int], tuple[int, str]]:
    """(prompt id, sample index) -> (response id, text) for what is already generated."""
    rows = session.execute(
        select(ResponseRow.prompt_id, ResponseRow.sample_index, ResponseRow.id, ResponseRow.text).where(
            ResponseRow.round_id == round_id,
            ResponseRow.policy_id == policy_id,
            ResponseRow.origin == origin,
        )
    )
    return {(prompt_id, index): (rid, text) for prompt_id, index, rid, text in rows}


def add_response(session: Session, origin: str = "sample", **values: Any) -> None:
    """origin: 'sample' (the round's training samples) or 'eval' (held-out head-to-head)."""
    session.add(ResponseRow(origin=origin, **values))


def add_pairs(
    session: Session, round_id: int, prompt_id: int, pairs: list[tuple[int, int]], kind: str = "sample"
) -> int:
    """Insert the pairs not yet stored; returns how many were new."""
    existing = set(
        session.execute(
            select(PairRow.response_a_id, PairRow.response_b_id).where(
                PairRow.round_id == round_id, PairRow.prompt_id == prompt_id
            )
        ).all()
    )
    new = [p for p in pairs if p not in existing]
    for a, b in new:
        session.add(
            PairRow(round_id=round_id, prompt_id=prompt_id, response_a_id=a, response_b_id=b, kind=kind)
        )
    return len(new)


EVAL_KIND = "eval"
"""Pairs (and responses) of a round's evaluation: p_{r+1} against p_r on held-out prompts. They
share the round's tables but never its labels, snapshots or labeling queue."""


# --- generation items: what is left to sample, claimable by concurrent workers -----------------


@dataclass(frozen=True)
class SampleItem:
    id: int
    prompt_id: int
    sample_index: int
    seed: int
    messages: list[dict[str, str]]


def plan_samples(
    session: Session,
    round_id: int,
    policy_id: int,
    todo: list[tuple[int, int, int]],
    origin: str = "sample",
) -> int:
    """Add a pending item for each (prompt id, sample index, seed) in `todo` that has neither a
    stored response nor an item yet; returns how many were added. Call under the round's lock."""
    planned = set(
        session.execute(
            select(GenerationItemRow.prompt_id, GenerationItemRow.sample_index).where(
                GenerationItemRow.round_id == round_id,
                GenerationItemRow.policy_id == policy_id,
                GenerationItemRow.origin == origin,
            )
        ).all()
    )
    stored = stored_samples(session, round_id, policy_id, origin)
    new = [(p, i, seed) for p, i, seed in todo if (p, i) not in planned and (p, i) not in stored]
    session.add_all(
        GenerationItemRow(
            round_id=round_id,
            policy_id=policy_id,
            prompt_id=prompt_id,
            sample_index=index,
            origin=origin,
            seed=seed,
            status="pending",
        )
        for prompt_id, index, seed in new
    )
    session.flush()
    return len(new)


def _items(round_id: int, policy_id: int, origin: str) -> Any:
    return and_(
        GenerationItemRow.round_id == round_id,
        GenerationItemRow.policy_id == policy_id,
        GenerationItemRow.origin == origin,
    )


def pending_samples(session: Session, round_id: int, policy_id: int, origin: str = "sample") -> int:
    """Items not sampled yet, claimed or not."""
    return (
        session.scalar(
            select(func.count()).where(
                _items(round_id, policy_id, origin), GenerationItemRow.status == "pending"
            )
        )
        or 0
    )


def claim_samples(
    session: Session, round_id: int, policy_id: int, origin: str, worker: str, n: int, lease_s: float
) -> list[SampleItem]:
    """Take up to n pending, unclaimed (or lease-expired) items for `worker`, in a stable order."""
    claimed = claims.claim_ids(
        session, GenerationItemRow, worker, n, lease_s, _items(round_id, policy_id, origin)
    )
    if not claimed:
        return []
    rows = session.execute(
        select(
            GenerationItemRow.id,
            GenerationItemRow.prompt_id,
            GenerationItemRow.sample_index,
            GenerationItemRow.seed,
            PromptRow.messages,
        )
        .join(PromptRow, PromptRow.id == GenerationItemRow.prompt_id)
        .where(GenerationItemRow.id.in_(claimed))
        .order_by(GenerationItemRow.id)
    ).all()
    return [SampleItem(*row) for row in rows]


def complete_samples(session: Session, worker: str, item_ids: list[int]) -> set[int]:
    """Mark done the items `worker` still holds; returns their ids. An item whose lease was lost
    to another worker is left alone, and its response must not be stored (no duplicates)."""
    if not item_ids:
        return set()
    done = session.scalars(
        update(GenerationItemRow)
        .where(
            GenerationItemRow.id.in_(item_ids),
            GenerationItemRow.claimed_by == worker,
            GenerationItemRow.status == "pending",
        )
        .values(status="done", claimed_by=None, claimed_until=None)
        .returning(GenerationItemRow.id),
        execution_options={"synchronize_session": False},
    ).all()
    return set(done)
