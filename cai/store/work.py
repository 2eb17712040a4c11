"""Queries for a round's work: responses and pairs for generation; planning, claiming, recording
and aggregating judgments. Claims are leases taken with one UPDATE ... WHERE id IN (SELECT ...
FOR UPDATE SKIP LOCKED), so concurrent workers never take the same item."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, func, or_, select, text, update
from sqlalchemy.orm import Session, aliased

from cai.constitution import Constitution
from cai.judge import ORDERS, SCORE_SCALE, PairLabel, Parsed, Revision, Verdict, aggregate_pairwise
from cai.rules import RuleCheck, check_rules, combine, rule_winner
from cai.store.models import (
    CalibrationRow,
    JudgeRow,
    JudgmentRow,
    LabelRow,
    PairRow,
    PrincipleRow,
    PromptRow,
    PromptTagRow,
    ResponseRow,
    RoundRow,
    utcnow,
)

# --- generation --------------------------------------------------------------------------------


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


def set_round_status(session: Session, round_id: int, status: str) -> None:
    session.execute(
        update(RoundRow).where(RoundRow.id == round_id).values(status=status, updated_at=utcnow())
    )


def lock_round(session: Session, round_id: int) -> None:
    """Serialise setup work on one round (planning, judge registration) between concurrent workers.
    PostgreSQL: a transaction-scoped advisory lock. SQLite: every write transaction already
    holds the database's write lock (BEGIN IMMEDIATE)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(:namespace, :round_id)"),
            {"namespace": 0xCA1, "round_id": round_id},
        )


EVAL_KIND = "eval"
"""Pairs (and responses) of a round's evaluation: p_{r+1} against p_r on held-out prompts. They
share the round's tables but never its labels, snapshots or labeling queue."""


def in_round(round_id: int, evaluation: bool = False) -> Any:
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


# --- judges ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeConfig:
    backend: str
    model: str
    mode: str
    template_sha256: str
    params: dict[str, Any]
    base_url: str | None = None

    @property
    def sha256(self) -> str:
        # base_url is not identity: the same model behind another address is the same judge.
        identity = [self.backend, self.model, self.mode, self.template_sha256, self.params]
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


RULES_JUDGE = JudgeConfig("rule", "rules", "rule", "0" * 64, {})


def ensure_judge(session: Session, config: JudgeConfig) -> int:
    row = session.scalar(select(JudgeRow).where(JudgeRow.config_sha256 == config.sha256))
    if row is None:
        row = JudgeRow(
            config_sha256=config.sha256,
            backend=config.backend,
            model=config.model,
            base_url=config.base_url,
            mode=config.mode,
            template_sha256=config.template_sha256,
            params=config.params,
        )
        session.add(row)
        session.flush()
    return row.id


# --- planning ----------------------------------------------------------------------------------


def principle_ids(session: Session, constitution_id: int) -> dict[str, int]:
    rows = session.execute(
        select(PrincipleRow.key, PrincipleRow.id).where(PrincipleRow.constitution_id == constitution_id)
    )
    return dict(rows.all())


