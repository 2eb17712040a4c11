"""Queries for export: each pair's effective label (a human override beats the judge) with the
provenance a snapshot row carries, and the snapshots table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from cai.errors import NotFound
from cai.judge import Verdict, prob_a
from cai.store import judges
from cai.store.models import (
    ConstitutionRow,
    JudgeRow,
    JudgmentRow,
    LabelRow,
    PairRow,
    PolicyRow,
    PrincipleRow,
    PromptRow,
    ResponseRow,
    RoundRow,
    SnapshotRow,
    TrainingRunRow,
)
from cai.store.repo import lineage_rows
from cai.store.samples import EVAL_KIND


@dataclass(frozen=True)
class PrincipleVerdict:
    """One principle's verdict on a pair in one order, as the label's judge gave it (pair terms)."""

    principle: str
    order: str
    verdict: str
    prob_a: float | None


@dataclass(frozen=True)
class LabelledPair:
    pair_id: int
    kind: str
    prompt_sha256: str
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    verdict: str
    confidence: float | None
    source: str
    """'human', 'rule' (rule principles decided it) or 'judge'."""
    principle: str | None
    """The (first) judged principle the pair was labelled under; rules aside."""
    judge: str | None
    verdicts: tuple[PrincipleVerdict, ...] = ()
    """Every judged principle's verdict in each order, from the judge whose label this is."""
    lengths: tuple[int, int] = (0, 0)
    """Words in the chosen and the rejected response."""
    responses: tuple[int, int] = (0, 0)
    """The pair's response ids, A then B."""


def labelled_pairs(session: Session, round_id: int) -> list[LabelledPair]:
    """Every pair of the round that has a label, with its effective label: the newest human
    label if any, else the newest judge label. Ties are included (callers filter)."""
    a, b = aliased(ResponseRow), aliased(ResponseRow)
    rows = session.execute(
        select(PairRow.id, PairRow.kind, PromptRow.sha256, PromptRow.messages, a.id, a.text, b.id, b.text)
        .join(PromptRow, PromptRow.id == PairRow.prompt_id)
        .join(a, a.id == PairRow.response_a_id)
        .join(b, b.id == PairRow.response_b_id)
        .where(PairRow.round_id == round_id, PairRow.kind != EVAL_KIND)  # eval pairs never train
        .order_by(PairRow.id)
    ).all()
    pair_ids = [row[0] for row in rows]
    labels: dict[int, LabelRow] = {}
    for label in session.scalars(
        select(LabelRow).where(LabelRow.pair_id.in_(pair_ids)).order_by(LabelRow.id)
    ):
        current = labels.get(label.pair_id)
        if current is None or label.source == "human" or current.source != "human":
            labels[label.pair_id] = label  # newest wins, and human beats judge
    judges = dict(session.execute(select(JudgeRow.id, JudgeRow.model)).all())
    principles: dict[int, str] = {}
    verdicts: dict[int, list[PrincipleVerdict]] = {}
    rule_splits: set[int] = set()
    # The columns a verdict needs, not whole rows: raw outputs and rationales stay in the database.
    for judged_pair, judge_id, key, principle_kind, order, verdict, choice_probs in session.execute(
        select(
            JudgmentRow.pair_id,
            JudgmentRow.judge_id,
            PrincipleRow.key,
            PrincipleRow.kind,
            JudgmentRow.order,
            JudgmentRow.verdict,
            JudgmentRow.choice_probs,
        )
        .join(PrincipleRow, PrincipleRow.id == JudgmentRow.principle_id)
        .where(JudgmentRow.pair_id.in_(pair_ids), JudgmentRow.status == "ok")
        .order_by(JudgmentRow.id)  # planned in the order the principles were drawn
    ):
        if judged_pair is None:
            continue
        if principle_kind == "llm":
            principles.setdefault(judged_pair, key)
            labelled_by = labels.get(judged_pair)
            if labelled_by is not None and labelled_by.judge_id == judge_id:
                p_a = prob_a(Verdict(verdict or "tie", "", None, choice_probs))
                verdicts.setdefault(judged_pair, []).append(
                    PrincipleVerdict(key, order, verdict or "tie", p_a)
                )
        elif verdict in ("A", "B"):
            rule_splits.add(judged_pair)
    result = []
    for pair_id, kind, prompt_sha, messages, a_id, a_text, b_id, b_text in rows:
        effective = labels.get(pair_id)
        if effective is None:
            continue
        texts = {a_id: a_text, b_id: b_text}
        chosen = texts.get(effective.chosen_response_id or -1, "")
        rejected = texts.get(effective.rejected_response_id or -1, "")
        if effective.source == "human":
            source = "human"
        elif pair_id in rule_splits:
            source = "rule"
        else:
            source = "judge"
        result.append(
            LabelledPair(
                pair_id=pair_id,
                kind=kind,
                prompt_sha256=prompt_sha,
                prompt=messages,
                chosen=chosen,
                rejected=rejected,
                verdict=effective.verdict,
                confidence=effective.confidence,
                source=source,
                principle=principles.get(pair_id),
                judge=judges.get(effective.judge_id) if effective.judge_id else None,
                verdicts=tuple(verdicts.get(pair_id, ())),
                lengths=(len(chosen.split()), len(rejected.split())),
                responses=(a_id, b_id),
            )
        )
    return result


