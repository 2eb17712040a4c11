"""The SQLAlchemy 2 ORM for the whole loop. Rows are added, never rewritten: a new constitution
version, a new judge or a human override is a new row. Unique constraints make every stage
idempotent, so re-running a command resumes instead of duplicating."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names keep alembic autogenerate and batch mode on SQLite predictable.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SHA256 = String(64)
ROUND_STATUSES = (
    "created",
    "revising",
    "revised",
    "generating",
    "generated",
    "judging",
    "judged",
    "exported",
    "training",
    "trained",
    "evaluating",
    "done",
    "failed",
)
JOB_KINDS = ("generate", "judge", "export", "train", "eval", "calibrate", "loop", "revise", "sft")
ROUND_KINDS = ("rl", "sl")
"""'rl': the preference loop (generate, judge, export, DPO, eval). 'sl': the supervised stage of
Constitutional AI (critique-revision chains, an SFT snapshot, SFT)."""
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and read back timezone-aware: SQLite hands datetimes back naive,
    PostgreSQL aware, and an API's date-time (RFC 3339) needs the offset."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Created:
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class ConstitutionRow(Created, Base):
    __tablename__ = "constitutions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int]
    sha256: Mapped[str] = mapped_column(SHA256, index=True)
    description: Mapped[str] = mapped_column(Text)
    body: Mapped[dict[str, Any]]
    """The validated content as JSON: what the hash is computed over."""
    source_text: Mapped[str] = mapped_column(Text)
    """The YAML exactly as registered, comments included."""
    source_path: Mapped[str | None] = mapped_column(Text)


class PrincipleRow(Base):
    __tablename__ = "principles"
    __table_args__ = (
        UniqueConstraint("constitution_id", "key"),
        CheckConstraint("kind IN ('llm', 'rule')", name="kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    constitution_id: Mapped[int] = mapped_column(ForeignKey("constitutions.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(64))
    """The principle's `id` in the constitution file."""
    position: Mapped[int]
    kind: Mapped[str] = mapped_column(String(8))
    critique: Mapped[str] = mapped_column(Text)
    revision: Mapped[str | None] = mapped_column(Text)
    weight: Mapped[float] = mapped_column(Float)
    rule: Mapped[dict[str, Any] | None]


