"""/api/v1 resources over how good the labels and the policies are: audit stats (judge and
humans), per-annotator review queues, evaluations, judge calibrations and the round report."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from cai.api.auth import requires
from cai.api.params import MAX_ID, RoundFilter, RowId
from cai.api.resources import workspace
from cai.audit import HumanAgreement, PrincipleStats
from cai.auth import Actor, Role
from cai.errors import NotFound
from cai.stages.settings import CalibrateSettings
from cai.store.audit import JudgeCalibration, PairSummary
from cai.store.judges import CalibrationEntry
from cai.store.reporting import RoundReport as RoundHistory
from cai.workspace import Workspace

router = APIRouter()


class AuditStats(BaseModel):
    round_id: int | None
    principles: list[PrincipleStats]
    overall: PrincipleStats
    judges: list[JudgeCalibration]
    humans: HumanAgreement
    """Krippendorff's alpha between people, over the pairs two or more of them labeled."""


@router.get("/audit/stats", response_model=AuditStats, summary="The judge per principle, and the humans")
def get_audit_stats(
    round_id: RoundFilter = None,
    ws: Workspace = Depends(workspace),
    actor: Actor = Depends(requires(Role.VIEWER)),
) -> AuditStats:
    from dataclasses import asdict

    from cai.store.audit_stats import audit_stats

    with ws.session() as session:
        return AuditStats(**asdict(audit_stats(session, round_id)))


class QueueRequest(BaseModel):
    annotators: list[str] = Field(min_length=1, max_length=100)
    """Names as the annotators' tokens carry them (`cai token create --name`)."""
    per_annotator: int = Field(20, ge=1, le=10_000)
    overlap: float = Field(0.2, ge=0, le=1)
    """Share of each queue that every annotator gets: agreement is measured there."""
    seed: int = Field(0, ge=0, le=MAX_ID)


class Queues(BaseModel):
    round_id: int
    queues: dict[str, list[int]]
    """Annotator -> pair ids in queue order."""


class QueueState(BaseModel):
    round_id: int
    annotator: str
    assigned: int
    done: int
    next: PairSummary | None
    """Decide it with /pairs/{id}/override or /pairs/{id}/review; null when the queue is done."""


@router.post(
    "/rounds/{round_id}/queues", response_model=Queues, status_code=201, summary="Assign review queues"
)
def assign_queues(
    round_id: RowId,
    request: QueueRequest,
    ws: Workspace = Depends(workspace),
    actor: Actor = Depends(requires(Role.OPERATOR)),
) -> Queues:
    """Draws from the round's stratified review sample (inconsistent, least confident, then
    every principle). An annotator's unfinished pairs from an earlier assignment are replaced."""
    from cai.store import annotators, repo

    with ws.session() as session:
        repo.get_round(session, round_id)
        queues = annotators.assign_queues(
            session,
            round_id,
            request.annotators,
            request.per_annotator,
            request.overlap,
            request.seed,
            actor.name,
        )
    return Queues(round_id=round_id, queues=queues)


@router.get(
    "/rounds/{round_id}/queue", response_model=QueueState, summary="The caller's queue and its next pair"
)
def my_queue(
    round_id: RowId,
    annotator: str | None = Query(
        None, max_length=200, description="Someone else's (operators); default: yours."
    ),
    ws: Workspace = Depends(workspace),
    actor: Actor = Depends(requires(Role.ANNOTATOR)),
) -> QueueState:
    from dataclasses import asdict

    from fastapi import HTTPException

    from cai.store import annotators, repo

    if annotator is not None and annotator != actor.name and not actor.role.allows(Role.OPERATOR):
        raise HTTPException(
            403, f"another's queue needs the operator role; {actor.name} is {actor.role.label}"
        )
    with ws.session() as session:
        repo.get_round(session, round_id)
        return QueueState(**asdict(annotators.queue_state(session, round_id, annotator or actor.name)))


class Evaluation(BaseModel):
    id: int
    round_id: int
    candidate: str
    baseline: str
    prompts: int
    wins: int
    ties: int
    losses: int
    win_rate: float
    metrics: dict[str, Any]


@router.get(
    "/rounds/{round_id}/evaluation", response_model=Evaluation, summary="The round's latest evaluation"
)
def get_evaluation(
    round_id: RowId, ws: Workspace = Depends(workspace), actor: Actor = Depends(requires(Role.VIEWER))
) -> Evaluation:
    from dataclasses import asdict

    from cai.store import repo
    from cai.store.evaluation import latest_evaluation

    with ws.session() as session:
        repo.get_round(session, round_id)
        found = latest_evaluation(session, round_id)
    if found is None:
        raise NotFound(f"round {round_id} has no evaluation yet: submit an eval job")
    return Evaluation(**asdict(found), win_rate=found.win_rate)


@router.get(
    "/calibrations", response_model=list[CalibrationEntry], summary="Judge calibrations, newest first"
)
def list_calibrations(
    limit: int = Query(100, ge=1, le=1000),
    ws: Workspace = Depends(workspace),
    actor: Actor = Depends(requires(Role.VIEWER)),
) -> list[CalibrationEntry]:
    from cai.store.judges import list_calibrations

    with ws.session() as session:
        return list_calibrations(session, limit)


@router.post("/calibrations", status_code=202, summary="Calibrate a judge (queues a calibrate job)")
def submit_calibration(
    settings: CalibrateSettings,
    ws: Workspace = Depends(workspace),
    actor: Actor = Depends(requires(Role.OPERATOR)),
) -> dict[str, int]:
    """The same as POST /jobs with kind `calibrate`; poll /jobs/{job_id}, then read /calibrations."""
    from cai.jobs import submit_job

    return {"job_id": submit_job(ws, "calibrate", None, settings, actor.name).id}


class RoundReport(BaseModel):
    round_id: int
    rounds: list[RoundHistory]
    """This round and every round before it, oldest first."""


@router.get(
    "/rounds/{round_id}/report",
    response_model=RoundReport,
    summary="The round report's data (what `cai report` plots)",
)
def round_report(
    round_id: RowId, ws: Workspace = Depends(workspace), actor: Actor = Depends(requires(Role.VIEWER))
) -> RoundReport:
    from cai.store.reporting import gather_report

    with ws.session() as session:
        data = gather_report(session, round_id)
    return RoundReport(round_id=round_id, rounds=data.rounds)
