"""Queries for training: the snapshot to train on, training runs with their per-step metrics, and
the new policy registered with its lineage."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from cai.errors import NotFound
from cai.store.models import PolicyRow, SnapshotRow, TrainingRunRow, TrainingStepRow, utcnow


@dataclass(frozen=True)
class SnapshotRecord:
    id: int
    path: str
    manifest_sha256: str


def latest_snapshot(session: Session, round_id: int) -> SnapshotRecord:
    row = session.scalar(
        select(SnapshotRow).where(SnapshotRow.round_id == round_id).order_by(SnapshotRow.id.desc()).limit(1)
    )
    if row is None:
        raise NotFound(f"round {round_id} has no snapshot yet: export it first")
    return SnapshotRecord(row.id, row.path, row.manifest_sha256)


def snapshot_by_manifest(session: Session, manifest_sha256: str) -> SnapshotRecord | None:
    row = session.scalar(select(SnapshotRow).where(SnapshotRow.manifest_sha256 == manifest_sha256))
    return SnapshotRecord(row.id, row.path, row.manifest_sha256) if row else None


def root_policy(session: Session, policy_id: int) -> PolicyRow:
    """The SFT model the policy's lineage started from: the nearest ancestor (or the policy
    itself) that an SFT run trained (`cai sft`), else the lineage's first policy."""
    row = session.get_one(PolicyRow, policy_id)
    while row.parent_id is not None and not _trained_by_sft(session, row.id):
        row = session.get_one(PolicyRow, row.parent_id)
    return row


def _trained_by_sft(session: Session, policy_id: int) -> bool:
    return (
        session.scalar(
            select(TrainingRunRow.id)
            .where(TrainingRunRow.output_policy_id == policy_id, TrainingRunRow.method == "sft")
            .limit(1)
        )
        is not None
    )


def config_key(round_id: int, snapshot_id: int, reference_policy_id: int, config: dict[str, Any]) -> str:
    identity = [round_id, snapshot_id, reference_policy_id, config]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def start_or_resume_run(
    session: Session,
    round_id: int,
    snapshot_id: int,
    reference_policy_id: int,
    config: dict[str, Any],
    output_dir: str,
    method: str = "dpo",
) -> tuple[int, bool]:
    """(training run id, resumed): an unfinished run with the same inputs is continued, not redone.
    `method`: 'dpo' or 'sft'."""
    row = session.scalar(
        select(TrainingRunRow).where(
            TrainingRunRow.round_id == round_id,
            TrainingRunRow.snapshot_id == snapshot_id,
            TrainingRunRow.reference_policy_id == reference_policy_id,
            TrainingRunRow.output_dir == output_dir,
            TrainingRunRow.method == method,
            TrainingRunRow.status != "done",
        )
    )
    if row is not None and row.config == config:
        session.execute(update(TrainingRunRow).where(TrainingRunRow.id == row.id).values(status="running"))
        return row.id, True
    row = TrainingRunRow(
        round_id=round_id,
        snapshot_id=snapshot_id,
        reference_policy_id=reference_policy_id,
        status="running",
        output_dir=output_dir,
        method=method,
        config=config,
    )
    session.add(row)
    session.flush()
    return row.id, False


def record_step(session: Session, run_id: int, step: int, metrics: dict[str, float]) -> None:
    """Per-step metrics. Several logs of one step (training, then evaluation) are merged; a
    resumed run that logs a step again overwrites the values it logs."""
    row = session.get(TrainingStepRow, (run_id, step))
    if row is None:
        session.add(TrainingStepRow(training_run_id=run_id, step=step, metrics=metrics))
    else:
        row.metrics = {**row.metrics, **metrics}


def finish_run(
    session: Session,
    run_id: int,
    metrics: dict[str, float],
    model_dir: str,
    policy_name: str,
    parent_policy_id: int,
    snapshot_sha256: str,
    constitution_id: int,
    config: dict[str, Any],
) -> int:
    """Register the trained model as a policy with its lineage and close the run; returns the
    policy id. Training the same run again finds the policy already registered."""
    policy = session.scalar(select(PolicyRow).where(PolicyRow.name == policy_name))
    if policy is None:
        policy = PolicyRow(
            name=policy_name,
            model_ref=model_dir,
            parent_id=parent_policy_id,
            snapshot_sha256=snapshot_sha256,
            constitution_id=constitution_id,
            training_config=config,
        )
        session.add(policy)
        session.flush()
    session.execute(
        update(TrainingRunRow)
        .where(TrainingRunRow.id == run_id)
        .values(status="done", metrics=metrics, output_policy_id=policy.id, finished_at=utcnow())
    )
    return policy.id


def fail_run(session: Session, run_id: int) -> None:
    session.execute(update(TrainingRunRow).where(TrainingRunRow.id == run_id).values(status="failed"))


def training_steps(session: Session, run_id: int) -> list[tuple[int, dict[str, Any]]]:
    rows = session.execute(
        select(TrainingStepRow.step, TrainingStepRow.metrics)
        .where(TrainingStepRow.training_run_id == run_id)
        .order_by(TrainingStepRow.step)
    )
    return [(step, metrics) for step, metrics in rows]


def latest_step(session: Session, round_id: int) -> int | None:
    """The last step stored by the round's newest training run (progress of a run in another process)."""
    return session.scalar(
        select(func.max(TrainingStepRow.step)).where(
            TrainingStepRow.training_run_id
            == select(func.max(TrainingRunRow.id))
            .where(TrainingRunRow.round_id == round_id)
            .scalar_subquery()
        )
    )
