"""The pages that drive the service: an operator starts rounds, runs stage and loop jobs on them,
watches a job's progress and cancels it, and hands out review queues; an annotator works through
their queue one pair at a time. Every write goes through the same stage and store functions as
the CLI and the API, checks the form's CSRF token and the actor's role first, and is logged with
its actor. Pages work without JavaScript: a running job's page reloads itself."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from cai.auth import Role
from cai.errors import BadInput
from cai.web.actions import require_role
from cai.web.common import current_actor, render, transaction, web

router = APIRouter()

JOB_KINDS_FROM_A_ROUND = ("loop", "generate", "judge", "export", "train", "eval")
REFRESH_SECONDS = 2


# --- rounds ------------------------------------------------------------------------------------


@router.get("/rounds/new", response_class=HTMLResponse)
def new_round_form(request: Request) -> Response:
    return _new_round_page(request, {}, [])


def _new_round_page(
    request: Request, form: dict[str, str], problems: list[str], status: int = 200
) -> Response:
    from cai.registry import EMBEDDED_MODEL
    from cai.store import repo

    with transaction(request) as session:
        constitutions = [c.ref for c in repo.list_constitutions(session)]
    return render(
        request,
        "round_new.html",
        status,
        section="rounds",
        constitutions=constitutions,
        default_policy=EMBEDDED_MODEL,
        form=form,
        problems=problems,
    )


@router.post("/rounds", response_class=HTMLResponse)
def start_round(
    request: Request,
    constitution: str = Form(""),
    policy: str = Form(""),
    tag: str = Form(""),
    seed: str = Form("0"),
    csrf: str = Form(""),
) -> Response:
    from cai.stages.rounds import start_round

    actor = require_role(request, csrf, Role.OPERATOR)
    form = {"constitution": constitution, "policy": policy, "tag": tag, "seed": seed}
    try:
        started = start_round(
            web(request).workspace,
            constitution.strip(),
            policy.strip() or _default_policy(),
            tag.strip() or None,
            _int("seed", seed),
            actor.name,
        )
    except BadInput as exc:
        return _new_round_page(request, form, exc.problems, 400)
    return RedirectResponse(f"/rounds/{started.round.id}?started=1", status_code=303)


def _default_policy() -> str:
    from cai.registry import EMBEDDED_MODEL

    return EMBEDDED_MODEL


def _int(field: str, value: str, low: int | None = None) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise BadInput(f"{field}: expected a whole number, got {value!r}") from None
    if low is not None and number < low:
        raise BadInput(f"{field}: at least {low}")
    return number


# --- jobs --------------------------------------------------------------------------------------


@router.post("/rounds/{round_id}/jobs", response_class=HTMLResponse)
def submit_job(
    request: Request,
    round_id: int,
    kind: str = Form(""),
    prompts: str = Form(""),
    samples: str = Form(""),
    settings: str = Form(""),
    csrf: str = Form(""),
) -> Response:
    """A stage job, or a one-round loop job, on this round. `prompts` and `samples` size the
    sampling; `settings` (JSON) holds any other field of the stage's settings."""
    from cai.jobs import submit_job

    actor = require_role(request, csrf, Role.OPERATOR)
    try:
        values = _job_settings(kind, prompts, samples, settings)
        job = submit_job(web(request).workspace, kind, round_id, values, actor.name)
    except BadInput as exc:
        form = {"kind": kind, "prompts": prompts, "samples": samples, "settings": settings}
        return _round_with_problems(request, round_id, form, exc.problems)
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


def _job_settings(kind: str, prompts: str, samples: str, settings: str) -> dict[str, Any]:
    """The job's settings from the form; BadInput lists every bad field at once."""
    problems: list[str] = []
    if kind not in JOB_KINDS_FROM_A_ROUND:
        problems.append(f"kind: choose one of {', '.join(JOB_KINDS_FROM_A_ROUND)} (got {kind!r})")
    values: Any = {}
    try:
        values = json.loads(settings) if settings.strip() else {}
    except json.JSONDecodeError as exc:
        problems.append(f"settings: invalid JSON at line {exc.lineno}: {exc.msg}")
    if not isinstance(values, dict):
        problems.append("settings: expected a JSON object")
        values = {}
    sizes = {}
    for field, text, key, low in (("prompts", prompts, "limit", 1), ("samples", samples, "samples", 2)):
        if text.strip():
            try:
                sizes[key] = _int(field, text, low)
            except BadInput as exc:
                problems += exc.problems
    if (prompts.strip() or samples.strip()) and kind not in ("loop", "generate"):
        problems.append(f"prompts, samples: a {kind} job does not sample; leave them empty")
    if problems:
        raise BadInput(problems[0] if len(problems) == 1 else f"{len(problems)} problems", problems)
    if kind == "loop":
        values.setdefault("rounds", 1)
        loop = values.setdefault("loop", {})
        if isinstance(loop, dict) and sizes:
            loop["generate"] = {**loop.get("generate", {}), **sizes}
    else:
        values.update(sizes)
    return values


