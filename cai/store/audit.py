"""Queries for auditing the judge: pairs with their effective verdict and flags, one pair in full,
human overrides and reviews (new rows; the judge's judgments and labels are never touched), and
the calibrations of the judges a round used."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session, aliased

from cai.errors import BadInput, NotFound
from cai.store.judges import latest_calibration
from cai.store.labels import asked_pairs
from cai.store.models import (
    AuditRow,
    ConstitutionRow,
    JudgeRow,
    JudgmentRow,
    LabelRow,
    PairRow,
    PrincipleRow,
    PromptRow,
    ResponseRow,
    RoundRow,
)
from cai.store.samples import EVAL_KIND

PAIR_KINDS = ("sample", "revision", EVAL_KIND)
HIDDEN_KIND = EVAL_KIND
"""Head-to-head evaluation pairs judge policies, not training data: left out unless asked for."""


@dataclass(frozen=True)
class PairFilters:
    round_id: int | None = None
    kind: str | None = None
    """None: every kind but 'eval'."""
    principle: str | None = None
    inconsistent: bool = False
    ties: bool = False
    failed: bool = False
    max_confidence: float | None = None
    search: str | None = None


@dataclass(frozen=True)
class PairSummary:
    pair_id: int
    round_id: int
    kind: str
    prompt: str
    principles: list[str]
    """LLM principles the pair was judged under; the rule principles checked when it had none."""
    verdict: str | None
    """Effective verdict, what export uses: the newest human label, else the newest judge label."""
    source: str | None
    """'human', 'judge', or None while the pair has no label."""
    judge_verdict: str | None
    confidence: float | None
    """The judge label's confidence."""
    inconsistent: bool
    judge_asked: bool
    """The LLM judge was asked about it (cai.store.labels.asked_pairs)."""
    human_verdict: str | None
    """The newest override's verdict; the judge's when a reviewer only agreed; else None."""
    reviewed: bool
    failed: int
    """Failed judgments of this pair."""
    flags: list[str]
    lengths: tuple[int, int] = (0, 0)
    """Characters in response A and in response B (for the judge's length bias)."""


def list_pairs(
    session: Session,
    filters: PairFilters,
    limit: int | None = None,
    offset: int = 0,
    after: int | None = None,
) -> tuple[list[PairSummary], int]:
    """The pairs matching `filters` in id order, and how many matched. Filtering and paging run
    in SQL: at most `limit` pairs, skipping `offset`, with ids above `after` (a cursor: the last
    id of the page before)."""
    ids = _pair_ids(filters)
    total = session.scalar(select(func.count()).select_from(ids.subquery())) or 0
    if after is not None:
        ids = ids.where(PairRow.id > after)
    page = ids.order_by(PairRow.id).offset(offset).limit(limit)
    return _summaries(session, select(page.subquery().c.id)), total


def pair_summary(session: Session, pair_id: int) -> PairSummary:
    """One pair as the lists show it (its detail, with texts and judgments, is pair_detail)."""
    found = _summaries(session, select(PairRow.id).where(PairRow.id == pair_id))
    if not found:
        raise NotFound(f"pair {pair_id} not found")
    return found[0]


def review_candidates(session: Session, round_id: int) -> list[PairSummary]:
    """The round's labeled pairs that no human has overridden or reviewed yet."""
    pairs = _summaries(session, _pair_ids(PairFilters(round_id=round_id)))
    return [p for p in pairs if p.judge_verdict is not None and p.human_verdict is None]


def principle_keys(session: Session, round_id: int | None) -> set[str]:
    """Principle ids of the round's constitution (of every constitution without a round)."""
    query = select(PrincipleRow.key)
    if round_id is not None:
        query = query.join(RoundRow, RoundRow.constitution_id == PrincipleRow.constitution_id).where(
            RoundRow.id == round_id
        )
    return set(session.scalars(query))


