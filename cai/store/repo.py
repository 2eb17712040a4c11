"""The only module that queries the store. Takes a Session, returns plain records (never ORM rows),
so callers cannot lazy-load or mutate behind the transaction's back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from cai.constitution import Constitution, LoadedConstitution
from cai.errors import Conflict, NotFound
from cai.promptsets import PromptInput
from cai.store.models import (
    ConstitutionRow,
    JudgmentRow,
    LabelRow,
    PairRow,
    PolicyRow,
    PrincipleRow,
    PromptRow,
    PromptTagRow,
    ResponseRow,
    RoundRow,
    TrainingRunRow,
    utcnow,
)

# --- constitutions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConstitutionRecord:
    id: int
    name: str
    version: int
    sha256: str
    description: str
    principles: int
    created_at: datetime
    source_path: str | None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class StoredConstitution:
    record: ConstitutionRecord
    constitution: Constitution
    source_text: str


def _constitution_record(row: ConstitutionRow, principles: int) -> ConstitutionRecord:
    return ConstitutionRecord(
        row.id,
        row.name,
        row.version,
        row.sha256,
        row.description,
        principles,
        row.created_at,
        row.source_path,
    )


def register_constitution(session: Session, loaded: LoadedConstitution) -> tuple[ConstitutionRecord, bool]:
    """Store a constitution version; returns (record, created). Same name+version with other content
    is refused: versions are immutable so that every judgment's provenance stays true."""
    constitution = loaded.constitution
    sha = constitution.sha256()
    existing = session.scalar(
        select(ConstitutionRow).where(
            ConstitutionRow.name == constitution.name, ConstitutionRow.version == constitution.version
        )
    )
    if existing is not None:
        if existing.sha256 != sha:
            raise Conflict(
                f"{loaded.path}: {constitution.ref} is already registered with different content "
                f"(sha256 {existing.sha256[:12]}, this file {sha[:12]}); bump the version"
            )
        return _constitution_record(existing, len(constitution.principles)), False
    row = ConstitutionRow(
        name=constitution.name,
        version=constitution.version,
        sha256=sha,
        description=constitution.description,
        body=constitution.model_dump(mode="json"),
        source_text=loaded.source_text,
        source_path=str(loaded.path),
    )
    session.add(row)
    session.flush()
    for position, principle in enumerate(constitution.principles):
        session.add(
            PrincipleRow(
                constitution_id=row.id,
                key=principle.id,
                position=position,
                kind=principle.kind,
                critique=principle.critique,
                revision=principle.revision,
                weight=principle.weight,
                rule=principle.rule.model_dump(mode="json") if principle.rule else None,
            )
        )
    session.flush()
    return _constitution_record(row, len(constitution.principles)), True


def get_constitution(session: Session, name: str, version: int | None = None) -> StoredConstitution:
    """A stored constitution by name and version (latest when version is None)."""
    query = select(ConstitutionRow).where(ConstitutionRow.name == name)
    if version is None:
        query = query.order_by(ConstitutionRow.version.desc()).limit(1)
    else:
        query = query.where(ConstitutionRow.version == version)
    row = session.scalar(query)
    if row is None:
        known = ", ".join(r.ref for r in list_constitutions(session)) or "none registered yet"
        wanted = name if version is None else f"{name}@{version}"
        raise NotFound(f"constitution {wanted!r} not found (known: {known})")
    constitution = Constitution.model_validate(row.body)
    return StoredConstitution(
        _constitution_record(row, len(constitution.principles)), constitution, row.source_text
    )


def list_constitutions(session: Session) -> list[ConstitutionRecord]:
    counts = (
        select(PrincipleRow.constitution_id, func.count().label("n"))
        .group_by(PrincipleRow.constitution_id)
        .subquery()
    )
    rows = session.execute(
        select(ConstitutionRow, counts.c.n)
        .join(counts, counts.c.constitution_id == ConstitutionRow.id)
        .order_by(ConstitutionRow.name, ConstitutionRow.version)
    ).all()
    return [_constitution_record(row, n) for row, n in rows]