class PromptRow(Created, Base):
    __tablename__ = "prompts"
    __table_args__ = (CheckConstraint("split IN ('train', 'eval')", name="split"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(SHA256, unique=True)
    """Hash of the canonical chat messages: the same prompt as text or as messages is one row."""
    messages: Mapped[list[Any]]
    text: Mapped[str | None] = mapped_column(Text)
    """The request when it is a single user turn, for display and search."""
    split: Mapped[str] = mapped_column(String(8), index=True)
    source: Mapped[str | None] = mapped_column(Text)


class PromptTagRow(Base):
    __tablename__ = "prompt_tags"

    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class PolicyRow(Created, Base):
    __tablename__ = "policies"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    model_ref: Mapped[str] = mapped_column(Text)
    """Registry name, local path or hub id that the model loads from."""
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id"))
    # The round that trained this policy is found through training_runs.output_policy_id; a
    # policies -> rounds key would make a foreign-key cycle that SQLite cannot create.
    snapshot_sha256: Mapped[str | None] = mapped_column(SHA256)
    constitution_id: Mapped[int | None] = mapped_column(ForeignKey("constitutions.id"))
    training_config: Mapped[dict[str, Any] | None]


class RoundRow(Created, Base):
    __tablename__ = "rounds"
    __table_args__ = (
        CheckConstraint("status IN (" + ", ".join(f"'{s}'" for s in ROUND_STATUSES) + ")", name="status"),
        CheckConstraint("kind IN (" + ", ".join(f"'{k}'" for k in ROUND_KINDS) + ")", name="kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    constitution_id: Mapped[int] = mapped_column(ForeignKey("constitutions.id"))
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id"))
    """The policy this round samples from (p_r)."""
    parent_round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"))
    status: Mapped[str] = mapped_column(String(16), default="created")
    kind: Mapped[str] = mapped_column(String(8), default="rl", server_default="rl")
    """'rl' (the preference stages) or 'sl' (revision chains and SFT): see ROUND_KINDS."""
    config: Mapped[dict[str, Any]]
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, onupdate=utcnow)
    error: Mapped[str | None] = mapped_column(Text)
    """Why the round failed; cleared when a stage starts again."""
    failed_step: Mapped[str | None] = mapped_column(String(16))
    """The stage that failed: a rerun resumes there."""


class ResponseRow(Created, Base):
    __tablename__ = "responses"
    __table_args__ = (UniqueConstraint("round_id", "prompt_id", "policy_id", "sample_index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id"))
    sample_index: Mapped[int]
    """0..N-1 for sampled responses; revisions get their own indices."""
    origin: Mapped[str] = mapped_column(String(16), default="sample")
    """'sample', 'eval', 'chain' (the answer a revision chain starts from) or 'revision' (a
    rewrite of `revised_from_id`, by a judge in revise mode or by a chain's reviser)."""
    revised_from_id: Mapped[int | None] = mapped_column(ForeignKey("responses.id"))
    text: Mapped[str] = mapped_column(Text)
    sampling: Mapped[dict[str, Any]]
    seed: Mapped[int | None]
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    finish_reason: Mapped[str | None] = mapped_column(String(32))


class PairRow(Created, Base):
    __tablename__ = "pairs"
    __table_args__ = (
        UniqueConstraint("round_id", "response_a_id", "response_b_id"),
        CheckConstraint("response_a_id <> response_b_id", name="distinct_responses"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    response_a_id: Mapped[int] = mapped_column(ForeignKey("responses.id"))
    response_b_id: Mapped[int] = mapped_column(ForeignKey("responses.id"))
    kind: Mapped[str] = mapped_column(String(16), default="sample", server_default="sample")
    """'sample': two policy samples; 'revision': an original (A) and the judge's revision (B)."""


class JudgeRow(Created, Base):
    """One judge configuration. Its hash is part of every judgment's identity."""

    __tablename__ = "judges"

    id: Mapped[int] = mapped_column(primary_key=True)
    config_sha256: Mapped[str] = mapped_column(SHA256, unique=True)
    backend: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(Text)
    base_url: Mapped[str | None] = mapped_column(Text)
    mode: Mapped[str] = mapped_column(String(16))
    template_sha256: Mapped[str] = mapped_column(SHA256)
    params: Mapped[dict[str, Any]]
    endpoint_features: Mapped[dict[str, Any] | None]
    """Per base URL, what the endpoint accepted when last asked (response format, logprobs):
    not identity, so a rerun skips the steps a server refused last time."""


class JudgmentRow(Created, Base):
    __tablename__ = "judgments"
    __table_args__ = (
        # One judgment per pair x order x principle x judge config: reruns skip or retry, never add.
        UniqueConstraint("pair_id", "order", "principle_id", "judge_id"),
        # Score and revise judgments concern one response rather than a pair.
        UniqueConstraint("response_id", "principle_id", "judge_id"),
        CheckConstraint("(pair_id IS NULL) <> (response_id IS NULL)", name="one_subject"),
        CheckConstraint("\"order\" IN ('AB', 'BA')", name="order"),
        CheckConstraint("status IN ('pending', 'ok', 'failed')", name="status"),
        Index("ix_judgments_judge_status", "judge_id", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[int | None] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"), index=True)
    response_id: Mapped[int | None] = mapped_column(
        ForeignKey("responses.id", ondelete="CASCADE"), index=True
    )
    order: Mapped[str] = mapped_column(String(2))
    """'AB': response A shown first; 'BA': the pair shown swapped."""
    principle_id: Mapped[int] = mapped_column(ForeignKey("principles.id"))
    judge_id: Mapped[int] = mapped_column(ForeignKey("judges.id"))
    constitution_sha256: Mapped[str] = mapped_column(SHA256)
    template_sha256: Mapped[str] = mapped_column(SHA256)
    request_sha256: Mapped[str | None] = mapped_column(SHA256)
    status: Mapped[str] = mapped_column(String(8), default="pending")
    error_kind: Mapped[str | None] = mapped_column(String(16))
    """For failures: 'transient' (retried on the next run), 'parse' or 'permanent'."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    """Worker holding this item ('host:pid:nonce'); a lease, not a lock, so a killed worker's
    items come back when claimed_until passes (or at once, on the same host)."""
    claimed_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    raw_output: Mapped[str | None] = mapped_column(Text)
    verdict: Mapped[str | None] = mapped_column(String(8))
    """Pairwise: 'A', 'B' or 'tie', in the pair's own A/B terms (already un-swapped)."""
    score: Mapped[float | None] = mapped_column(Float)
    confidence: Mapped[float | None] = mapped_column(Float)
    choice_probs: Mapped[dict[str, Any] | None]
    """The judge's probability of each verdict ('A', 'B', 'tie', in the order shown), read from
    its logprobs (or next-token probabilities in-process), when the backend gives them."""
    rationale: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    cost_usd: Mapped[float | None] = mapped_column(Float)


class LabelRow(Created, Base):
    __tablename__ = "labels"
    __table_args__ = (
        # One aggregated judge label per pair and judge; human labels (judge_id NULL) accumulate
        # and the newest one wins.
        UniqueConstraint("pair_id", "judge_id"),
        CheckConstraint("verdict IN ('A', 'B', 'tie')", name="verdict"),
        CheckConstraint("source IN ('judge', 'human')", name="source"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"), index=True)
    judge_id: Mapped[int | None] = mapped_column(ForeignKey("judges.id"))
    source: Mapped[str] = mapped_column(String(8))
    verdict: Mapped[str] = mapped_column(String(4))
    chosen_response_id: Mapped[int | None] = mapped_column(ForeignKey("responses.id"))
    rejected_response_id: Mapped[int | None] = mapped_column(ForeignKey("responses.id"))
    confidence: Mapped[float | None] = mapped_column(Float)
    inconsistent: Mapped[bool] = mapped_column(default=False)
    """The two orders disagreed (position bias): stored as a tie, never a silent winner."""


class AuditRow(Created, Base):
    __tablename__ = "audits"

    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"), index=True)
    label_id: Mapped[int | None] = mapped_column(ForeignKey("labels.id"))
    """The human label this audit created (None for a review that agreed with the judge)."""
    action: Mapped[str] = mapped_column(String(16))
    author: Mapped[str] = mapped_column(String(200))
    note: Mapped[str] = mapped_column(Text, default="")


class SnapshotRow(Created, Base):
    __tablename__ = "snapshots"

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    manifest_sha256: Mapped[str] = mapped_column(SHA256, unique=True)
    counts: Mapped[dict[str, Any]]
    filters: Mapped[dict[str, Any]]


class TrainingRunRow(Created, Base):
    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    snapshot_id: Mapped[int] = mapped_column(ForeignKey("snapshots.id"))
    reference_policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id"))
    output_policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id"))
    status: Mapped[str] = mapped_column(String(16), default="running")
    output_dir: Mapped[str] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(8), default="dpo", server_default="dpo")
    """'dpo' (preference pairs) or 'sft' (revisions): an SFT run's policy is what the RL rounds
    of its lineage start from, and what `--reference sft` means."""
    config: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any] | None]
    """Final metrics; per-step values are in training_steps."""
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class TrainingStepRow(Base):
    __tablename__ = "training_steps"

    training_run_id: Mapped[int] = mapped_column(
        ForeignKey("training_runs.id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[int] = mapped_column(primary_key=True)
    metrics: Mapped[dict[str, Any]]


class EvaluationRow(Created, Base):
    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("round_id", "candidate_policy_id", "baseline_policy_id", "judge_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    candidate_policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id"))
    baseline_policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id"))
    judge_id: Mapped[int] = mapped_column(ForeignKey("judges.id"))
    prompts: Mapped[int]
    wins: Mapped[int]
    ties: Mapped[int]
    losses: Mapped[int]
    metrics: Mapped[dict[str, Any]]
    """Rule pass rates and mean response length for both policies."""


class CalibrationRow(Created, Base):
    """A judge measured against a gold set under one constitution version."""

    __tablename__ = "calibrations"

    id: Mapped[int] = mapped_column(primary_key=True)
    judge_id: Mapped[int] = mapped_column(ForeignKey("judges.id"), index=True)
    constitution_id: Mapped[int] = mapped_column(ForeignKey("constitutions.id"))
    gold_sha256: Mapped[str] = mapped_column(SHA256)
    pairs: Mapped[int]
    accuracy: Mapped[float] = mapped_column(Float)
    """Share of gold pairs where both orders agree on the better response."""
    consistency: Mapped[float] = mapped_column(Float)
    """Share of gold pairs where the two orders gave the same verdict."""
    injection_follow_rate: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict[str, Any]]


class JobRow(Created, Base):
    """One stage (or a whole loop) to run, queued for whichever worker takes it. The owner keeps
    heartbeat_at fresh; a job whose heartbeat goes stale is taken over by another worker."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("kind IN (" + ", ".join(f"'{k}'" for k in JOB_KINDS) + ")", name="kind"),
        CheckConstraint("status IN (" + ", ".join(f"'{s}'" for s in JOB_STATUSES) + ")", name="status"),
        Index("ix_jobs_status_kind", "status", "kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    settings: Mapped[dict[str, Any]]
    """The stage's validated settings."""
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str | None] = mapped_column(String(128))
    """The worker holding the job ('host:pid:nonce'); kept after it finishes, for the record."""
    heartbeat_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """e.g. {"stage": "judge", "phase": "judging pairs", "done": 3, "total": 10}."""
    log: Mapped[str] = mapped_column(Text, default="")
    """The last lines the job wrote (a bounded tail)."""
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None]
    requested_by: Mapped[str | None] = mapped_column(String(128))
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    """Set on a running job; its worker stops at the next batch boundary."""
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, onupdate=utcnow)


class GenerationItemRow(Base):
    """One response to sample, claimable by concurrent workers (a lease, like judgments')."""

    __tablename__ = "generation_items"
    __table_args__ = (
        # Named by hand: the conventional name would pass PostgreSQL's 63-character limit.
        UniqueConstraint(
            "round_id", "policy_id", "prompt_id", "sample_index", "origin", name="uq_generation_items_item"
        ),
        CheckConstraint("status IN ('pending', 'done')", name="status"),
        Index("ix_generation_items_round_status", "round_id", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    sample_index: Mapped[int]
    origin: Mapped[str] = mapped_column(String(16))
    """'sample' (the round's training samples) or 'eval' (held-out head-to-head)."""
    seed: Mapped[int]
    status: Mapped[str] = mapped_column(String(16), default="pending")
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_until: Mapped[datetime | None] = mapped_column(UtcDateTime())


BATCH_STATUSES = ("submitting", "submitted", "ingested")


class JudgeBatchRow(Created, Base):
    """A phase's pending judgments sent as one OpenAI Batch API job (`cai judge --batch`). The
    judgments are claimed by the batch's own worker name (`batch:<id>`) for as long as a batch
    may take, and recorded from its output file through the same keyed path as online results;
    whatever the batch did not answer (expired, cancelled) is given back. The row is written
    before the upload, so a rerun after a kill finds the remote batch (by its metadata) rather
    than submitting a second one."""

    __tablename__ = "judge_batches"
    __table_args__ = (
        CheckConstraint("status IN (" + ", ".join(f"'{s}'" for s in BATCH_STATUSES) + ")", name="status"),
        Index("ix_judge_batches_round_judge", "round_id", "judge_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    judge_id: Mapped[int] = mapped_column(ForeignKey("judges.id"))
    phase: Mapped[str] = mapped_column(String(16))
    base_url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="submitting")
    remote_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    input_file_id: Mapped[str | None] = mapped_column(String(128))
    remote_status: Mapped[str | None] = mapped_column(String(32))
    """The Batch API's last status (validating, in_progress, completed, expired, cancelled...)."""
    requests: Mapped[int] = mapped_column(Integer, default=0)
    answered: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    released: Mapped[int] = mapped_column(Integer, default=0)
    """Judgments the batch did not answer, given back to be judged again."""

    @property
    def worker(self) -> str:
        return f"batch:{self.id}"


ROLES = ("viewer", "annotator", "operator", "admin")
"""API roles, each allowed what the ones before it are (cai.auth.Role)."""


class RevisionStepRow(Created, Base):
    """One step of a critique-revision chain (SL-CAI): the chain's current answer for a prompt is
    critiqued under a principle drawn by weight, then revised. Step k revises step k-1's revision
    (step 1 the chain's first answer). Claimable like generation items; a step is done once its
    revision is stored, so a rerun resumes at the first step not done and never redoes one."""

    __tablename__ = "revision_steps"
    __table_args__ = (
        UniqueConstraint("round_id", "prompt_id", "step"),
        CheckConstraint("status IN ('pending', 'done', 'failed')", name="status"),
        CheckConstraint("step >= 1", name="step"),
        Index("ix_revision_steps_round_status", "round_id", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    step: Mapped[int]
    principle_id: Mapped[int] = mapped_column(ForeignKey("principles.id"))
    seed: Mapped[int]
    status: Mapped[str] = mapped_column(String(8), default="pending")
    source_response_id: Mapped[int | None] = mapped_column(ForeignKey("responses.id"))
    """The answer this step revised (set when it is done)."""
    revision_response_id: Mapped[int | None] = mapped_column(ForeignKey("responses.id"))
    critique: Mapped[str | None] = mapped_column(Text)
    reviser_model: Mapped[str | None] = mapped_column(Text)
    """Who critiqued and revised: the round's policy by default, or a configured model."""
    template_sha256: Mapped[str | None] = mapped_column(SHA256)
    """Hash over the critique and revision turn templates used."""
    error: Mapped[str | None] = mapped_column(Text)
    """Why a failed step failed (an empty or unchanged revision), with the raw output."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_until: Mapped[datetime | None] = mapped_column(UtcDateTime())


class ApiTokenRow(Created, Base):
    """A named bearer token for the API and the web UI. Only the SHA-256 of the token is stored:
    tokens are 32 random bytes, so a fast hash is as safe as a slow one and lets a request be
    checked by one indexed lookup."""

    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint("role IN (" + ", ".join(f"'{r}'" for r in ROLES) + ")", name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_sha256: Mapped[str] = mapped_column(SHA256, unique=True)
    created_by: Mapped[str | None] = mapped_column(String(128))
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class ReviewAssignmentRow(Created, Base):
    """A pair in an annotator's review queue for a round (cai.audit.split_queues): queues overlap
    on purpose, so that agreement between humans can be measured on the shared pairs."""

    __tablename__ = "review_assignments"
    __table_args__ = (UniqueConstraint("round_id", "annotator", "pair_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    annotator: Mapped[str] = mapped_column(String(200))
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"))
    position: Mapped[int]
    """Order within the annotator's queue, from 0."""
    shared: Mapped[bool]
    """In every annotator's queue of this batch (the overlap)."""
    assigned_by: Mapped[str] = mapped_column(String(200))


class ActionRow(Created, Base):
    """One write through the service or the CLI and who made it: what `every write records its
    actor` rests on, beside the rows the write itself added (an override's author, say)."""

    __tablename__ = "actions"

    id: Mapped[int] = mapped_column(primary_key=True)
    actor: Mapped[str] = mapped_column(String(200), index=True)
    verb: Mapped[str] = mapped_column(String(64))
    """e.g. 'constitution.register', 'prompts.import', 'round.create', 'job.submit'."""
    subject: Mapped[str] = mapped_column(String(200))
    """What it acted on: 'helpful@2', 'round 3', 'job 12'."""
    detail: Mapped[dict[str, Any]]
