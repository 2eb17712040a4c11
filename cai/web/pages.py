"""The read-only pages: rounds dashboard and plots, pair browser, pair detail, judge stats and
constitution versions. Each is a thin view over the same store functions the CLI uses."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session

from cai.errors import BadInput, NotFound
from cai.web.common import render, transaction, web

if TYPE_CHECKING:
    from cai.store.audit import PairFilters

router = APIRouter()

PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
FLAGS = ("inconsistent", "ties", "failed")
ROUND_QUERY = Query("", alias="round")


# --- rounds ----------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request) -> Response:
    from cai.report import PLOTS
    from cai.store.reporting import gather_report

    with transaction(request) as session:
        data = gather_report(session)
    plots = web(request).plots(data)
    return render(
        request,
        "dashboard.html",
        section="rounds",
        data=data,
        plots=[(name, title, missing, name in plots) for name, (title, missing) in PLOTS.items()],
    )


@router.get("/rounds/{round_id}", response_class=HTMLResponse)
def round_page(request: Request, round_id: int) -> Response:
    return render_round(request, round_id)


def render_round(
    request: Request,
    round_id: int,
    job_form: dict[str, str] | None = None,
    problems: list[str] | None = None,
    status: int = 200,
) -> Response:
    """The round, its jobs, and (for operators) the forms that run a job or hand out review
    queues; `job_form` and `problems` show a refused form back."""
    from cai.report import PLOTS, round_notes
    from cai.store import repo
    from cai.store.jobs import list_jobs
    from cai.store.reporting import gather_report
    from cai.web.service import JOB_KINDS_FROM_A_ROUND

    with transaction(request) as session:
        record = repo.get_round(session, round_id)  # NotFound -> 404 page
        counts = repo.round_counts(session, round_id)
        data = gather_report(session, round_id)
        jobs = list_jobs(session, round_id=round_id, limit=20)
    plots = web(request).plots(data)
    (report,) = data.shown
    return render(
        request,
        "round.html",
        status,
        section="rounds",
        jobs=jobs,
        job_kinds=JOB_KINDS_FROM_A_ROUND,
        form=job_form or {},
        problems=problems or [],
        record=record,
        counts=counts,
        report=report,
        notes=round_notes(report),
        plots=[(name, title, missing, name in plots) for name, (title, missing) in PLOTS.items()],
    )


@router.get("/plots/{name}")
def plot(request: Request, name: str, round_param: str = ROUND_QUERY) -> Response:
    from cai.store.reporting import gather_report

    round_id = _round_param(round_param)
    with transaction(request) as session:
        data = gather_report(session, round_id)
    png = web(request).plots(data).get(name)
    if png is None:
        raise NotFound(f"no plot {name!r} for {'round ' + str(round_id) if round_id else 'these rounds'}")
    return Response(png, media_type="image/png")


# --- pairs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListQuery:
    """The pair browser's query string, as typed (so the form can show it back)."""

    round: str = ""
    principle: str = ""
    kind: str = ""
    inconsistent: str = ""
    ties: str = ""
    failed: str = ""
    max_confidence: str = ""
    search: str = ""
    page: str = ""
    per: str = ""

    def url(self, **changes: Any) -> str:
        values = {**self.__dict__, **changes}
        return "/pairs?" + urlencode({k: v for k, v in values.items() if v not in ("", None)})


@router.get("/pairs", response_class=HTMLResponse)
def pairs(request: Request) -> Response:
    from cai.store.audit import list_pairs

    fields = ListQuery.__dataclass_fields__
    query = ListQuery(**{k: v.strip() for k, v in request.query_params.items() if k in fields})
    with transaction(request) as session:
        filters, page, per, problems = _parse_list_query(session, query)
        if problems or filters is None:
            return render(
                request, "pairs.html", 400, section="pairs", **_list_context(session, query, problems)
            )
        found, total = list_pairs(session, filters, limit=per, offset=(page - 1) * per)
        context = _list_context(session, query, [])
    pages = max(1, math.ceil(total / per))
    if page > pages:
        raise NotFound(f"page {page} is past the last page ({pages}) of {total} matching pairs")
    context.update(
        pairs=found,
        total=total,
        page=page,
        pages=pages,
        first=(page - 1) * per + 1,
        prev_url=query.url(page=page - 1) if page > 1 else None,
        next_url=query.url(page=page + 1) if page < pages else None,
    )
    return render(request, "pairs.html", section="pairs", **context)