@dataclass(frozen=True)
class RoundProvenance:
    """Where a round's data came from: what a snapshot's manifest records (the first four
    fields) and what its dataset card adds (the rest, defaulted so a bare one still renders)."""

    round_id: int
    constitution: dict[str, Any]
    policy: dict[str, Any]
    judges: list[dict[str, Any]]
    kind: str = "rl"
    """The round's kind: 'rl' (preference pairs) or 'sl' (revision chains)."""
    description: str = ""
    """The constitution's description."""
    principles: list[dict[str, Any]] = field(default_factory=list)
    """The constitution's principles in file order: key, kind, weight, text (the critique)."""
    judge_details: list[dict[str, Any]] = field(default_factory=list)
    """Per judge of `judges`, in the same order: its identity parameters and template hash, and
    its latest calibration under this constitution (None when it was never calibrated)."""
    lineage: list[dict[str, Any]] = field(default_factory=list)
    """The round's policy, then its parent, back to the base model; each with the training run
    (round, run, method, snapshot) that made it, when one did."""


def round_provenance(session: Session, round_id: int) -> RoundProvenance:
    round_row = session.get_one(RoundRow, round_id)
    constitution = session.get_one(ConstitutionRow, round_row.constitution_id)
    policy = session.get_one(PolicyRow, round_row.policy_id)
    judge_ids = select(LabelRow.judge_id).where(
        LabelRow.pair_id.in_(select(PairRow.id).where(PairRow.round_id == round_id))
    )
    judge_rows = list(
        session.scalars(select(JudgeRow).where(JudgeRow.id.in_(judge_ids)).order_by(JudgeRow.id))
    )
    judges = [
        {"backend": j.backend, "model": j.model, "mode": j.mode, "config_sha256": j.config_sha256}
        for j in judge_rows
    ]
    principles = [
        {"key": p.key, "kind": p.kind, "weight": p.weight, "text": p.critique}
        for p in session.scalars(
            select(PrincipleRow)
            .where(PrincipleRow.constitution_id == constitution.id)
            .order_by(PrincipleRow.position)
        )
    ]
    return RoundProvenance(
        round_id=round_id,
        constitution={
            "name": constitution.name,
            "version": constitution.version,
            "sha256": constitution.sha256,
        },
        policy={"name": policy.name, "model_ref": policy.model_ref, "parent_id": policy.parent_id},
        judges=judges,
        kind=round_row.kind,
        description=constitution.description,
        principles=principles,
        # base_url is left out: it is not the judge's identity, and may name a private host.
        judge_details=[
            {
                "params": j.params,
                "template_sha256": j.template_sha256,
                "calibration": _latest_calibration(session, j.id, constitution.id),
            }
            for j in judge_rows
        ],
        lineage=policy_lineage(session, policy),
    )


def _latest_calibration(session: Session, judge_id: int, constitution_id: int) -> dict[str, Any] | None:
    record = judges.latest_calibration(session, judge_id, constitution_id)
    if record is None:
        return None
    return {
        "accuracy": record.accuracy,
        "consistency": record.consistency,
        "injection_follow_rate": record.injection_follow_rate,
        "pairs": record.pairs,
        "gold_sha256": record.gold_sha256,
    }


def policy_lineage(session: Session, policy: PolicyRow) -> list[dict[str, Any]]:
    """`policy`, then its parent, and so on back to the base model. Each with the manifest sha256
    of the snapshot it was trained on and the run that made it (the latest finished one whose
    output it is: id, round, method); None for a base model."""
    chain = []
    for current in reversed(lineage_rows(session, policy.id)):
        run = session.execute(
            select(TrainingRunRow.id, TrainingRunRow.round_id, TrainingRunRow.method)
            .where(TrainingRunRow.output_policy_id == current.id, TrainingRunRow.status == "done")
            .order_by(TrainingRunRow.id.desc())
            .limit(1)
        ).first()
        chain.append(
            {
                "name": current.name,
                "model_ref": current.model_ref,
                "snapshot_sha256": current.snapshot_sha256,
                "trained_by": None if run is None else {"run": run[0], "round": run[1], "method": run[2]},
            }
        )
    return chain


def record_snapshot(
    session: Session,
    round_id: int,
    path: str,
    manifest_sha256: str,
    counts: dict[str, Any],
    filters: dict[str, Any],
) -> tuple[int, bool]:
    """(snapshot id, created): an identical manifest is the same snapshot, stored once. Its path
    follows the latest export, which is the copy training then reads: an older copy may have been
    deleted since, and an unchanged row would point at it."""
    existing = session.scalar(select(SnapshotRow).where(SnapshotRow.manifest_sha256 == manifest_sha256))
    if existing is not None:
        existing.path = path
        return existing.id, False
    row = SnapshotRow(
        round_id=round_id, path=path, manifest_sha256=manifest_sha256, counts=counts, filters=filters
    )
    session.add(row)
    session.flush()
    return row.id, True


def list_snapshots(session: Session, round_id: int) -> list[SnapshotRow]:
    return list(
        session.scalars(select(SnapshotRow).where(SnapshotRow.round_id == round_id).order_by(SnapshotRow.id))
    )


def get_snapshot(session: Session, snapshot_id: int) -> SnapshotRow:
    row = session.get(SnapshotRow, snapshot_id)
    if row is None:
        raise NotFound(f"snapshot {snapshot_id} not found")
    return row