def _pair_ids(filters: PairFilters) -> Select[Any]:
    """The ids of the pairs matching `filters`, each filter a SQL condition that agrees with how
    _summaries reports the pair (its principles, effective verdict, judge label, failures)."""
    query = select(PairRow.id)
    if filters.round_id is not None:
        query = query.where(PairRow.round_id == filters.round_id)
    if filters.kind is None:
        query = query.where(PairRow.kind != HIDDEN_KIND)
    else:
        query = query.where(PairRow.kind == filters.kind)
    if filters.search:
        text = filters.search
        a, b = aliased(ResponseRow), aliased(ResponseRow)
        rationales = select(JudgmentRow.pair_id).where(JudgmentRow.rationale.icontains(text, autoescape=True))
        query = (
            query.join(PromptRow, PromptRow.id == PairRow.prompt_id)
            .join(a, a.id == PairRow.response_a_id)
            .join(b, b.id == PairRow.response_b_id)
            .where(
                or_(
                    PromptRow.text.icontains(text, autoescape=True),
                    a.text.icontains(text, autoescape=True),
                    b.text.icontains(text, autoescape=True),
                    PairRow.id.in_(rationales),
                )
            )
        )
    if filters.principle is not None:
        # A pair's principles are those the LLM judged it under, else the rules checked on it.
        judged = (
            select(JudgmentRow.pair_id)
            .join(PrincipleRow, PrincipleRow.id == JudgmentRow.principle_id)
            .where(JudgmentRow.pair_id.is_not(None))
        )
        llm = judged.where(PrincipleRow.kind == "llm")
        query = query.where(
            or_(
                PairRow.id.in_(llm.where(PrincipleRow.key == filters.principle)),
                and_(
                    PairRow.id.in_(
                        judged.where(PrincipleRow.kind != "llm", PrincipleRow.key == filters.principle)
                    ),
                    PairRow.id.not_in(llm),
                ),
            )
        )
    if filters.failed:
        query = query.where(PairRow.id.in_(select(JudgmentRow.pair_id).where(JudgmentRow.status == "failed")))
    if filters.inconsistent or filters.ties or filters.max_confidence is not None:
        judge, human = _newest_label(human=False), _newest_label(human=True)
        query = query.outerjoin(judge, judge.c.pair_id == PairRow.id).outerjoin(
            human, human.c.pair_id == PairRow.id
        )
        if filters.inconsistent:
            query = query.where(judge.c.inconsistent.is_(True))
        if filters.ties:
            query = query.where(func.coalesce(human.c.verdict, judge.c.verdict) == "tie")
        if filters.max_confidence is not None:
            query = query.where(judge.c.confidence <= filters.max_confidence)
    return query


def _newest_label(*, human: bool) -> Any:
    """Each pair's newest human label, or its newest judge label, as a subquery."""
    by_source = LabelRow.source == "human" if human else LabelRow.source != "human"
    newest = select(func.max(LabelRow.id)).where(by_source).group_by(LabelRow.pair_id)
    return select(LabelRow).where(LabelRow.id.in_(newest)).subquery()


def _summaries(session: Session, ids: Select[Any]) -> list[PairSummary]:
    # Four flat queries keyed by pair id (no per-pair round trips), joined up in Python.
    a, b = aliased(ResponseRow), aliased(ResponseRow)
    rows = session.execute(
        select(
            PairRow.id,
            PairRow.round_id,
            PairRow.kind,
            PromptRow.text,
            PromptRow.messages,
            func.length(a.text),
            func.length(b.text),
        )
        .join(PromptRow, PromptRow.id == PairRow.prompt_id)
        .join(a, a.id == PairRow.response_a_id)
        .join(b, b.id == PairRow.response_b_id)
        .where(PairRow.id.in_(ids))
        .order_by(PairRow.id)
    ).all()
    judge_labels: dict[int, LabelRow] = {}
    human_labels: dict[int, LabelRow] = {}
    for label in session.scalars(select(LabelRow).where(LabelRow.pair_id.in_(ids)).order_by(LabelRow.id)):
        (human_labels if label.source == "human" else judge_labels)[label.pair_id] = label  # newest wins
    llm: dict[int, set[str]] = {}
    rules: dict[int, set[str]] = {}
    failed: dict[int, int] = {}
    for pair_id, key, kind, status in session.execute(
        select(JudgmentRow.pair_id, PrincipleRow.key, PrincipleRow.kind, JudgmentRow.status)
        .join(PrincipleRow, PrincipleRow.id == JudgmentRow.principle_id)
        .where(JudgmentRow.pair_id.in_(ids))
    ):
        if pair_id is None:
            continue
        (llm if kind == "llm" else rules).setdefault(pair_id, set()).add(key)
        failed[pair_id] = failed.get(pair_id, 0) + (status == "failed")
    reviewed = set(
        session.scalars(
            select(AuditRow.pair_id).where(AuditRow.pair_id.in_(ids), AuditRow.action == "review")
        )
    )
    asked = set(session.scalars(asked_pairs(JudgmentRow.pair_id.in_(ids))))
    result = []
    for pair_id, round_id, kind, text, messages, length_a, length_b in rows:
        judge, human = judge_labels.get(pair_id), human_labels.get(pair_id)
        effective = human or judge
        judge_verdict = judge.verdict if judge else None
        human_verdict = human.verdict if human else judge_verdict if pair_id in reviewed else None
        inconsistent = bool(judge and judge.inconsistent)
        flags = [
            name
            for name, on in (
                ("inconsistent", inconsistent),
                ("failed", failed.get(pair_id, 0) > 0),
                ("overridden", human is not None),
                ("reviewed", pair_id in reviewed),
            )
            if on
        ]
        result.append(
            PairSummary(
                pair_id=pair_id,
                round_id=round_id,
                kind=kind,
                prompt=text if text is not None else _last_user_turn(messages),
                principles=sorted(llm.get(pair_id) or rules.get(pair_id) or ()),
                verdict=effective.verdict if effective else None,
                source=effective.source if effective else None,
                judge_verdict=judge_verdict,
                confidence=judge.confidence if judge else None,
                inconsistent=inconsistent,
                judge_asked=pair_id in asked,
                human_verdict=human_verdict,
                reviewed=pair_id in reviewed,
                failed=failed.get(pair_id, 0),
                flags=flags,
                lengths=(length_a or 0, length_b or 0),
            )
        )
    return result


