"""/api/v1 resources over constitutions and rounds, calling the same store and stage functions
as `cai constitution` and `cai round`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Body, Depends, Query, Request
from pydantic import BaseModel, Field

from cai.api.auth import requires
from cai.api.params import MAX_ID, RoundFilter, RowId
from cai.auth import Actor, Role
from cai.registry import EMBEDDED_MODEL
from cai.store.actions import record
from cai.store.audit import AuditDetail, PairDetail, PairSummary
from cai.store.repo import RoundCounts
from cai.workspace import Workspace

router = APIRouter()
YAML_BODY = Body(
    b"",
    media_type="application/yaml",
    description="The constitution file's text (at most 1 MiB).",
)


def workspace(request: Request) -> Workspace:
    return request.app.state.workspace


class Constitution(BaseModel):
    name: str
    version: int
    ref: str
    sha256: str
    description: str
    principles: int
    created_at: datetime


class ConstitutionDetail(Constitution):
    body: dict[str, Any]
    """The parsed constitution."""
    source_text: str
    """The YAML as registered."""


class Registered(BaseModel):
    constitution: Constitution
    created: bool
    """False when identical content was registered already."""


class Validated(BaseModel):
    ref: str
    principles: int


class Round(BaseModel):
    id: int
    kind: Literal["rl", "sl"]
    """'rl': the preference stages; 'sl': critique-revision chains and SFT (jobs revise, export, sft)."""
    status: str
    constitution: str
    policy: str
    parent_round_id: int | None
    config: dict[str, Any]
    error: str | None
    failed_step: str | None
    created_at: datetime
    updated_at: datetime


class RoundDetail(Round):
    counts: RoundCounts


class RoundPage(BaseModel):
    items: list[Round]
    next_cursor: int | None


class RoundRequest(BaseModel):
    constitution: str
    """NAME or NAME@VERSION of a registered constitution."""
    policy: str = EMBEDDED_MODEL
    tag: str | None = None
    """Sample only the train prompts with this tag."""
    seed: int = Field(0, ge=0, le=MAX_ID)
    kind: Literal["rl", "sl"] = "rl"
    """'sl' starts a supervised (SL-CAI) round: critique-revision chains, then SFT."""


def _constitution(record: Any) -> Constitution:
    return Constitution(**{**record.__dict__, "ref": record.ref})


def _parse(text: bytes, filename: str) -> Any:
    from pathlib import Path

    from cai.constitution import MAX_CONSTITUTION_BYTES, decode_utf8, parse_constitution

    return parse_constitution(decode_utf8(text, filename, MAX_CONSTITUTION_BYTES), Path(filename))


@router.get("/constitutions", response_model=list[Constitution], summary="Every registered version")
def list_constitutions(
    ws: Workspace = Depends(workspace), actor: Actor = Depends(requires(Role.VIEWER))
) -> list[Constitution]:
    from cai.store import repo

    with ws.session() as session:
        return [_constitution(record) for record in repo.list_constitutions(session)]


@router.get(
    "/constitutions/{name}/{version}",
    response_model=ConstitutionDetail,
    summary="One version, parsed and as registered",
)
def get_constitution(
    name: str,
    version: RowId,
    ws: Workspace = Depends(workspace),
    actor: Actor = Depends(requires(Role.VIEWER)),
) -> ConstitutionDetail:
    from cai.store import repo

    with ws.session() as session:
        stored = repo.get_constitution(session, name, version)
    return ConstitutionDetail(
        **_constitution(stored.record).model_dump(),
        body=stored.constitution.model_dump(mode="json"),
        source_text=stored.source_text,
    )


@router.post(
    "/constitutions/validate", response_model=Validated, summary="Check a constitution file; stores nothing"
)
def validate_constitution(
    text: bytes = YAML_BODY,
    filename: str = Query("constitution.yaml", description="Named in every problem, with its line."),
    actor: Actor = Depends(requires(Role.VIEWER)),
) -> Validated:
    loaded = _parse(text, filename)
    return Validated(ref=loaded.constitution.ref, principles=len(loaded.constitution.principles))


@router.post(
    "/constitutions", response_model=Registered, status_code=201, summary="Register a constitution file"
)
def register_constitution(
    text: bytes = YAML_BODY,
    filename: str = Query("constitution.yaml", description="Named in every problem, with its line."),
    ws: Workspace = Depends(workspace),
    actor: Actor = Depends(requires(Role.OPERATOR)),
) -> Registered:
    from cai.store import repo

    loaded = _parse(text, filename)
    with ws.session() as session:
        stored, created = repo.register_constitution(session, loaded)
        if created:
            record(session, actor.name, "constitution.register", stored.ref, filename=filename)
    return Registered(constitution=_constitution(stored), created=created)


@router.get("/rounds", response_model=RoundPage, summary="Rounds, oldest first")
def list_rounds(
    limit: int = Query(50, ge=1, le=500),
    cursor: int | None = Query(None, ge=0, le=MAX_ID, description="next_cursor of the page before"),
    ws: Workspace = Depends(workspace),
    actor: Actor = Depends(requires(Role.VIEWER)),
) -> RoundPage:
    from cai.store import repo

    with ws.session() as session:
        found = repo.list_rounds(session, limit=limit + 1, after=cursor)
    page = found[:limit]
    return RoundPage(
        items=[Round.model_validate(r, from_attributes=True) for r in page],
        next_cursor=page[-1].id if len(found) > limit else None,
    )


@router.get("/rounds/{round_id}", response_model=RoundDetail, summary="One round with its counts")
def get_round(
    round_id: RowId, ws: Workspace = Depends(workspace), actor: Actor = Depends(requires(Role.VIEWER))
) -> RoundDetail:
    from dataclasses import asdict

    from cai.store import repo

    with ws.session() as session:
        record = repo.get_round(session, round_id)
        counts = repo.round_counts(session, round_id)
    return RoundDetail(
        **Round.model_validate(record, from_attributes=True).model_dump(),
        counts=RoundCounts(**asdict(counts)),
    )


@router.post("/rounds", response_model=Round, status_code=201, summary="Start a round")
def create_round(
    request: RoundRequest, ws: Workspace = Depends(workspace), actor: Actor = Depends(requires(Role.OPERATOR))
) -> Round:
    from cai.stages.rounds import start_round

    started = start_round(
        ws, request.constitution, request.policy, request.tag, request.seed, actor.name, kind=request.kind
    )
    return Round.model_validate(started.round, from_attributes=True)


class PairPage(BaseModel):
    items: list[PairSummary]
    total: int
    """Pairs matching the filters, over every page."""
    next_cursor: int | None


class OverrideRequest(BaseModel):
    prefer: Literal["A", "B", "tie"]
    note: str = Field(min_length=1, max_length=4000)
    """Why: kept with the label, shown to every later reader."""


class ReviewRequest(BaseModel):
    note: str = Field("", max_length=4000)


@router.get("/pairs", response_model=PairPage, summary="Pairs with the audit filters, in id order")
def list_pairs(
    round_id: RoundFilter = None,
    kind: Literal["sample", "revision", "eval"] | None = Query(None, description="Default: all but eval."),
    principle: str | None = None,
    inconsistent: bool = False,
    ties: bool = False,
    failed: bool = False,
    max_confidence: float | None = Query(None, ge=0, le=1),
    search: str | None = Query(None, max_length=200),
    limit: int = Query(50, ge=1, le=500),
    cursor: int | None = Query(None, ge=0, le=MAX_ID, description="next_cursor of the page before"),
    ws: Workspace = Depends(workspace),
    actor: Actor = Depends(requires(Role.VIEWER)),
) -> PairPage:
    from cai.store import audit

    filters = audit.PairFilters(round_id, kind, principle, inconsistent, ties, failed, max_confidence, search)
    with ws.session() as session:
        found, total = audit.list_pairs(session, filters, limit=limit + 1, after=cursor)
    page = found[:limit]
    return PairPage(items=page, total=total, next_cursor=page[-1].pair_id if len(found) > limit else None)


@router.get("/pairs/{pair_id}", response_model=PairDetail, summary="A pair with every judgment and label")
def get_pair(
    pair_id: RowId, ws: Workspace = Depends(workspace), actor: Actor = Depends(requires(Role.VIEWER))
) -> PairDetail:
    from cai.store import audit

    with ws.session() as session:
        return audit.pair_detail(session, pair_id)


@router.post(
    "/pairs/{pair_id}/override", response_model=AuditDetail, status_code=201, summary="Override the judge"
)
def override(
    pair_id: RowId,
    request: OverrideRequest,
    ws: Workspace = Depends(workspace),
    actor: Actor = Depends(requires(Role.ANNOTATOR)),
) -> AuditDetail:
    from cai.store import audit

    with ws.session() as session:
        return audit.add_override(session, pair_id, request.prefer, actor.name, request.note)


@router.post(
    "/pairs/{pair_id}/review", response_model=AuditDetail, status_code=201, summary="Agree with the judge"
)
def review(
    pair_id: RowId,
    request: ReviewRequest,
    ws: Workspace = Depends(workspace),
    actor: Actor = Depends(requires(Role.ANNOTATOR)),
) -> AuditDetail:
    from cai.store import audit

    with ws.session() as session:
        return audit.add_review(session, pair_id, actor.name, request.note)
