"""Labels from stored judgments: pairwise aggregation, score-mode best-vs-worst pairs, revision
pairs, and the per-round judge summary."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from cai.constitution import Constitution
from cai.judge import PairLabel, Revision, Verdict
from cai.labelling import LabelPolicy, best_and_worst, chosen_and_rejected, flip_rate, pair_label
from cai.rules import RuleCheck
from cai.store.judges import RULES_JUDGE
from cai.store.models import (
    JudgeRow,
    JudgmentRow,
    LabelRow,
    PairRow,
    ResponseRow,
)
from cai.store.queue import in_round
from cai.store.samples import EVAL_KIND


def aggregate_scores(session: Session, round_id: int, judge_id: int) -> int:
    """Score mode: per prompt whose samples are all scored, best vs worst becomes a labelled pair
    (Self-Rewarding LMs); equal scores teach nothing and are dropped. Returns new labels."""
    rows = session.execute(
        select(ResponseRow.prompt_id, ResponseRow.id, JudgmentRow.status, JudgmentRow.score)
        .join(JudgmentRow, and_(JudgmentRow.response_id == ResponseRow.id, JudgmentRow.judge_id == judge_id))
        .where(ResponseRow.round_id == round_id, ResponseRow.origin == "sample")
        .order_by(ResponseRow.prompt_id, ResponseRow.id)
    ).all()
    by_prompt: dict[int, list[tuple[int, str, float | None]]] = {}
    for prompt_id, response_id, status, score in rows:
        by_prompt.setdefault(prompt_id, []).append((response_id, status, score))
    created = 0
    for prompt_id, scored in by_prompt.items():
        if any(status != "ok" for _, status, _ in scored):
            continue
        decided = best_and_worst([(rid, float(score or 0)) for rid, _, score in scored])
        if decided is None:
            continue
        best, worst, confidence = decided
        pair_id, pair_a = _pair(session, round_id, prompt_id, best, worst, "sample")
        if session.scalar(
            select(LabelRow.id).where(LabelRow.pair_id == pair_id, LabelRow.judge_id == judge_id)
        ):
            continue
        # A generation-time pair may hold the two the other way round: label in its own terms.
        verdict = "A" if pair_a == best else "B"
        a, b = (best, worst) if verdict == "A" else (worst, best)
        session.add(_label_row(pair_id, judge_id, PairLabel(verdict, confidence, False), a, b))
        created += 1
    session.flush()
    return created


def materialise_revisions(session: Session, round_id: int, revise_judge_id: int) -> int:
    """Revise mode: each successful revision becomes a response (origin 'revision') paired with
    its original as a 'revision' pair (A = original, B = revision), ready for pairwise judging."""
    made = select(ResponseRow.sampling["judgment_id"].as_integer()).where(
        ResponseRow.round_id == round_id, ResponseRow.origin == "revision"
    )
    rows = session.execute(
        select(JudgmentRow.id, JudgmentRow.principle_id, JudgmentRow.raw_output, ResponseRow)
        .join(ResponseRow, ResponseRow.id == JudgmentRow.response_id)
        .where(
            JudgmentRow.judge_id == revise_judge_id,
            JudgmentRow.status == "ok",
            ResponseRow.round_id == round_id,
            JudgmentRow.id.not_in(made),
        )
    ).all()
    for judgment_id, principle_id, raw_output, original in rows:
        revision = _revision_text(raw_output, original.text)
        row = ResponseRow(
            round_id=round_id,
            prompt_id=original.prompt_id,
            policy_id=original.policy_id,
            sample_index=REVISION_INDEX_BASE + judgment_id,
            origin="revision",
            revised_from_id=original.id,
            text=revision,
            sampling={"judgment_id": judgment_id, "principle_id": principle_id},
        )
        session.add(row)
        session.flush()
        _pair(session, round_id, original.prompt_id, original.id, row.id, "revision")
    session.flush()
    return len(rows)


REVISION_INDEX_BASE = 1_000_000
"""Revisions take sample indices above any sampled one, keyed by the judgment that wrote them."""


def _revision_text(raw_output: str | None, original: str) -> str:
    from cai.judge import parse_revision

    parsed: Revision = parse_revision(raw_output or "", original)
    return parsed.revision


def _pair(session: Session, round_id: int, prompt_id: int, a: int, b: int, kind: str) -> tuple[int, int]:
    """(pair id, its response A) for these two responses, in either order; created if new."""
    existing = session.execute(
        select(PairRow.id, PairRow.response_a_id).where(
            PairRow.round_id == round_id,
            or_(
                and_(PairRow.response_a_id == a, PairRow.response_b_id == b),
                and_(PairRow.response_a_id == b, PairRow.response_b_id == a),
            ),
        )
    ).first()
    if existing is not None:
        return existing[0], existing[1]
    row = PairRow(round_id=round_id, prompt_id=prompt_id, response_a_id=a, response_b_id=b, kind=kind)
    session.add(row)
    session.flush()
    return row.id, a


# --- labels ------------------------------------------------------------------------------------


def aggregate_labels(
    session: Session, round_id: int, judge_id: int, rules_judge_id: int, constitution: Constitution
) -> int:
    """Create the label of every pair whose judgments are all done and that has none yet."""
    labelled = select(LabelRow.pair_id).where(LabelRow.judge_id == judge_id)
    pairs = session.execute(
        select(PairRow.id, PairRow.response_a_id, PairRow.response_b_id).where(
            PairRow.round_id == round_id, PairRow.kind != EVAL_KIND, PairRow.id.not_in(labelled)
        )
    ).all()
    if not pairs:
        return 0
    by_pair: dict[int, list[JudgmentRow]] = {}
    for row in session.scalars(
        select(JudgmentRow).where(
            JudgmentRow.pair_id.in_([p[0] for p in pairs]),
            JudgmentRow.judge_id.in_([judge_id, rules_judge_id]),
        )
    ):
        if row.pair_id is not None:
            by_pair.setdefault(row.pair_id, []).append(row)
    has_llm = any(p.kind == "llm" for p in constitution.principles)
    band = judge_label_policy(session, judge_id).band
    created = 0
    for pair_id, response_a, response_b in pairs:
        rows = by_pair.get(pair_id, [])
        checks = [rule_check(r) for r in rows if r.judge_id == rules_judge_id]
        label = pair_label(
            checks, verdicts_by_principle(r for r in rows if r.judge_id == judge_id), has_llm, band
        )
        if label is None:
            continue
        session.add(_label_row(pair_id, judge_id, label, response_a, response_b))
        created += 1
    session.flush()
    return created


def stored_verdict(row: JudgmentRow) -> Verdict:
    return Verdict(row.verdict or "tie", row.rationale or "", row.confidence, row.choice_probs)


def verdicts_by_principle(rows: Iterable[JudgmentRow]) -> dict[str, dict[str, Verdict | None]]:
    """An LLM judge's judgments of one pair as pair_label reads them: principle -> order ->
    verdict (None until done, or when failed)."""
    llm: dict[str, dict[str, Verdict | None]] = {}
    for r in rows:
        llm.setdefault(str(r.principle_id), {})[r.order] = stored_verdict(r) if r.status == "ok" else None
    return llm


def judge_label_policy(session: Session, judge_id: int) -> LabelPolicy:
    """How `judge_id`'s verdicts become labels (its ensemble size, its probability band)."""
    return LabelPolicy.of(session.scalar(select(JudgeRow.params).where(JudgeRow.id == judge_id)) or {})