def _parse_list_query(session: Session, query: ListQuery) -> tuple[PairFilters | None, int, int, list[str]]:
    """PairFilters, page and page size from the query string, or the problems with it. Checked
    like `cai audit list` checks its options: a known round (else 404), a known principle and
    kind, a confidence between 0 and 1."""
    from cai.store import repo
    from cai.store.audit import PAIR_KINDS, PairFilters, principle_keys

    problems = []
    round_id = None
    if query.round and not (query.round.isascii() and query.round.isdigit()):
        problems.append(f"round: expected a round id, got {query.round!r}")
    elif query.round:
        round_id = int(query.round)
        repo.get_round(session, round_id)  # NotFound -> 404 page
    if query.principle and query.principle not in (known := principle_keys(session, round_id)):
        problems.append(f"principle: no principle {query.principle!r}; known: {', '.join(sorted(known))}")
    if query.kind and query.kind not in PAIR_KINDS:
        problems.append(f"kind: expected one of {', '.join(PAIR_KINDS)}, got {query.kind!r}")
    flags = {}
    for name in FLAGS:
        value = getattr(query, name).lower()
        if value not in ("", "0", "1", "on", "true", "false"):
            problems.append(f"{name}: expected 1 or 0, got {getattr(query, name)!r}")
        flags[name] = value in ("1", "on", "true")
    max_confidence = None
    if query.max_confidence:
        try:
            max_confidence = float(query.max_confidence)
        except ValueError:
            max_confidence = math.nan
        if not 0.0 <= max_confidence <= 1.0:  # NaN fails this too
            problems.append(f"max confidence: expected a number from 0 to 1, got {query.max_confidence!r}")
    page = _positive(query.page, "page", 1, problems)
    per = _positive(query.per, "per", PAGE_SIZE, problems)
    if per > MAX_PAGE_SIZE:
        problems.append(f"per: at most {MAX_PAGE_SIZE} pairs a page")
    if problems:
        return None, page, per, problems
    filters = PairFilters(
        round_id=round_id,
        kind=query.kind or None,
        principle=query.principle or None,
        inconsistent=flags["inconsistent"],
        ties=flags["ties"],
        failed=flags["failed"],
        max_confidence=max_confidence,
        search=query.search or None,
    )
    return filters, page, per, []


def _list_context(session: Session, query: ListQuery, problems: list[str]) -> dict[str, Any]:
    from cai.store import repo
    from cai.store.audit import PAIR_KINDS, principle_keys

    return {
        "query": query,
        "problems": problems,
        "rounds": [r.id for r in repo.list_rounds(session)],
        "principles": sorted(principle_keys(session, None)),
        "kinds": PAIR_KINDS,
        "pairs": [],
        "total": 0,
    }


@router.get("/pairs/{pair_id}", response_class=HTMLResponse)
def pair_page(request: Request, pair_id: int) -> Response:
    from cai.store.audit import pair_detail

    with transaction(request) as session:
        detail = pair_detail(session, pair_id)  # NotFound -> 404 page
    done = request.query_params.get("done")
    return render(
        request,
        "pair.html",
        section="pairs",
        d=detail,
        done=done if done in ("override", "review") else None,
        form={},
        problems=[],
    )


# --- stats and constitutions -------------------------------------------------------------------


@router.get("/stats", response_class=HTMLResponse)
def stats(request: Request, round_param: str = ROUND_QUERY) -> Response:
    from cai.audit import ALL
    from cai.store import repo
    from cai.store.audit_stats import audit_stats

    round_id = _round_param(round_param)
    with transaction(request) as session:
        found = audit_stats(session, round_id)
        rounds = [r.id for r in repo.list_rounds(session)]
    return render(
        request,
        "stats.html",
        section="stats",
        rows=[*found.principles, found.overall],
        all_name=ALL,
        judges=found.judges,
        humans=found.humans,
        rounds=rounds,
        round_id=round_id,
    )


@router.get("/constitutions", response_class=HTMLResponse)
def constitutions(request: Request) -> Response:
    from cai.store import repo

    with transaction(request) as session:
        records = repo.list_constitutions(session)
    return render(request, "constitutions.html", section="constitutions", records=records)


@router.get("/constitutions/diff", response_class=HTMLResponse)
def constitution_diff(request: Request, old: str = "", new: str = "") -> Response:
    from cai.constitution import diff_summary, diff_text, parse_ref
    from cai.store import repo

    if not old or not new:
        raise BadInput("choose two versions to compare (old and new)")
    with transaction(request) as session:
        a = repo.get_constitution(session, *parse_ref(old)).constitution
        b = repo.get_constitution(session, *parse_ref(new)).constitution
    text = diff_text(a, b)
    lines = [(_line_kind(line), line) for line in text.splitlines()]
    return render(
        request,
        "diff.html",
        section="constitutions",
        old=a.ref,
        new=b.ref,
        summary=diff_summary(a, b),
        lines=lines,
    )


@router.get("/constitutions/{name}/{version}", response_class=HTMLResponse)
def constitution_page(request: Request, name: str, version: int) -> Response:
    from cai.store import repo

    with transaction(request) as session:
        stored = repo.get_constitution(session, name, version)
    return render(request, "constitution.html", section="constitutions", stored=stored)


# --- helpers -----------------------------------------------------------------------------------


def _round_param(value: str) -> int | None:
    if not value:
        return None
    if not (value.isascii() and value.isdigit()):
        raise BadInput(f"round: expected a round id, got {value!r}")
    return int(value)


def _positive(value: str, name: str, default: int, problems: list[str]) -> int:
    if not value:
        return default
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        problems.append(f"{name}: expected a positive whole number, got {value!r}")
        return default
    return int(value)


def _line_kind(line: str) -> str:
    if line.startswith(("+++", "---")):
        return "file"
    if line.startswith("@@"):
        return "hunk"
    return {"+": "add", "-": "del"}.get(line[:1], "same")
