"""Judge identities (one row per configuration) and their calibrations."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from cai.store.models import CalibrationRow, ConstitutionRow, JudgeRow

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
    """The id of the judge `config` describes, registered on first use. Workers that start on a
    new judge at the same moment all insert it: the insert yields to whichever row lands first
    (PostgreSQL waits for that transaction), so every worker gets the same id and none fails."""
    by_sha = select(JudgeRow.id).where(JudgeRow.config_sha256 == config.sha256)
    found = session.scalar(by_sha)
    if found is not None:
        return found
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    session.execute(
        insert(JudgeRow)
        .values(
            config_sha256=config.sha256,
            backend=config.backend,
            model=config.model,
            base_url=config.base_url,
            mode=config.mode,
            template_sha256=config.template_sha256,
            params=config.params,
        )
        .on_conflict_do_nothing(index_elements=[JudgeRow.config_sha256])
    )
    return session.scalars(by_sha).one()


def endpoint_features(session: Session, judge_id: int, base_url: str) -> dict[str, Any] | None:
    """What `base_url` accepted when this judge last used it (see cai.backends.negotiation)."""
    stored = session.get_one(JudgeRow, judge_id).endpoint_features or {}
    found = stored.get(base_url)
    return found if isinstance(found, dict) else None


def remember_endpoint_features(
    session: Session, judge_id: int, base_url: str, features: dict[str, Any]
) -> None:
    row = session.get_one(JudgeRow, judge_id)
    # A new dict, so the JSON column sees the change.
    row.endpoint_features = {**(row.endpoint_features or {}), base_url: features}


# --- calibration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationRecord:
    accuracy: float
    consistency: float
    injection_follow_rate: float | None
    pairs: int
    created_at: Any
    gold_sha256: str | None = None


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
        row.accuracy, row.consistency, row.injection_follow_rate, row.pairs, row.created_at, row.gold_sha256
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
        row.accuracy, row.consistency, row.injection_follow_rate, row.pairs, row.created_at, row.gold_sha256
    )


@dataclass(frozen=True)
class CalibrationEntry:
    id: int
    judge: str
    judge_backend: str
    constitution: str
    pairs: int
    accuracy: float
    consistency: float
    injection_follow_rate: float | None
    created_at: datetime


def list_calibrations(session: Session, limit: int = 100) -> list[CalibrationEntry]:
    """Every calibration, newest first, with its judge and constitution named."""
    rows = session.execute(
        select(
            CalibrationRow, JudgeRow.model, JudgeRow.backend, ConstitutionRow.name, ConstitutionRow.version
        )
        .join(JudgeRow, JudgeRow.id == CalibrationRow.judge_id)
        .join(ConstitutionRow, ConstitutionRow.id == CalibrationRow.constitution_id)
        .order_by(CalibrationRow.id.desc())
        .limit(limit)
    ).all()
    return [
        CalibrationEntry(
            id=row.id,
            judge=model,
            judge_backend=backend,
            constitution=f"{name}@{version}",
            pairs=row.pairs,
            accuracy=row.accuracy,
            consistency=row.consistency,
            injection_follow_rate=row.injection_follow_rate,
            created_at=row.created_at,
        )
        for row, model, backend, name, version in rows
    ]