def rule_check(row: JudgmentRow) -> RuleCheck:
    passes = json.loads(row.raw_output or "{}")
    return RuleCheck(str(row.principle_id), bool(passes.get("a_passes")), bool(passes.get("b_passes")))


def _label_row(pair_id: int, judge_id: int, label: PairLabel, response_a: int, response_b: int) -> LabelRow:
    chosen, rejected = chosen_and_rejected(label.verdict, response_a, response_b)
    return LabelRow(
        pair_id=pair_id,
        judge_id=judge_id,
        source="judge",
        verdict=label.verdict,
        chosen_response_id=chosen,
        rejected_response_id=rejected,
        confidence=label.confidence,
        inconsistent=label.inconsistent,
    )


# --- summary -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeSummary:
    pairs: int
    labeled: int
    ties: int
    inconsistent: int
    pending: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    judge_labeled: int = 0
    """Labeled pairs the LLM judge was asked about (all of them unless judged rules-first)."""

    @property
    def flip_rate(self) -> float | None:
        return flip_rate(self.inconsistent, self.judge_labeled)


def asked_pairs(*where: Any) -> Any:
    """Ids of the pairs an LLM judge was asked about: those with a judgment that is not a rule
    check. The one definition of "the LLM was asked" behind every flip rate (cai.labelling)."""
    return select(JudgmentRow.pair_id).where(
        JudgmentRow.pair_id.is_not(None), JudgmentRow.template_sha256 != RULES_JUDGE.template_sha256, *where
    )


def judge_summary(session: Session, round_id: int, judge_id: int) -> JudgeSummary:
    pair_ids = select(PairRow.id).where(PairRow.round_id == round_id, PairRow.kind != EVAL_KIND)
    labels = select(LabelRow).where(LabelRow.pair_id.in_(pair_ids), LabelRow.judge_id == judge_id).subquery()
    judgments = and_(in_round(round_id), JudgmentRow.judge_id == judge_id)

    def scalar(query: Any) -> Any:
        return session.scalar(query) or 0

    return JudgeSummary(
        pairs=scalar(select(func.count()).select_from(pair_ids.subquery())),
        labeled=scalar(select(func.count()).select_from(labels)),
        ties=scalar(select(func.count()).select_from(labels).where(labels.c.verdict == "tie")),
        inconsistent=scalar(select(func.count()).select_from(labels).where(labels.c.inconsistent.is_(True))),
        pending=scalar(select(func.count()).where(judgments, JudgmentRow.status == "pending")),
        failed=scalar(select(func.count()).where(judgments, JudgmentRow.status == "failed")),
        prompt_tokens=scalar(select(func.sum(JudgmentRow.prompt_tokens)).where(judgments)),
        completion_tokens=scalar(select(func.sum(JudgmentRow.completion_tokens)).where(judgments)),
        cost_usd=float(scalar(select(func.sum(JudgmentRow.cost_usd)).where(judgments))),
        judge_labeled=scalar(
            select(func.count())
            .select_from(labels)
            .where(labels.c.pair_id.in_(asked_pairs(JudgmentRow.judge_id == judge_id)))
        ),
    )
