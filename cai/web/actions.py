"""Logging in and out, and the only writes the UI makes: a human override of a pair's label and
a review that agrees with the judge (the same store functions as `cai audit override|review`).

Every POST checks, in order: the server has a write token (else 403, read-only), the form's
CSRF token matches this browser's session (else 403), the browser is logged in (else 403), and
only then the fields (400, shown beside the form; nothing is written). A login, after its CSRF
check, must also get past the throttle of failed logins (429 with Retry-After) before the token
is compared."""

from __future__ import annotations

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException

from cai.auth import BOOTSTRAP_ACTOR, Actor, Role
from cai.errors import BadInput, NotFound
from cai.web.common import accepts_logins, client, current_actor, render, set_session, transaction, web
from cai.web.security import SESSION_COOKIE, new_session_id, safe_next

router = APIRouter()

READ_ONLY = (
    "This server is read-only: it was started without CAI_WEB_TOKEN and the store holds no API "
    "token, so nobody can log in. Create one with `cai token create --name NAME --role annotator`, "
    "restart `cai web` with CAI_WEB_TOKEN set, or use `cai audit override`."
)
STALE_FORM = (
    "The form's security token is missing or does not match this browser's session "
    "(an old tab, or cookies blocked). Reload the page and submit again."
)
NOT_LOGGED_IN = "Log in with your token before recording overrides or reviews."
WRONG_TOKEN = "That token is unknown or revoked (neither CAI_WEB_TOKEN nor a `cai token create` token)."
THROTTLED = {
    "client": "Too many failed logins from your address. Wait {wait} and try again; the token "
    "was not checked this time.",
    "server": "Too many failed logins to this server from all addresses (someone may be guessing "
    "the token). Wait {wait} and try again; the token was not checked this time. "
    "`cai audit override` still works on the server.",
}


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> Response:
    return render(request, "login.html", section="login", next=safe_next(next), problems=[])


@router.post("/login")
def login(request: Request, token: str = Form(""), csrf: str = Form(""), next: str = Form("/")) -> Response:
    guard = web(request).guard
    if not accepts_logins(request):
        raise HTTPException(403, READ_ONLY)
    _check_csrf(request, csrf)
    # After the CSRF check: a forged cross-site POST must not use up the victim's attempts.
    attempt = web(request).throttle.attempt(client(request))
    if attempt.retry_after is not None:
        wait = f"{attempt.retry_after} second{'s' if attempt.retry_after != 1 else ''}"
        problems = [THROTTLED[attempt.scope].format(wait=wait)]
        page = render(request, "login.html", 429, section="login", next=safe_next(next), problems=problems)
        page.headers["Retry-After"] = str(attempt.retry_after)
        return page
    actor = _token_actor(request, token.strip())
    if actor is None:
        problems = [WRONG_TOKEN]
        return render(request, "login.html", 403, section="login", next=safe_next(next), problems=problems)
    web(request).throttle.succeeded(attempt)
    # A fresh session id on login: a session id known before logging in is worth nothing after.
    sid = new_session_id()
    response = RedirectResponse(safe_next(next), status_code=303)
    set_session(request, response, sid, guard.auth_value(sid, actor.name))
    return response


def _token_actor(request: Request, token: str) -> Actor | None:
    """The bootstrap admin for CAI_WEB_TOKEN, a named token's holder, or None."""
    from cai.store.tokens import authenticate

    if web(request).guard.token_matches(token):
        return Actor(BOOTSTRAP_ACTOR, Role.ADMIN)
    if not token:
        return None
    with transaction(request) as session:
        return authenticate(session, token)


@router.post("/logout")
def logout(request: Request, csrf: str = Form("")) -> Response:
    _check_csrf(request, csrf)
    response = RedirectResponse("/", status_code=303)
    set_session(request, response, new_session_id(), auth=None)
    return response