def _round_with_problems(
    request: Request, round_id: int, form: dict[str, str], problems: list[str]
) -> Response:
    from cai.web.pages import render_round

    return render_round(request, round_id, job_form=form, problems=problems, status=400)


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request) -> Response:
    from cai.store.jobs import list_jobs

    with transaction(request) as session:
        found = list_jobs(session, limit=100)
    return render(request, "jobs.html", section="jobs", jobs=found, refresh=_any_running(found))


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: int) -> Response:
    from cai.store.jobs import get_job

    with transaction(request) as session:
        job = get_job(session, job_id)  # NotFound -> 404 page
    lines = job.log.splitlines()[-200:]
    return render(request, "job.html", section="jobs", job=job, log_lines=lines, refresh=not job.finished)


@router.post("/jobs/{job_id}/cancel", response_class=HTMLResponse)
def cancel_job(request: Request, job_id: int, csrf: str = Form("")) -> Response:
    from cai.store.actions import record
    from cai.store.jobs import get_job, request_cancel

    actor = require_role(request, csrf, Role.OPERATOR)
    with transaction(request) as session:
        job = get_job(session, job_id)
        if not job.finished:
            request_cancel(session, job_id)
            record(session, actor.name, "job.cancel", f"job {job_id}")
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


def _any_running(found: list[Any]) -> bool:
    return any(not job.finished for job in found)


# --- review queues -----------------------------------------------------------------------------


@router.post("/rounds/{round_id}/queues", response_class=HTMLResponse)
def assign_queues(
    request: Request,
    round_id: int,
    annotators: str = Form(""),
    per_annotator: str = Form("20"),
    overlap: str = Form("0.2"),
    seed: str = Form("0"),
    csrf: str = Form(""),
) -> Response:
    from cai.store import annotators as queues
    from cai.store import repo

    actor = require_role(request, csrf, Role.OPERATOR)
    names = [name.strip() for name in annotators.replace("\n", ",").split(",") if name.strip()]
    try:
        size = _int("per_annotator", per_annotator, 1)
        try:
            share = float(overlap)
        except ValueError:
            raise BadInput(f"overlap: expected a share between 0 and 1, got {overlap!r}") from None
        with transaction(request) as session:
            repo.get_round(session, round_id)
            queues.assign_queues(session, round_id, names, size, share, _int("seed", seed), actor.name)
    except BadInput as exc:
        form = {"annotators": annotators, "per_annotator": per_annotator, "overlap": overlap}
        return _round_with_problems(request, round_id, form, exc.problems)
    return RedirectResponse(f"/rounds/{round_id}?queues=1#queues", status_code=303)


@router.get("/queue", response_class=HTMLResponse)
def queue_page(request: Request, round_param: str = Query("", alias="round")) -> Response:
    """The logged-in annotator's queue on a round (their newest round with one, by default):
    the next pair in full, with the decision forms, which come back here."""
    from sqlalchemy import select

    from cai.store.annotators import queue_state
    from cai.store.audit import pair_detail
    from cai.store.models import ReviewAssignmentRow

    actor = current_actor(request)
    if actor is None:
        return render(request, "queue.html", section="queue", rounds=[], state=None, d=None, round_id=None)
    with transaction(request) as session:
        rounds = list(
            session.scalars(
                select(ReviewAssignmentRow.round_id)
                .where(ReviewAssignmentRow.annotator == actor.name)
                .distinct()
                .order_by(ReviewAssignmentRow.round_id.desc())
            )
        )
        round_id = int(round_param) if round_param.strip().isdigit() else (rounds[0] if rounds else None)
        state = queue_state(session, round_id, actor.name) if round_id is not None else None
        detail = pair_detail(session, state.next.pair_id) if state and state.next else None
    return render(
        request,
        "queue.html",
        section="queue",
        rounds=rounds,
        round_id=round_id,
        state=state,
        d=detail,
        s=state.next if state else None,
        form={},
        problems=[],
        decided_next=f"/queue?round={round_id}" if round_id is not None else "",
    )
