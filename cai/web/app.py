"""The web UI's application factory: middleware for the session cookie and security headers,
error pages for bad input, and the routers of cai.web.pages (reading) and cai.web.actions
(login and writes)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from cai.errors import BadInput, NotFound
from cai.web.common import HERE, Web, render, resolve_login, set_session
from cai.web.security import (
    SESSION_COOKIE,
    Guard,
    LoginThrottle,
    check_token,
    new_session_id,
    valid_session_id,
)

API_PREFIX = "/api/v1"
SECURITY_HEADERS = {
    # No script at all: even if some text slipped through unescaped, the browser would not run it.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def create_app(database_url: str, token: str | None = None, throttle: LoginThrottle | None = None) -> FastAPI:
    """The audit UI over the store at `database_url`. Without `token` it is read-only; with one
    (at least MIN_TOKEN_LENGTH characters, else BadInput), a browser that logs in with it may
    record overrides and reviews. `throttle` limits failed logins (default: LoginThrottle())."""
    from cai.api.app import create_api
    from cai.config import load_settings
    from cai.web import actions, pages, service
    from cai.workspace import Workspace

    token = token or None
    check_token(token)
    workspace = Workspace(load_settings(database_url=database_url))
    app = FastAPI(title="cai", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.web = Web(workspace, Guard(token), throttle or LoginThrottle())
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.mount(API_PREFIX, create_api(workspace, bootstrap_token=token))
    app.include_router(service.router)  # first: /rounds/new must not read as /rounds/{round_id}
    app.include_router(pages.router)
    app.include_router(actions.router)

    @app.middleware("http")
    async def session_and_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path.startswith(API_PREFIX + "/"):
            # Bearer tokens and JSON: no session cookie, and no page policy beyond these two.
            response = await call_next(request)
            for name in ("X-Content-Type-Options", "Cache-Control"):
                response.headers.setdefault(name, SECURITY_HEADERS[name])
            return response
        current = request.cookies.get(SESSION_COOKIE)
        fresh = not valid_session_id(current)
        request.state.session_id = new_session_id() if fresh else current
        request.state.session_set = False
        if not request.url.path.startswith("/static/"):
            await run_in_threadpool(resolve_login, request)
        response = await call_next(request)
        if fresh and not request.state.session_set:
            set_session(request, response, request.state.session_id, auth=None)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(BadInput, _bad_input)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    return app


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(request, 404, "Not found", [str(exc)])


async def _bad_input(request: Request, exc: Exception) -> Response:
    problems = exc.problems if isinstance(exc, BadInput) else [str(exc)]
    return _error(request, 400, "Bad request", problems)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else str(exc)
    titles = {403: "Forbidden", 404: "Not found", 405: "Method not allowed"}
    if status == 404 and detail == "Not Found":
        detail = f"There is no page at {request.url.path}."
    return _error(request, status, titles.get(status, "Error"), [str(detail)])


async def _invalid_request(request: Request, exc: Exception) -> Response:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    problems = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}" for e in errors]
    return _error(request, 400, "Bad request", problems or ["malformed request"])


def _error(request: Request, status: int, title: str, problems: list[str]) -> Response:
    # Pages rendered for errors still go through render(): the message may quote user input.
    return render(request, "error.html", status, title=title, code=status, problems=problems)
