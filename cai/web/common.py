"""What every route shares: the app's state (engine, guard, templates, plot cache), one
transaction per request, and rendering a page with the login and CSRF state filled in."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from cai.auth import BOOTSTRAP_ACTOR, Actor, Role
from cai.web.security import AUTH_COOKIE, SESSION_COOKIE, Guard, LoginThrottle, client_key

if TYPE_CHECKING:
    from cai.store.reporting import ReportData
    from cai.workspace import Workspace

HERE = Path(__file__).resolve().parent
PLOT_CACHE_SIZE = 8


def template_env() -> Environment:
    # Autoescape is on for every template, whatever its name: responses, rationales, notes and
    # principle names are all user-controlled text, and none of it is ever marked safe.
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = lambda v: "—" if v is None else f"{v:.0%}"
    env.filters["num"] = lambda v, digits=2: "—" if v is None else f"{v:.{digits}f}"
    env.filters["when"] = lambda v: "—" if v is None else f"{v:%Y-%m-%d %H:%M}"
    return env


@dataclass
class Web:
    workspace: Workspace
    guard: Guard
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    env: Environment = field(default_factory=template_env)
    _plots: OrderedDict[str, dict[str, bytes]] = field(default_factory=OrderedDict)
    _plots_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def engine(self) -> Engine:
        return self.workspace.engine

    def plots(self, data: ReportData) -> dict[str, bytes]:
        """The report's PNG plots for `data`. The dashboard and its <img> requests ask for the
        same data within moments, so drawing once per distinct data saves a matplotlib render
        per image."""
        from cai.report import render_plots

        key = hashlib.sha256(repr(data).encode()).hexdigest()
        with self._plots_lock:
            if key in self._plots:
                self._plots.move_to_end(key)
                return self._plots[key]
        drawn = render_plots(data)
        with self._plots_lock:
            self._plots[key] = drawn
            while len(self._plots) > PLOT_CACHE_SIZE:
                self._plots.popitem(last=False)
        return drawn


def web(request: Request) -> Web:
    state: Web = request.app.state.web
    return state


@contextmanager
def transaction(request: Request) -> Iterator[Session]:
    """One transaction per request: an error anywhere rolls back every write."""
    from cai.store.db import session_scope

    with session_scope(web(request).engine) as session:
        yield session


def session_id(request: Request) -> str:
    """The browser's session id (the middleware issues one to a browser that has none)."""
    sid: str = request.state.session_id
    return sid


def client(request: Request) -> str:
    """The login throttle's bucket for this request's client.

    The address is the TCP peer as the ASGI server reports it. The app never reads
    X-Forwarded-For itself: any client can send that header and would pick its own bucket.
    Behind a reverse proxy, uvicorn (as `cai web` runs it) already replaces the peer with the
    forwarded address, but only for proxies listed in FORWARDED_ALLOW_IPS (default: loopback)."""
    return client_key(request.client.host if request.client else None)


def over_https(request: Request) -> bool:
    """Whether the browser reached us over HTTPS, directly or through a TLS-terminating proxy.

    X-Forwarded-Proto is believed from anyone, unlike X-Forwarded-For: all it can do is add the
    Secure flag to the cookies sent back to the same client, which a forger can only use to break
    its own session. Its first entry is the scheme the outermost proxy saw."""
    if request.url.scheme == "https":
        return True
    forwarded = request.headers.get("x-forwarded-proto", "")
    return forwarded.split(",")[0].strip().lower() == "https"


def resolve_login(request: Request) -> None:
    """Look up, once and before the page's own transaction opens (SQLite takes its write lock
    at BEGIN, so a second transaction inside the first would wait on itself), who this browser
    is logged in as and whether a login could succeed at all. The middleware calls it."""
    state = web(request)
    name = state.guard.logged_in_as(request.cookies.get(SESSION_COOKIE), request.cookies.get(AUTH_COOKIE))
    actor, accepts = None, bool(state.guard.token)
    if name == BOOTSTRAP_ACTOR:
        actor = Actor(name, Role.ADMIN) if state.guard.token else None
    if (name is not None and name != BOOTSTRAP_ACTOR) or not accepts:
        from cai.store.tokens import active_actor, any_active

        with transaction(request) as session:
            if name is not None and name != BOOTSTRAP_ACTOR:
                # Checked on every request, so revoking a token logs its browsers out.
                actor = active_actor(session, name)
            accepts = accepts or any_active(session)
    request.state.actor, request.state.accepts_logins = actor, accepts


def current_actor(request: Request) -> Actor | None:
    """Who this browser is logged in as: the bootstrap admin, or a named token's holder while
    that token is not revoked."""
    if not hasattr(request.state, "actor"):
        resolve_login(request)
    actor: Actor | None = request.state.actor
    return actor


def logged_in(request: Request) -> bool:
    return current_actor(request) is not None


def accepts_logins(request: Request) -> bool:
    """A login can succeed: the server has a bootstrap token, or the store an active named one."""
    if not hasattr(request.state, "accepts_logins"):
        resolve_login(request)
    accepts: bool = request.state.accepts_logins
    return accepts


def render(
    request: Request, template: str, status: int = 200, section: str = "", **context: Any
) -> HTMLResponse:
    guard = web(request).guard
    actor = current_actor(request)
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET":
        # Where "log in" should come back to: the page a form was posted from, never the
        # POST-only action itself (/pairs/7/override -> /pairs/7, /login -> /).
        here = request.url.path.rsplit("/", 1)[0] or "/"
    page = (
        web(request)
        .env.get_template(template)
        .render(
            section=section,
            here=here,
            writable=accepts_logins(request),
            logged_in=actor is not None,
            actor=actor,
            can_annotate=actor is not None and actor.role.allows(Role.ANNOTATOR),
            can_operate=actor is not None and actor.role.allows(Role.OPERATOR),
            bootstrap_actor=BOOTSTRAP_ACTOR,
            csrf=guard.csrf_token(session_id(request)),
            **context,
        )
    )
    return HTMLResponse(page, status_code=status)


def set_session(request: Request, response: Response, sid: str, auth: str | None) -> None:
    """Replace the session cookie (and set or clear the login cookie) on `response`."""
    secure = over_https(request)
    request.state.session_id = sid
    request.state.session_set = True  # the middleware must not overwrite it
    response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict", secure=secure, path="/")
    if auth is None:
        response.delete_cookie(AUTH_COOKIE, httponly=True, samesite="strict", secure=secure, path="/")
    else:
        response.set_cookie(AUTH_COOKIE, auth, httponly=True, samesite="strict", secure=secure, path="/")
