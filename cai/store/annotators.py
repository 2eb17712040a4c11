"""Several annotators on one round: each one's labels (their newest override or review of a pair),
review queues per annotator cut from the stratified sampler with an overlap, and the next pair
in a queue."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from cai.audit import HumanAgreement, human_agreement, queue_size, review_queue, split_queues
from cai.errors import BadInput
from cai.store.actions import record
from cai.store.audit import HIDDEN_KIND, PairSummary, pair_summary, review_candidates
from cai.store.models import AuditRow, LabelRow, PairRow, ReviewAssignmentRow


def human_ratings(session: Session, round_id: int | None) -> dict[int, dict[str, str]]:
    """Pair id -> annotator -> verdict, over training pairs (not evaluation ones): an annotator's
    newest audit of a pair counts, an override as its verdict and a review as the judge's
    verdict it agreed with."""
    query = (
        select(AuditRow.pair_id, AuditRow.author, AuditRow.action, LabelRow.verdict)
        .join(PairRow, PairRow.id == AuditRow.pair_id)
        .outerjoin(LabelRow, LabelRow.id == AuditRow.label_id)
        .where(PairRow.kind != HIDDEN_KIND)
        .order_by(AuditRow.id)
    )
    if round_id is not None:
        query = query.where(PairRow.round_id == round_id)
    audits = session.execute(query).all()
    judged = _judge_verdicts(session, {pair_id for pair_id, _, action, _ in audits if action == "review"})
    ratings: dict[int, dict[str, str]] = {}
    for pair_id, author, action, verdict in audits:  # oldest first: an author's newest wins
        given = verdict if action == "override" else judged.get(pair_id)
        if given is not None:
            ratings.setdefault(pair_id, {})[author] = given
    return ratings


def _judge_verdicts(session: Session, pair_ids: set[int]) -> dict[int, str]:
    newest = (
        select(func.max(LabelRow.id))
        .where(LabelRow.source != "human", LabelRow.pair_id.in_(pair_ids))
        .group_by(LabelRow.pair_id)
    )
    return dict(
        session.execute(select(LabelRow.pair_id, LabelRow.verdict).where(LabelRow.id.in_(newest))).all()
    )


def agreement_between_humans(session: Session, round_id: int | None) -> HumanAgreement:
    return human_agreement(human_ratings(session, round_id))


def assign_queues(
    session: Session,
    round_id: int,
    annotators: Sequence[str],
    per_annotator: int,
    overlap: float,
    seed: int,
    assigned_by: str,
) -> dict[str, list[int]]:
    """Give each annotator a queue of the round's unchecked labeled pairs, drawn by the
    stratified sampler (cai.audit.review_queue) and split with `overlap` shared
    (cai.audit.split_queues). An annotator's pairs not yet done from an earlier assignment on
    this round are replaced; the ones done stay on record."""
    names = [name.strip() for name in annotators]
    if not names or any(not name or len(name) > 200 for name in names):
        raise BadInput("annotators: give one or more names of 1 to 200 characters")
    if len(set(names)) != len(names):
        raise BadInput("annotators: a name is given twice")
    if not 0 <= overlap <= 1:
        raise BadInput("overlap: expected a share between 0 and 1")
    if per_annotator < 1:
        raise BadInput("per_annotator: expected at least 1")
    for name in names:
        done = select(AuditRow.pair_id).where(AuditRow.author == name)
        session.execute(
            delete(ReviewAssignmentRow).where(
                ReviewAssignmentRow.round_id == round_id,
                ReviewAssignmentRow.annotator == name,
                ReviewAssignmentRow.pair_id.not_in(done),
            )
        )
    already = set(
        session.execute(
            select(ReviewAssignmentRow.annotator, ReviewAssignmentRow.pair_id).where(
                ReviewAssignmentRow.round_id == round_id
            )
        ).all()
    )
    picks = review_queue(
        review_candidates(session, round_id), queue_size(len(names), per_annotator, overlap), seed
    )
    queues = split_queues([p.pair_id for p in picks], names, per_annotator, overlap)
    shared = round(overlap * per_annotator)
    for name, pair_ids in queues.items():
        start: int = (
            session.scalar(
                select(func.coalesce(func.max(ReviewAssignmentRow.position) + 1, 0)).where(
                    ReviewAssignmentRow.round_id == round_id, ReviewAssignmentRow.annotator == name
                )
            )
            or 0
        )
        fresh = [pair_id for pair_id in pair_ids if (name, pair_id) not in already]
        session.add_all(
            ReviewAssignmentRow(
                round_id=round_id,
                annotator=name,
                pair_id=pair_id,
                position=start + i,
                shared=pair_id in pair_ids[:shared],
                assigned_by=assigned_by,
            )
            for i, pair_id in enumerate(fresh)
        )
    session.flush()
    record(
        session,
        assigned_by,
        "queues.assign",
        f"round {round_id}",
        annotators=names,
        per_annotator=per_annotator,
        overlap=overlap,
        seed=seed,
    )
    return queues


@dataclass(frozen=True)
class QueueState:
    round_id: int
    annotator: str
    assigned: int
    done: int
    """Assigned pairs this annotator has overridden or reviewed."""
    next: PairSummary | None
    """The first pair in queue order not done yet; None when the queue is finished or empty."""


def queue_state(session: Session, round_id: int, annotator: str) -> QueueState:
    assigned = session.execute(
        select(ReviewAssignmentRow.pair_id)
        .where(ReviewAssignmentRow.round_id == round_id, ReviewAssignmentRow.annotator == annotator)
        .order_by(ReviewAssignmentRow.position)
    ).scalars()
    order = list(assigned)
    done = set(
        session.scalars(
            select(AuditRow.pair_id).where(AuditRow.author == annotator, AuditRow.pair_id.in_(order))
        )
    )
    waiting = [pair_id for pair_id in order if pair_id not in done]
    return QueueState(
        round_id, annotator, len(order), len(done), pair_summary(session, waiting[0]) if waiting else None
    )