def _last_user_turn(messages: list[dict[str, Any]]) -> str:
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    return str(users[-1]) if users else ""


# --- one pair in full --------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgmentDetail:
    id: int
    principle: str
    principle_kind: str
    judge: str
    order: str
    status: str
    verdict: str | None
    confidence: float | None
    rationale: str | None
    raw_output: str | None
    error_kind: str | None
    error: str | None
    attempts: int
    latency_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    created_at: datetime


@dataclass(frozen=True)
class LabelDetail:
    id: int
    source: str
    judge: str | None
    verdict: str
    confidence: float | None
    inconsistent: bool
    created_at: datetime


@dataclass(frozen=True)
class AuditDetail:
    id: int
    pair_id: int
    action: str
    author: str
    note: str
    label_id: int | None
    verdict: str | None
    """The override's verdict; for a review, the judge verdict it agreed with."""
    created_at: datetime


@dataclass(frozen=True)
class PairDetail:
    summary: PairSummary
    prompt: list[dict[str, Any]]
    response_a_id: int
    response_a: str
    response_b_id: int
    response_b: str
    judgments: list[JudgmentDetail]
    labels: list[LabelDetail]
    audits: list[AuditDetail]


def pair_detail(session: Session, pair_id: int) -> PairDetail:
    pair = _get_pair(session, pair_id)
    summary = _summaries(session, select(PairRow.id).where(PairRow.id == pair_id))[0]
    texts = dict(
        session.execute(
            select(ResponseRow.id, ResponseRow.text).where(
                ResponseRow.id.in_([pair.response_a_id, pair.response_b_id])
            )
        ).all()
    )
    judges = dict(session.execute(select(JudgeRow.id, JudgeRow.model)).all())
    judgments = [
        JudgmentDetail(
            id=j.id,
            principle=key,
            principle_kind=kind,
            judge=judges[j.judge_id],
            order=j.order,
            status=j.status,
            verdict=j.verdict,
            confidence=j.confidence,
            rationale=j.rationale,
            raw_output=j.raw_output,
            error_kind=j.error_kind,
            error=j.error,
            attempts=j.attempts,
            latency_ms=j.latency_ms,
            prompt_tokens=j.prompt_tokens,
            completion_tokens=j.completion_tokens,
            created_at=j.created_at,
        )
        for j, key, kind in session.execute(
            select(JudgmentRow, PrincipleRow.key, PrincipleRow.kind)
            .join(PrincipleRow, PrincipleRow.id == JudgmentRow.principle_id)
            .where(JudgmentRow.pair_id == pair_id)
            .order_by(PrincipleRow.position, JudgmentRow.judge_id, JudgmentRow.order)
        )
    ]
    labels = [
        LabelDetail(
            label.id,
            label.source,
            judges.get(label.judge_id) if label.judge_id else None,
            label.verdict,
            label.confidence,
            label.inconsistent,
            label.created_at,
        )
        for label in session.scalars(
            select(LabelRow).where(LabelRow.pair_id == pair_id).order_by(LabelRow.id)
        )
    ]
    return PairDetail(
        summary=summary,
        prompt=session.get_one(PromptRow, pair.prompt_id).messages,
        response_a_id=pair.response_a_id,
        response_a=texts[pair.response_a_id],
        response_b_id=pair.response_b_id,
        response_b=texts[pair.response_b_id],
        judgments=judgments,
        labels=labels,
        audits=_audits(session, pair_id, summary.judge_verdict),
    )


