"""The judging work queue: planning judgments, claiming them as leases with one UPDATE ... WHERE id IN
(SELECT ... FOR UPDATE SKIP LOCKED), recording results, and freeing the claims of dead workers."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import BindParameter, Integer, Table, bindparam, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from cai.constitution import Constitution
from cai.judge import ORDERS, Parsed
from cai.labelling import same_answer, sampled_principle, sampled_principles
from cai.rules import RuleCheck, check_rules, rule_winner
from cai.store import claims
from cai.store.judges import RULES_JUDGE
from cai.store.models import (
    JudgmentRow,
    PairRow,
    PrincipleRow,
    PromptRow,
    ResponseRow,
)
from cai.store.samples import EVAL_KIND


def in_round(round_id: int | BindParameter[int], evaluation: bool = False) -> Any:
    """Judgments of a round's labeling work (about one of its pairs or responses), or with
    `evaluation` of its head-to-head evaluation."""
    if evaluation:
        return JudgmentRow.pair_id.in_(
            select(PairRow.id).where(PairRow.round_id == round_id, PairRow.kind == EVAL_KIND)
        )
    return or_(
        JudgmentRow.pair_id.in_(
            select(PairRow.id).where(PairRow.round_id == round_id, PairRow.kind != EVAL_KIND)
        ),
        JudgmentRow.response_id.in_(
            select(ResponseRow.id).where(ResponseRow.round_id == round_id, ResponseRow.origin != EVAL_KIND)
        ),
    )


# --- planning ----------------------------------------------------------------------------------


def principle_ids(session: Session, constitution_id: int) -> dict[str, int]:
    rows = session.execute(
        select(PrincipleRow.key, PrincipleRow.id).where(PrincipleRow.constitution_id == constitution_id)
    )
    return dict(rows.all())


@dataclass(frozen=True)
class _Candidate:
    pair_id: int
    prompt_id: int
    text_a: str
    text_b: str
    llm_planned: bool
    rules_checked: bool
    b_sampling: dict[str, Any]

    @property
    def content(self) -> tuple[int, frozenset[str]]:
        """Pairs with the same prompt and the same two answers, in either order, are one
        comparison: it is judged once (and so exported once)."""
        return self.prompt_id, frozenset((same_answer(self.text_a), same_answer(self.text_b)))


def _candidates(
    session: Session, round_id: int, judge_id: int, rules_judge_id: int, rule_ids: list[int], kind: str
) -> list[_Candidate]:
    with_llm = select(JudgmentRow.pair_id).where(JudgmentRow.judge_id == judge_id)
    with_rules = select(JudgmentRow.pair_id).where(
        JudgmentRow.judge_id == rules_judge_id, JudgmentRow.principle_id.in_(rule_ids)
    )
    a, b = aliased(ResponseRow), aliased(ResponseRow)
    rows = session.execute(
        select(
            PairRow.id,
            PairRow.prompt_id,
            a.text,
            b.text,
            PairRow.id.in_(with_llm),
            PairRow.id.in_(with_rules),
            b.sampling,
        )
        .join(a, a.id == PairRow.response_a_id)
        .join(b, b.id == PairRow.response_b_id)
        .where(PairRow.round_id == round_id, PairRow.kind == kind)
        .order_by(PairRow.id)
    ).all()
    return [_Candidate(*row) for row in rows]


def _rule_principle_ids(session: Session, constitution: Constitution, constitution_id: int) -> list[int]:
    principles = principle_ids(session, constitution_id)
    return [principles[p.id] for p in constitution.principles if p.kind == "rule"]


def _needs_rule_checks(candidate: _Candidate, rules_first: bool) -> bool:
    return not candidate.rules_checked or (rules_first and not candidate.llm_planned)


def check_pair_rules(
    session: Session,
    round_id: int,
    judge_id: int,
    rules_judge_id: int,
    constitution: Constitution,
    constitution_id: int,
    kind: str = "sample",
    rules_first: bool = False,
) -> dict[int, list[RuleCheck]]:
    """Run the rule principles on the pairs `plan_judgments` will need them for. Call it before
    taking the round's lock, in a transaction that writes nothing: rules are user-supplied
    patterns, and no lock (SQLite's is the whole database) may be held while they run."""
    rule_ids = _rule_principle_ids(session, constitution, constitution_id)
    if not rule_ids:
        return {}
    return {
        c.pair_id: check_rules(constitution, c.text_a, c.text_b)
        for c in _candidates(session, round_id, judge_id, rules_judge_id, rule_ids, kind)
        if _needs_rule_checks(c, rules_first)
    }


@dataclass(frozen=True)
class Planned:
    created: int
    """New pending LLM judgments."""
    deferred: int
    """Pairs left for the next planning pass: they need rule checks that were not run yet."""
    duplicates: int
    """Pairs repeating an earlier pair's comparison (same prompt, same two answers): not judged."""


def plan_judgments(
    session: Session,
    round_id: int,
    judge_id: int,
    rules_judge_id: int,
    constitution: Constitution,
    constitution_id: int,
    constitution_sha256: str,
    template_sha256: str,
    seed: int,
    rule_checks: Mapping[int, list[RuleCheck]],
    kind: str = "sample",
    rules_first: bool = False,
    max_judge_pairs: int | None = None,
    principles_per_pair: int = 1,
) -> Planned:
    """Create the pending judgments (both orders) for pairs of `kind` that have none for this
    judge, and record the rule checks (run beforehand by `check_pair_rules`). Sampled and eval
    pairs get `principles_per_pair` distinct principles drawn by weight (an ensemble); revision
    pairs are judged under the principle they were revised for. With `rules_first`, pairs the
    rule principles already separate are not sent to the LLM judge: the rules would overrule its
    verdict anyway. `max_judge_pairs` caps the pairs of this kind the LLM judge is asked about (a
    seeded draw, so the sample spreads over prompts); pairs left out get a label only where the
    rules decide. Idempotent."""
    principles = principle_ids(session, constitution_id)
    rule_ids = _rule_principle_ids(session, constitution, constitution_id)
    has_llm = len(rule_ids) < len(constitution.principles)
    todo = _candidates(session, round_id, judge_id, rules_judge_id, rule_ids, kind)
    # One pair per comparison: the one already judged if any, else the oldest.
    representative: dict[tuple[int, frozenset[str]], int] = {}
    for c in sorted(todo, key=lambda c: (not (c.llm_planned or c.rules_checked), c.pair_id)):
        representative.setdefault(c.content, c.pair_id)
    candidates: list[tuple[int, Any]] = []
    deferred = duplicates = 0
    for c in todo:
        if representative[c.content] != c.pair_id:
            duplicates += 1
            continue
        if rule_ids and _needs_rule_checks(c, rules_first) and c.pair_id not in rule_checks:
            deferred += 1
            continue
        checks = rule_checks.get(c.pair_id, [])
        if checks and not c.rules_checked:
            for check in checks:
                session.add(
                    JudgmentRow(
                        pair_id=c.pair_id,
                        constitution_sha256=constitution_sha256,
                        order="AB",
                        principle_id=principles[check.principle_id],
                        judge_id=rules_judge_id,
                        template_sha256=RULES_JUDGE.template_sha256,
                        status="ok",
                        attempts=1,
                        verdict=check.verdict,
                        confidence=1.0,
                        rationale=check.rationale,
                        raw_output=json.dumps({"a_passes": check.a_passes, "b_passes": check.b_passes}),
                    )
                )
        if not has_llm or c.llm_planned or (rules_first and rule_winner(checks) is not None):
            continue
        candidates.append((c.pair_id, c.b_sampling))
    if max_judge_pairs is not None:
        asked = sum(1 for c in todo if c.llm_planned)
        candidates.sort(key=lambda c: hashlib.sha256(f"{seed}:judge-pair:{c[0]}".encode()).digest())
        candidates = candidates[: max(0, max_judge_pairs - asked)]
    created = 0
    for pair_id, b_sampling in sorted(candidates, key=lambda c: c[0]):
        if kind == "revision":
            chosen = [b_sampling["principle_id"]]
        else:
            drawn = sampled_principles(constitution, seed, f"pair:{pair_id}", principles_per_pair)
            chosen = [principles[key] for key in drawn]
        for principle in chosen:
            for order in ORDERS:
                session.add(
                    JudgmentRow(
                        pair_id=pair_id,
                        constitution_sha256=constitution_sha256,
                        order=order,
                        principle_id=principle,
                        judge_id=judge_id,
                        template_sha256=template_sha256,
                        status="pending",
                    )
                )
                created += 1
    session.flush()
    return Planned(created, deferred, duplicates)


def plan_single(
    session: Session,
    round_id: int,
    judge_id: int,
    constitution: Constitution,
    constitution_id: int,
    constitution_sha256: str,
    template_sha256: str,
    seed: int,
    first_sample_only: bool,
) -> int:
    """Pending score or revise judgments for the round's sampled responses (all of them, or the
    first sample of each prompt). All responses to one prompt share its sampled principle, so
    their scores are comparable."""
    principles = principle_ids(session, constitution_id)
    done = select(JudgmentRow.response_id).where(JudgmentRow.judge_id == judge_id)
    query = select(ResponseRow.id, ResponseRow.prompt_id).where(
        ResponseRow.round_id == round_id, ResponseRow.origin == "sample", ResponseRow.id.not_in(done)
    )
    if first_sample_only:
        query = query.where(ResponseRow.sample_index == 0)
    created = 0
    for response_id, prompt_id in session.execute(query.order_by(ResponseRow.id)):
        principle = principles[sampled_principle(constitution, seed, f"prompt:{prompt_id}")]
        session.add(
            JudgmentRow(
                response_id=response_id,
                order="AB",
                principle_id=principle,
                judge_id=judge_id,
                constitution_sha256=constitution_sha256,
                template_sha256=template_sha256,
                status="pending",
            )
        )
        created += 1
    session.flush()
    return created


def reset_failures(
    session: Session, round_id: int, judge_id: int, every_failure: bool, evaluation: bool = False
) -> int:
    """Put failed items back in the queue: transient ones always, parse/permanent ones on request."""
    kinds = None if every_failure else ["transient"]
    query = update(JudgmentRow).where(
        JudgmentRow.judge_id == judge_id, JudgmentRow.status == "failed", in_round(round_id, evaluation)
    )
    if kinds is not None:
        query = query.where(JudgmentRow.error_kind.in_(kinds))
    result = session.execute(
        query.values(status="pending", error_kind=None, claimed_by=None, claimed_until=None),
        execution_options={"synchronize_session": False},
    )
    return result.rowcount or 0  # type: ignore[attr-defined]


# --- claiming ----------------------------------------------------------------------------------


def release_dead_local_claims(session: Session) -> int:
    """Free judgments held by dead workers on this host."""
    return claims.release_dead_local(session, JudgmentRow)


@dataclass(frozen=True)
class WorkItem:
    """One claimed judgment with what it needs to render: a pair, or a single response."""

    judgment_id: int
    order: str
    principle_key: str
    conversation: list[dict[str, str]]
    pair_id: int | None = None
    response_a: str | None = None
    response_b: str | None = None
    response_id: int | None = None
    response: str | None = None


def claim(
    session: Session,
    round_id: int,
    judge_id: int,
    worker: str,
    n: int,
    lease_s: float,
    evaluation: bool = False,
) -> list[WorkItem]:
    """Take up to n pending, unclaimed (or lease-expired) items of this round for `worker`."""
    # On the session's connection: these rows are read, never loaded as ORM objects.
    connection = session.connection()
    params = {"of_round": round_id, "of_judge": judge_id}
    claimed = claims.claim(connection, _claim_statement(evaluation), worker, n, lease_s, params)
    if not claimed:
        return []
    return [WorkItem(*row) for row in connection.execute(_claimed_items(), {"ids": claimed})]


@functools.cache
def _claim_statement(evaluation: bool) -> Any:
    """Built once, like `_claimed_items` and `_record_statement`: building them costs more CPU
    than running them."""
    where = (
        JudgmentRow.judge_id == bindparam("of_judge"),
        in_round(bindparam("of_round", type_=Integer), evaluation),
    )
    return claims.claim_statement(JudgmentRow, *where)


@functools.cache
def _claimed_items() -> Any:
    """What the judgments `ids` need to be rendered, as WorkItem fields."""
    a, b, single = aliased(ResponseRow), aliased(ResponseRow), aliased(ResponseRow)
    return (
        select(
            JudgmentRow.id,
            JudgmentRow.order,
            PrincipleRow.key,
            PromptRow.messages,
            JudgmentRow.pair_id,
            a.text,
            b.text,
            JudgmentRow.response_id,
            single.text,
        )
        .join(PrincipleRow, PrincipleRow.id == JudgmentRow.principle_id)
        .outerjoin(PairRow, PairRow.id == JudgmentRow.pair_id)
        .outerjoin(a, a.id == PairRow.response_a_id)
        .outerjoin(b, b.id == PairRow.response_b_id)
        .outerjoin(single, single.id == JudgmentRow.response_id)
        .join(PromptRow, PromptRow.id == func.coalesce(PairRow.prompt_id, single.prompt_id))
        .where(JudgmentRow.id.in_(bindparam("ids", expanding=True)))
        .order_by(JudgmentRow.id)
    )


def claimed_by(session: Session, worker: str) -> list[WorkItem]:
    """The unfinished judgments `worker` holds, as work items (a batch's, to ingest its output)."""
    connection = session.connection()
    ids = connection.scalars(
        select(JudgmentRow.id).where(JudgmentRow.claimed_by == worker, JudgmentRow.status == "pending")
    ).all()
    return [WorkItem(*row) for row in connection.execute(_claimed_items(), {"ids": list(ids)})] if ids else []


def release(session: Session, worker: str) -> int:
    """Give back this worker's unfinished judgments (clean stop, budget reached)."""
    return claims.release(session, JudgmentRow, worker)


@dataclass(frozen=True)
class JudgmentResult:
    judgment_id: int
    status: str
    attempts: int
    raw_output: str | None
    request_sha256: str | None
    parsed: Parsed | None
    error: str | None
    error_kind: str | None
    latency_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cost_usd: float | None


RESULT_COLUMNS = (
    "status",
    "attempts",
    "raw_output",
    "request_sha256",
    "error",
    "error_kind",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "verdict",
    "score",
    "confidence",
    "choice_probs",
    "rationale",
)


def record(session: Session, worker: str, results: list[JudgmentResult]) -> None:
    """Store results of items this worker still holds, in one executemany. An item whose lease
    was lost to another worker is left alone (no double writes)."""
    if not results:
        return
    rows = []
    # In id order, so that two writers of overlapping rows lock them in the same order.
    for r in sorted(results, key=lambda r: r.judgment_id):
        row: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS)
        row.update(
            status=r.status,
            attempts=r.attempts,
            raw_output=r.raw_output,
            request_sha256=r.request_sha256,
            error=r.error,
            error_kind=r.error_kind,
            latency_ms=r.latency_ms,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
            cost_usd=r.cost_usd,
        )
        if r.parsed is not None:
            row.update(r.parsed.columns())
        rows.append(
            {f"new_{key}": value for key, value in row.items()}
            | {"judgment_id": r.judgment_id, "worker": worker}
        )
    session.connection().execute(_record_statement(), rows)


@functools.cache
def _record_statement() -> Any:
    table = cast(Table, JudgmentRow.__table__)
    return (
        update(table)
        .where(
            table.c.id == bindparam("judgment_id"),
            table.c.claimed_by == bindparam("worker"),
            table.c.status == "pending",
        )
        .values(
            {key: bindparam(f"new_{key}") for key in RESULT_COLUMNS}
            | {"claimed_by": None, "claimed_until": None}
        )
    )


def pending_count(session: Session, round_id: int, judge_id: int, evaluation: bool = False) -> int:
    return (
        session.scalar(
            select(func.count()).where(
                JudgmentRow.judge_id == judge_id,
                JudgmentRow.status == "pending",
                in_round(round_id, evaluation),
            )
        )
        or 0
    )