# --- prompts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportReport:
    read: int
    imported: int
    duplicates_in_file: int
    already_stored: int
    split_conflicts: list[str] = field(default_factory=list)
    """Rows whose prompt is stored under the other split: kept as stored, never moved (leakage)."""
    by_split: dict[str, int] = field(default_factory=dict)


def import_prompts(session: Session, prompts: list[PromptInput], source: str) -> ImportReport:
    """Add new prompts (deduplicated by content hash) and any new tags of known ones."""
    unique: dict[str, PromptInput] = {}
    merged_tags: dict[str, set[str]] = {}
    for prompt in prompts:
        unique.setdefault(prompt.sha256, prompt)
        merged_tags.setdefault(prompt.sha256, set()).update(prompt.tags)
    stored = {
        row.sha256: row
        for chunk in _chunks(list(unique), 500)
        for row in session.scalars(select(PromptRow).where(PromptRow.sha256.in_(chunk)))
    }
    conflicts, by_split = [], {"train": 0, "eval": 0}
    for sha, prompt in unique.items():
        row = stored.get(sha)
        if row is None:
            row = PromptRow(
                sha256=sha,
                messages=prompt.messages_json(),
                text=prompt.text,
                split=prompt.split,
                source=source,
            )
            session.add(row)
            by_split[prompt.split] += 1
        elif row.split != prompt.split:
            conflicts.append(f"{prompt.row}: already stored as split {row.split!r}; kept there")
        stored[sha] = row
    session.flush()
    known_tags = {
        (prompt_id, tag)
        for chunk in _chunks([row.id for row in stored.values()], 500)
        for prompt_id, tag in session.execute(
            select(PromptTagRow.prompt_id, PromptTagRow.tag).where(PromptTagRow.prompt_id.in_(chunk))
        )
    }
    for sha, tags in merged_tags.items():
        for tag in sorted(tags):
            if (stored[sha].id, tag) not in known_tags:
                session.add(PromptTagRow(prompt_id=stored[sha].id, tag=tag))
    session.flush()
    new = sum(by_split.values())
    return ImportReport(
        read=len(prompts),
        imported=new,
        duplicates_in_file=len(prompts) - len(unique),
        already_stored=len(unique) - new,
        split_conflicts=conflicts,
        by_split=by_split,
    )


@dataclass(frozen=True)
class PromptRecord:
    id: int
    sha256: str
    split: str
    tags: tuple[str, ...]
    messages: list[dict[str, str]]
    text: str | None
    source: str | None


def _prompt_query(split: str | None, tag: str | None) -> Any:
    query = select(PromptRow)
    if split:
        query = query.where(PromptRow.split == split)
    if tag:
        query = query.where(PromptRow.id.in_(select(PromptTagRow.prompt_id).where(PromptTagRow.tag == tag)))
    return query


def list_prompts(
    session: Session,
    split: str | None = None,
    tag: str | None = None,
    limit: int = 50,
    offset: int = 0,
    after: int | None = None,
) -> tuple[list[PromptRecord], int]:
    """One page of prompts in id order (ids above `after`, a cursor, when given) and the total
    matching count."""
    query = _prompt_query(split, tag)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    if after is not None:
        query = query.where(PromptRow.id > after)
    rows = list(session.scalars(query.order_by(PromptRow.id).limit(limit).offset(offset)))
    tags: dict[int, list[str]] = {}
    for prompt_id, tag_value in session.execute(
        select(PromptTagRow.prompt_id, PromptTagRow.tag)
        .where(PromptTagRow.prompt_id.in_([r.id for r in rows]))
        .order_by(PromptTagRow.tag)
    ):
        tags.setdefault(prompt_id, []).append(tag_value)
    records = [
        PromptRecord(r.id, r.sha256, r.split, tuple(tags.get(r.id, [])), r.messages, r.text, r.source)
        for r in rows
    ]
    return records, total


def count_prompts(session: Session, split: str | None = None, tag: str | None = None) -> int:
    return session.scalar(select(func.count()).select_from(_prompt_query(split, tag).subquery())) or 0


