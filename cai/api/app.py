"""The /api/v1 application: mounted by the web UI's app (cai.web.app), with its own OpenAPI
schema at /api/v1/openapi.json."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import Depends, FastAPI, Query
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from cai.api import data, problems, quality, resources
from cai.api.auth import ApiAuth, current_actor, requires
from cai.api.params import MAX_ID, RoundFilter, RowId
from cai.auth import Actor, Role
from cai.errors import Conflict, NotFound
from cai.store.actions import ActionRecord, record
from cai.store.models import JOB_KINDS, JOB_STATUSES, ROLES
from cai.web.security import LoginThrottle
from cai.workspace import Workspace

JobKind = Literal[JOB_KINDS]  # type: ignore[valid-type]
JobStatus = Literal[JOB_STATUSES]  # type: ignore[valid-type]
RoleName = Literal[ROLES]  # type: ignore[valid-type]
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": problems.Problem, "description": problems.TITLES[status]}
    for status in (400, 401, 403, 404, 409, 422, 429)
}


class Me(BaseModel):
    name: str
    role: RoleName


class Job(BaseModel):
    id: int
    kind: JobKind
    round_id: int | None
    settings: dict[str, Any]
    status: JobStatus
    attempts: int
    owner: str | None
    progress: dict[str, Any]
    error: str | None
    result: dict[str, Any] | None
    requested_by: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None


class JobPage(BaseModel):
    items: list[Job]
    next_cursor: int | None
    """Pass as `cursor` for the next page; null on the last one."""


class JobLog(BaseModel):
    job_id: int
    lines: list[str]


class JobRequest(BaseModel):
    kind: JobKind
    round_id: int | None = Field(None, ge=1, le=MAX_ID)
    settings: dict[str, Any] = Field(default_factory=dict)
    """The stage's settings (as the CLI's flags), validated before anything is stored."""


class TokenRequest(BaseModel):
    name: str
    role: RoleName


class Token(BaseModel):
    name: str
    role: RoleName
    created_at: datetime
    created_by: str | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class CreatedToken(BaseModel):
    name: str
    role: RoleName
    token: str
    """Shown in this response only: the store keeps its SHA-256."""


class ActionPage(BaseModel):
    items: list[ActionRecord]
    next_cursor: int | None


def create_api(workspace: Workspace, bootstrap_token: str | None = None) -> FastAPI:
    """The API over `workspace`'s store; `bootstrap_token` (CAI_WEB_TOKEN) acts as an admin."""
    api = FastAPI(
        title="cai API",
        version="1",
        description="Constitutional AI rounds, jobs, labels and audits. Authenticate with "
        "`Authorization: Bearer <token>` (`cai token create`).",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        responses=PROBLEM_RESPONSES,
    )
    # Every request authenticates, so a client polling with a few requests in flight must not
    # trip the limit; a 256-bit token is out of reach of 20 guesses per 5 minutes all the same.
    api.state.auth = ApiAuth(workspace.engine, bootstrap_token, LoginThrottle(per_client=20, overall=200))
    api.state.workspace = workspace
    problems.install(api)
    api.openapi = lambda: _openapi_with_problems(api)  # type: ignore[method-assign]
    # data first: its /constitutions/{name}/diff must win over /constitutions/{name}/{version}.
    api.include_router(data.router)
    api.include_router(resources.router)
    api.include_router(quality.router)

    @api.get("/me", response_model=Me, summary="The token's holder and role")
    def me(actor: Actor = Depends(current_actor)) -> Me:
        return Me(name=actor.name, role=actor.role.label)

    @api.get("/jobs", response_model=JobPage, summary="Jobs, newest first")
    def list_jobs(
        status: JobStatus | None = None,
        kind: JobKind | None = None,
        round_id: RoundFilter = None,
        limit: int = Query(50, ge=1, le=500),
        cursor: int | None = Query(None, ge=1, le=MAX_ID, description="next_cursor of the page before"),
        actor: Actor = Depends(requires(Role.VIEWER)),
    ) -> JobPage:
        from cai.store import jobs

        with workspace.session() as session:
            found = jobs.list_jobs(session, status, kind, round_id, limit=limit + 1, before=cursor)
        page = found[:limit]
        return JobPage(items=[_job(j) for j in page], next_cursor=page[-1].id if len(found) > limit else None)

    @api.get("/jobs/{job_id}", response_model=Job, summary="One job with its progress")
    def get_job(job_id: RowId, actor: Actor = Depends(requires(Role.VIEWER))) -> Job:
        from cai.store import jobs

        with workspace.session() as session:
            return _job(jobs.get_job(session, job_id))

    @api.get("/jobs/{job_id}/log", response_model=JobLog, summary="The last lines a job wrote")
    def job_log(job_id: RowId, actor: Actor = Depends(requires(Role.VIEWER))) -> JobLog:
        from cai.store import jobs

        with workspace.session() as session:
            return JobLog(job_id=job_id, lines=jobs.get_job(session, job_id).log.splitlines())

    @api.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        from cai.api.docs import render_docs

        return HTMLResponse(render_docs(api.openapi()))

    @api.post("/jobs", response_model=Job, status_code=201, summary="Queue a stage or loop job")
    def submit_job(request: JobRequest, actor: Actor = Depends(requires(Role.OPERATOR))) -> Job:
        from cai.jobs import submit_job

        return _job(submit_job(workspace, request.kind, request.round_id, request.settings, actor.name))

    @api.post("/jobs/{job_id}/cancel", response_model=Job, summary="Cancel a queued or running job")
    def cancel_job(job_id: RowId, actor: Actor = Depends(requires(Role.OPERATOR))) -> Job:
        from cai.store import jobs

        with workspace.session() as session:
            job = jobs.get_job(session, job_id)
            if job.finished:
                raise Conflict(f"job {job_id} is {job.status} already")
            record(session, actor.name, "job.cancel", f"job {job_id}")
            return _job(jobs.request_cancel(session, job_id))

    @api.get("/tokens", response_model=list[Token], summary="Every token (never the token itself)")
    def list_tokens(actor: Actor = Depends(requires(Role.ADMIN))) -> list[Token]:
        from dataclasses import asdict

        from cai.store import tokens

        with workspace.session() as session:
            return [Token(**asdict(info)) for info in tokens.list_tokens(session)]

    @api.post("/tokens", response_model=CreatedToken, status_code=201, summary="Create a token")
    def create_token(request: TokenRequest, actor: Actor = Depends(requires(Role.ADMIN))) -> CreatedToken:
        from cai.store import tokens

        with workspace.session() as session:
            token = tokens.create(session, request.name, Role.parse(request.role), created_by=actor.name)
            record(session, actor.name, "token.create", request.name, role=request.role)
        return CreatedToken(name=request.name, role=request.role, token=token)

    @api.delete("/tokens/{name}", status_code=204, summary="Revoke a token")
    def revoke_token(name: str, actor: Actor = Depends(requires(Role.ADMIN))) -> None:
        from cai.store import tokens

        with workspace.session() as session:
            if not tokens.revoke(session, name):
                raise NotFound(f"{name}: no token of that name, or it is revoked already")
            record(session, actor.name, "token.revoke", name)

    @api.get("/actions", response_model=ActionPage, summary="Who wrote what, newest first")
    def list_actions(
        actor_name: str | None = Query(None, alias="actor", max_length=200),
        limit: int = Query(50, ge=1, le=500),
        cursor: int | None = Query(None, ge=0, le=MAX_ID, description="next_cursor of the page before"),
        actor: Actor = Depends(requires(Role.ADMIN)),
    ) -> ActionPage:

        from cai.store.actions import list_actions

        with workspace.session() as session:
            found = list_actions(session, actor_name, limit=limit + 1, before=cursor)
        page = found[:limit]
        return ActionPage(items=page, next_cursor=page[-1].id if len(found) > limit else None)

    return api


def _openapi_with_problems(api: FastAPI) -> dict[str, Any]:
    """The schema FastAPI generates, with every error response (400 and up) declared as what the
    API sends: application/problem+json bodies of the Problem model. FastAPI would document its
    own 422 shape, as application/json."""
    if api.openapi_schema:
        return api.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            for status, response in operation.get("responses", {}).items():
                if status.isdigit() and int(status) >= 400:
                    response["content"] = problem
                    response["description"] = problems.TITLES.get(
                        int(status), response.get("description", "")
                    )
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    api.openapi_schema = schema
    return schema


def _job(record: Any) -> Job:
    return Job.model_validate(record, from_attributes=True)