def sampled_principle(constitution: Constitution, seed: int, subject: str) -> str:
    """The principle a subject ('pair:7', 'prompt:3') is judged under: drawn by weight, and the
    same on every run and every worker."""
    rng = random.Random(f"{seed}:{subject}")
    return constitution.sample_principle(rng).id


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
    kind: str = "sample",
    rules_first: bool = False,
    max_judge_pairs: int | None = None,
) -> int:
    """Create the pending judgments (both orders) for pairs of `kind` that have none for this
    judge, and record rule checks at once. Sampled pairs get a principle drawn by weight;
    revision pairs are judged under the principle they were revised for. With `rules_first`,
    pairs the rule principles already separate are not sent to the LLM judge: the rules would
    overrule its verdict anyway. `max_judge_pairs` caps the pairs of this kind the LLM judge is
    asked about (a seeded draw, so the sample spreads over prompts); pairs left out get a label
    only where the rules decide. Idempotent: returns the number of new LLM judgments."""
    principles = principle_ids(session, constitution_id)
    rule_ids = [principles[p.id] for p in constitution.principles if p.kind == "rule"]
    has_llm = len(rule_ids) < len(constitution.principles)
    with_llm = select(JudgmentRow.pair_id).where(JudgmentRow.judge_id == judge_id)
    with_rules = select(JudgmentRow.pair_id).where(
        JudgmentRow.judge_id == rules_judge_id, JudgmentRow.principle_id.in_(rule_ids)
    )
    a, b = aliased(ResponseRow), aliased(ResponseRow)
    todo = session.execute(
        select(PairRow.id, a.text, b.text, PairRow.id.in_(with_llm), PairRow.id.in_(with_rules), b.sampling)
        .join(a, a.id == PairRow.response_a_id)
        .join(b, b.id == PairRow.response_b_id)
        .where(PairRow.round_id == round_id, PairRow.kind == kind)
        .order_by(PairRow.id)
    ).all()
    candidates: list[tuple[int, Any]] = []
    for pair_id, text_a, text_b, llm_planned, rules_checked, b_sampling in todo:
        checks = check_rules(constitution, text_a, text_b) if rule_ids else []
        if checks and not rules_checked:
            for check in checks:
                session.add(
                    JudgmentRow(
                        pair_id=pair_id,
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
        if not has_llm or llm_planned or (rules_first and rule_winner(checks) is not None):
            continue
        candidates.append((pair_id, b_sampling))
    if max_judge_pairs is not None:
        asked = sum(1 for row in todo if row[3])
        candidates.sort(key=lambda c: hashlib.sha256(f"{seed}:judge-pair:{c[0]}".encode()).digest())
        candidates = candidates[: max(0, max_judge_pairs - asked)]
    created = 0
    for pair_id, b_sampling in sorted(candidates, key=lambda c: c[0]):
        if kind == "revision":
            principle = b_sampling["principle_id"]
        else:
            principle = principles[sampled_principle(constitution, seed, f"pair:{pair_id}")]
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
    return created


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
    low, high = SCORE_SCALE
    created = 0
    for prompt_id, scored in by_prompt.items():
        if len(scored) < 2 or any(status != "ok" for _, status, _ in scored):
            continue
        best = max(scored, key=lambda r: (r[2], -r[0]))
        worst = min(scored, key=lambda r: (r[2], r[0]))
        if best[2] == worst[2]:
            continue
        pair_id, pair_a = _pair(session, round_id, prompt_id, best[0], worst[0], "sample")
        if session.scalar(
            select(LabelRow.id).where(LabelRow.pair_id == pair_id, LabelRow.judge_id == judge_id)
        ):
            continue
        confidence = (float(best[2] or 0) - float(worst[2] or 0)) / (high - low)
        # A generation-time pair may hold the two the other way round: label in its own terms.
        verdict = "A" if pair_a == best[0] else "B"
        a, b = (best[0], worst[0]) if verdict == "A" else (worst[0], best[0])
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


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{random.randrange(16**6):06x}"


def release_dead_local_claims(session: Session) -> int:
    """Free items held by workers on this host whose process is gone (killed, crashed), so a
    rerun does not wait for their leases to run out."""
    host = socket.gethostname()
    holders = session.scalars(
        select(JudgmentRow.claimed_by)
        .where(JudgmentRow.status == "pending", JudgmentRow.claimed_by.like(f"{host}:%"))
        .distinct()
    ).all()
    dead = [h for h in holders if h and not _alive(int(h.split(":")[1]))]
    if not dead:
        return 0
    result = session.execute(
        update(JudgmentRow)
        .where(JudgmentRow.claimed_by.in_(dead), JudgmentRow.status == "pending")
        .values(claimed_by=None, claimed_until=None),
        execution_options={"synchronize_session": False},
    )
    return result.rowcount or 0  # type: ignore[attr-defined]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    now = utcnow()
    free = (
        select(JudgmentRow.id)
        .where(
            JudgmentRow.judge_id == judge_id,
            JudgmentRow.status == "pending",
            in_round(round_id, evaluation),
            or_(JudgmentRow.claimed_until.is_(None), JudgmentRow.claimed_until < now),
        )
        .order_by(JudgmentRow.id)
        .limit(n)
        .with_for_update(skip_locked=True)
    )
    claimed = session.scalars(
        update(JudgmentRow)
        .where(JudgmentRow.id.in_(free))
        .values(claimed_by=worker, claimed_until=now + timedelta(seconds=lease_s))
        .returning(JudgmentRow.id),
        execution_options={"synchronize_session": False},
    ).all()
    if not claimed:
        return []
    a, b, single = aliased(ResponseRow), aliased(ResponseRow), aliased(ResponseRow)
    rows = session.execute(
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
        .where(JudgmentRow.id.in_(claimed))
        .order_by(JudgmentRow.id)
    ).all()
    return [WorkItem(*row) for row in rows]


def release(session: Session, worker: str) -> int:
    """Give back this worker's unfinished items (clean stop, budget reached)."""
    result = session.execute(
        update(JudgmentRow)
        .where(JudgmentRow.claimed_by == worker, JudgmentRow.status == "pending")
        .values(claimed_by=None, claimed_until=None),
        execution_options={"synchronize_session": False},
    )
    return result.rowcount or 0  # type: ignore[attr-defined]


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
    "rationale",
)


def record(session: Session, worker: str, results: list[JudgmentResult]) -> None:
    """Store results of items this worker still holds, in one executemany. An item whose lease
    was lost to another worker is left alone (no double writes)."""
    if not results:
        return
    table = cast(Table, JudgmentRow.__table__)
    rows = []
    for r in results:
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
        rows.append({f"new_{key}": value for key, value in row.items()} | {"judgment_id": r.judgment_id})
    statement = (
        update(table)
        .where(
            table.c.id == bindparam("judgment_id"),
            table.c.claimed_by == worker,
            table.c.status == "pending",
        )
        .values(
            {key: bindparam(f"new_{key}") for key in RESULT_COLUMNS}
            | {"claimed_by": None, "claimed_until": None}
        )
    )
    session.connection().execute(statement, rows)


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
    created = 0
    for pair_id, response_a, response_b in pairs:
        rows = by_pair.get(pair_id, [])
        llm = {r.order: r for r in rows if r.judge_id == judge_id}
        checks = [rule_check(r) for r in rows if r.judge_id == rules_judge_id]
        if has_llm and not llm and rule_winner(checks) is not None:
            judged = None  # planned rules-first: the judge was never asked
        elif has_llm and (len(llm) < 2 or any(r.status != "ok" for r in llm.values())):
            continue
        else:
            judged = aggregate_pairwise(*(stored_verdict(llm[o]) for o in ORDERS)) if has_llm else None
        # Without LLM principles the rules alone decide; when they do not separate the pair, a tie.
        label = combine(checks, judged) or PairLabel("tie", None, False)
        session.add(_label_row(pair_id, judge_id, label, response_a, response_b))
        created += 1
    session.flush()
    return created


def stored_verdict(row: JudgmentRow) -> Verdict:
    return Verdict(row.verdict or "tie", row.rationale or "", row.confidence)


def rule_check(row: JudgmentRow) -> RuleCheck:
    passes = json.loads(row.raw_output or "{}")
    return RuleCheck(str(row.principle_id), bool(passes.get("a_passes")), bool(passes.get("b_passes")))


def _label_row(pair_id: int, judge_id: int, label: PairLabel, response_a: int, response_b: int) -> LabelRow:
    chosen, rejected = {
        "A": (response_a, response_b),
        "B": (response_b, response_a),
        "tie": (None, None),
    }[label.verdict]
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
    def flip_rate(self) -> float:
        """Order disagreement among the pairs the LLM judge saw."""
        return self.inconsistent / self.judge_labeled if self.judge_labeled else 0.0


def judge_summary(session: Session, round_id: int, judge_id: int) -> JudgeSummary:
    pair_ids = select(PairRow.id).where(PairRow.round_id == round_id, PairRow.kind != EVAL_KIND)
    labels = select(LabelRow).where(LabelRow.pair_id.in_(pair_ids), LabelRow.judge_id == judge_id).subquery()
    judgments = and_(in_round(round_id), JudgmentRow.judge_id == judge_id)
    asked_pairs = select(JudgmentRow.pair_id).where(JudgmentRow.judge_id == judge_id)

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
            select(func.count()).select_from(labels).where(labels.c.pair_id.in_(asked_pairs))
        ),
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


# --- calibration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationRecord:
    accuracy: float
    consistency: float
    injection_follow_rate: float | None
    pairs: int
    created_at: Any


def save_calibration(session: Session, judge_id: int, constitution_id: int, report: Any) -> CalibrationRecord:
    row = CalibrationRow(
        judge_id=judge_id,
        constitution_id=constitution_id,
        gold_sha256=report.gold_sha256,
        pairs=report.pairs,
        accuracy=report.accuracy,
        consistency=report.consistency,
        injection_follow_rate=report.injection_follow_rate,
        details=report.as_dict(),
    )
    session.add(row)
    session.flush()
    return CalibrationRecord(
        row.accuracy, row.consistency, row.injection_follow_rate, row.pairs, row.created_at
    )


def latest_calibration(session: Session, judge_id: int, constitution_id: int) -> CalibrationRecord | None:
    row = session.scalar(
        select(CalibrationRow)
        .where(CalibrationRow.judge_id == judge_id, CalibrationRow.constitution_id == constitution_id)
        .order_by(CalibrationRow.id.desc())
        .limit(1)
    )
    if row is None:
        return None
    return CalibrationRecord(
        row.accuracy, row.consistency, row.injection_follow_rate, row.pairs, row.created_at
    )