# --- policies and rounds -----------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyRecord:
    id: int
    name: str
    model_ref: str
    parent_id: int | None


def ensure_policy(session: Session, name: str, model_ref: str) -> PolicyRecord:
    """The policy called `name`, created as a base model (no parent) if it is new."""
    row = session.scalar(select(PolicyRow).where(PolicyRow.name == name))
    if row is None:
        row = PolicyRow(name=name, model_ref=model_ref)
        session.add(row)
        session.flush()
    return PolicyRecord(row.id, row.name, row.model_ref, row.parent_id)


def get_policy(session: Session, name: str) -> PolicyRecord:
    row = session.scalar(select(PolicyRow).where(PolicyRow.name == name))
    if row is None:
        raise NotFound(f"policy {name!r} not found")
    return PolicyRecord(row.id, row.name, row.model_ref, row.parent_id)


@dataclass(frozen=True)
class PolicyLineage:
    id: int
    name: str
    model_ref: str
    parent: str | None
    lineage: list[str]
    """Names from the base model to this policy."""
    trained_in_round: int | None
    snapshot_sha256: str | None
    constitution: str | None
    created_at: datetime


def policy_lineages(session: Session) -> list[PolicyLineage]:
    """Every policy with the chain of policies it was trained from and the round that trained it."""
    rows = {row.id: row for row in session.scalars(select(PolicyRow).order_by(PolicyRow.id))}
    trained_in = dict(
        session.execute(
            select(TrainingRunRow.output_policy_id, func.max(TrainingRunRow.round_id))
            .where(TrainingRunRow.output_policy_id.is_not(None))
            .group_by(TrainingRunRow.output_policy_id)
        ).all()
    )
    refs = {
        row.id: f"{row.name}@{row.version}"
        for row in session.scalars(
            select(ConstitutionRow).where(ConstitutionRow.id.in_({r.constitution_id for r in rows.values()}))
        )
    }

    return [
        PolicyLineage(
            id=row.id,
            name=row.name,
            model_ref=row.model_ref,
            parent=rows[row.parent_id].name if row.parent_id in rows else None,
            lineage=[r.name for r in _ancestry(row, rows.get)],
            trained_in_round=trained_in.get(row.id),
            snapshot_sha256=row.snapshot_sha256,
            constitution=refs.get(row.constitution_id) if row.constitution_id else None,
            created_at=row.created_at,
        )
        for row in rows.values()
    ]


@dataclass(frozen=True)
class RoundCounts:
    prompts: int
    responses: int
    pairs: int
    judgments: int
    judgments_failed: int
    labels: int
    ties: int
    inconsistent: int


@dataclass(frozen=True)
class RoundRecord:
    id: int
    status: str
    constitution: str
    constitution_sha256: str
    policy: str
    parent_round_id: int | None
    config: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    constitution_id: int
    policy_id: int
    error: str | None = None
    """Why the round failed (status `failed`), with the stage that failed."""
    failed_step: str | None = None
    kind: str = "rl"
    """'rl' (preference stages) or 'sl' (revision chains and SFT)."""


def policy_lineage(session: Session, policy_id: int) -> list[str]:
    """Names from the base model to the policy `policy_id`."""
    return [row.name for row in lineage_rows(session, policy_id)]


def lineage_rows(session: Session, policy_id: int) -> list[PolicyRow]:
    """The policy `policy_id` and its ancestors, base model first."""
    return _ancestry(session.get_one(PolicyRow, policy_id), lambda id_: session.get(PolicyRow, id_))


def _ancestry(policy: PolicyRow, parent: Callable[[int], PolicyRow | None]) -> list[PolicyRow]:
    """`policy` and its parents, base model first; a cycle (the schema does not forbid one) or a
    missing parent ends the walk."""
    rows, seen = [policy], {policy.id}
    while policy.parent_id is not None and policy.parent_id not in seen:
        found = parent(policy.parent_id)
        if found is None:
            break
        policy = found
        rows.append(policy)
        seen.add(policy.id)
    return rows[::-1]