@router.post("/pairs/{pair_id}/override", response_class=HTMLResponse)
def override(
    request: Request,
    pair_id: int,
    prefer: str = Form(""),
    note: str = Form(""),
    author: str = Form(""),
    csrf: str = Form(""),
    next: str = Form(""),
) -> Response:
    from cai.store.audit import add_override

    actor = require_role(request, csrf, Role.ANNOTATOR)
    verdict = {"a": "A", "b": "B", "tie": "tie"}.get(prefer.strip().lower())
    problems = [] if verdict else [f"prefer: choose A, B or tie (got {prefer!r})"]
    if not note.strip():
        problems.append("note: must not be empty; say why you disagree with the judge")
    problems += _author_problems(actor, author)
    if not problems and verdict is not None:
        try:
            with transaction(request) as session:
                add_override(session, pair_id, verdict, _author(actor, author), note.strip())
        except NotFound:
            raise
        except BadInput as exc:  # e.g. no judge label yet; the transaction was rolled back
            problems = exc.problems
        else:
            return RedirectResponse(_after_decision(pair_id, next, "override"), status_code=303)
    form = {"action": "override", "prefer": prefer, "note": note, "author": author}
    return _pair_with_problems(request, pair_id, form, problems)


@router.post("/pairs/{pair_id}/review", response_class=HTMLResponse)
def review(
    request: Request,
    pair_id: int,
    note: str = Form(""),
    author: str = Form(""),
    csrf: str = Form(""),
    next: str = Form(""),
) -> Response:
    from cai.store.audit import add_review

    actor = require_role(request, csrf, Role.ANNOTATOR)
    problems = _author_problems(actor, author)
    if not problems:
        try:
            with transaction(request) as session:
                add_review(session, pair_id, _author(actor, author), note.strip())
        except NotFound:
            raise
        except BadInput as exc:
            problems = exc.problems
        else:
            return RedirectResponse(_after_decision(pair_id, next, "review"), status_code=303)
    form = {"action": "review", "note": note, "author": author}
    return _pair_with_problems(request, pair_id, form, problems)


def require_role(request: Request, csrf: str, role: Role) -> Actor:
    """The logged-in actor if it holds `role`; 403 for a read-only server, a stale form, no
    login, or a role below `role`, checked in that order."""
    if not accepts_logins(request):
        raise HTTPException(403, READ_ONLY)
    _check_csrf(request, csrf)
    actor = current_actor(request)
    if actor is None:
        raise HTTPException(403, NOT_LOGGED_IN)
    if not actor.role.allows(role):
        raise HTTPException(403, f"This needs the {role.label} role; {actor.name} is {actor.role.label}.")
    return actor


def _after_decision(pair_id: int, next: str, action: str) -> str:
    # From an annotator's queue the next pair follows; from a pair page, the pair with its audits.
    if next.startswith("/queue"):
        return safe_next(next)
    return f"/pairs/{pair_id}?done={action}#audits"


def _check_csrf(request: Request, csrf: str) -> None:
    # Compared against the cookie the browser sent, not a session id issued with this response.
    if not web(request).guard.csrf_ok(request.cookies.get(SESSION_COOKIE), csrf):
        raise HTTPException(403, STALE_FORM)


def _author(actor: Actor, author: str) -> str:
    """A named token's holder decides as themselves; the shared bootstrap token says who."""
    return author.strip() if actor.name == BOOTSTRAP_ACTOR else actor.name


def _author_problems(actor: Actor, author: str) -> list[str]:
    from cai.store.models import AuditRow

    if actor.name != BOOTSTRAP_ACTOR:
        return []
    limit = getattr(AuditRow.__table__.c.author.type, "length", None) or 200
    if not author.strip():
        return ["author: must not be empty; say who is deciding"]
    if len(author.strip()) > limit:
        return [f"author: at most {limit} characters"]
    return []


def _pair_with_problems(
    request: Request, pair_id: int, form: dict[str, str], problems: list[str]
) -> Response:
    from cai.store.audit import pair_detail

    with transaction(request) as session:
        detail = pair_detail(session, pair_id)  # an unknown pair is a 404 whatever the fields said
    return render(
        request, "pair.html", 400, section="pairs", d=detail, done=None, form=form, problems=problems
    )