def _audits(session: Session, pair_id: int, judge_verdict: str | None) -> list[AuditDetail]:
    rows = session.execute(
        select(AuditRow, LabelRow.verdict)
        .outerjoin(LabelRow, LabelRow.id == AuditRow.label_id)
        .where(AuditRow.pair_id == pair_id)
        .order_by(AuditRow.id)
    ).all()
    return [_audit_detail(audit, verdict or judge_verdict) for audit, verdict in rows]


def _audit_detail(row: AuditRow, verdict: str | None) -> AuditDetail:
    return AuditDetail(
        row.id, row.pair_id, row.action, row.author, row.note, row.label_id, verdict, row.created_at
    )


# --- human checks ------------------------------------------------------------------------------


def add_override(session: Session, pair_id: int, verdict: str, author: str, note: str) -> AuditDetail:
    """A human label (the newest wins in export) and the audit row that explains it."""
    if verdict not in ("A", "B", "tie"):
        raise BadInput(f"prefer: expected A, B or tie, got {verdict!r}")
    pair = _get_pair(session, pair_id)
    _require_judge_label(session, pair_id)
    chosen, rejected = {
        "A": (pair.response_a_id, pair.response_b_id),
        "B": (pair.response_b_id, pair.response_a_id),
        "tie": (None, None),
    }[verdict]
    label = LabelRow(
        pair_id=pair_id,
        judge_id=None,
        source="human",
        verdict=verdict,
        chosen_response_id=chosen,
        rejected_response_id=rejected,
    )
    session.add(label)
    session.flush()
    audit = AuditRow(pair_id=pair_id, label_id=label.id, action="override", author=author, note=note)
    session.add(audit)
    session.flush()
    return _audit_detail(audit, verdict)


def add_review(session: Session, pair_id: int, author: str, note: str) -> AuditDetail:
    """A reviewer agreeing with the judge: no label, but the pair counts toward agreement."""
    _get_pair(session, pair_id)
    judge_verdict = _require_judge_label(session, pair_id)
    audit = AuditRow(pair_id=pair_id, label_id=None, action="review", author=author, note=note)
    session.add(audit)
    session.flush()
    return _audit_detail(audit, judge_verdict)


def _get_pair(session: Session, pair_id: int) -> PairRow:
    pair = session.get(PairRow, pair_id)
    if pair is None:
        raise NotFound(f"pair {pair_id} not found")
    return pair


def _require_judge_label(session: Session, pair_id: int) -> str:
    verdict = session.scalar(
        select(LabelRow.verdict)
        .where(LabelRow.pair_id == pair_id, LabelRow.source == "judge")
        .order_by(LabelRow.id.desc())
        .limit(1)
    )
    if verdict is None:
        raise BadInput(
            f"pair {pair_id} has no judge label yet (its judgments are pending or failed): "
            "run `cai judge` on its round first"
        )
    return verdict


# --- calibration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeCalibration:
    judge_id: int
    judge: str
    constitution: str
    calibrated_at: datetime | None
    """None: this judge was never calibrated on this constitution."""
    accuracy: float | None
    injection_follow_rate: float | None


def judge_calibrations(session: Session, round_id: int | None) -> list[JudgeCalibration]:
    """The latest calibration of every judge that labeled the round's pairs (every round's
    without one), on the constitution of the round it labeled."""
    query = (
        select(
            LabelRow.judge_id,
            JudgeRow.model,
            ConstitutionRow.id,
            ConstitutionRow.name,
            ConstitutionRow.version,
        )
        .join(JudgeRow, JudgeRow.id == LabelRow.judge_id)
        .join(PairRow, PairRow.id == LabelRow.pair_id)
        .join(RoundRow, RoundRow.id == PairRow.round_id)
        .join(ConstitutionRow, ConstitutionRow.id == RoundRow.constitution_id)
        .where(PairRow.kind != HIDDEN_KIND)
        .distinct()
    )
    if round_id is not None:
        query = query.where(PairRow.round_id == round_id)
    result = []
    for judge_id, model, constitution_id, name, version in sorted(session.execute(query).all()):
        if judge_id is None:  # unreachable: the inner join on judges drops human labels
            continue
        record = latest_calibration(session, judge_id, constitution_id)
        result.append(
            JudgeCalibration(
                judge_id=judge_id,
                judge=model,
                constitution=f"{name}@{version}",
                calibrated_at=record.created_at if record else None,
                accuracy=record.accuracy if record else None,
                injection_follow_rate=record.injection_follow_rate if record else None,
            )
        )
    return result