def create_round(
    session: Session,
    constitution: ConstitutionRecord,
    policy: PolicyRecord,
    config: dict[str, Any],
    parent_round_id: int | None = None,
    kind: str = "rl",
) -> RoundRecord:
    row = RoundRow(
        constitution_id=constitution.id,
        policy_id=policy.id,
        parent_round_id=parent_round_id,
        status="created",
        kind=kind,
        config=config,
    )
    session.add(row)
    session.flush()
    return get_round(session, row.id)


def get_round(session: Session, round_id: int) -> RoundRecord:
    found = session.execute(
        select(RoundRow, ConstitutionRow, PolicyRow)
        .join(ConstitutionRow, ConstitutionRow.id == RoundRow.constitution_id)
        .join(PolicyRow, PolicyRow.id == RoundRow.policy_id)
        .where(RoundRow.id == round_id)
    ).first()
    if found is None:
        raise NotFound(f"round {round_id} not found")
    row, constitution, policy = found
    return RoundRecord(
        row.id,
        row.status,
        f"{constitution.name}@{constitution.version}",
        constitution.sha256,
        policy.name,
        row.parent_round_id,
        row.config,
        row.created_at,
        row.updated_at,
        row.constitution_id,
        row.policy_id,
        row.error,
        row.failed_step,
        row.kind,
    )


def round_status(session: Session, round_id: int) -> tuple[str, str | None, str]:
    """(status, failed stage, kind) of a round."""
    found = session.execute(
        select(RoundRow.status, RoundRow.failed_step, RoundRow.kind).where(RoundRow.id == round_id)
    ).first()
    if found is None:
        raise NotFound(f"round {round_id} not found")
    return found[0], found[1], found[2]


def set_round_status(
    session: Session, round_id: int, status: str, error: str | None = None, failed_step: str | None = None
) -> None:
    """Write a status chosen by cai.stages.status (the only caller); `error` and `failed_step`
    are kept only with `failed`."""
    session.execute(
        update(RoundRow)
        .where(RoundRow.id == round_id)
        .values(status=status, error=error, failed_step=failed_step, updated_at=utcnow())
    )


def lock_round(session: Session, round_id: int) -> None:
    """Serialise work on one round (planning, aggregation, status changes) between concurrent
    workers. PostgreSQL: a transaction-scoped advisory lock. SQLite: every write transaction
    already holds the database's write lock (BEGIN IMMEDIATE)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(:namespace, :round_id)"),
            {"namespace": 0xCA1, "round_id": round_id},
        )


def list_rounds(session: Session, limit: int | None = None, after: int | None = None) -> list[RoundRecord]:
    """Rounds oldest first; at most `limit`, with ids above `after` (the last id of the page before)."""
    query = select(RoundRow.id).order_by(RoundRow.id).limit(limit)
    if after is not None:
        query = query.where(RoundRow.id > after)
    return [get_round(session, round_id) for round_id in session.scalars(query)]


def round_counts(session: Session, round_id: int) -> RoundCounts:
    """What a round holds so far; the prompts are those its config selects."""
    config = get_round(session, round_id).config

    def count(query: Any) -> int:
        return session.scalar(select(func.count()).select_from(query.subquery())) or 0

    pair_ids = select(PairRow.id).where(PairRow.round_id == round_id)
    labels = select(LabelRow).where(LabelRow.pair_id.in_(pair_ids))
    judgments = select(JudgmentRow).where(JudgmentRow.pair_id.in_(pair_ids))
    return RoundCounts(
        prompts=count_prompts(session, config.get("split", "train"), config.get("tag")),
        responses=count(select(ResponseRow).where(ResponseRow.round_id == round_id)),
        pairs=count(pair_ids),
        judgments=count(judgments),
        judgments_failed=count(judgments.where(JudgmentRow.status == "failed")),
        labels=count(labels),
        ties=count(labels.where(LabelRow.verdict == "tie")),
        inconsistent=count(labels.where(LabelRow.inconsistent.is_(True))),
    )


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
