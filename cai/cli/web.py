"""`cai web` and `cai serve`: the web UI and the REST API (/api/v1) from one process; `serve` also
runs a worker in that process when the store is SQLite, so one command is a whole service."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import typer

from cai.cli.app import err, settings, workspace

if TYPE_CHECKING:
    from cai.worker import Worker
    from cai.workspace import Workspace

LOOPBACK = ("127.0.0.1", "localhost", "::1")
HOST_OPTION = typer.Option(
    "127.0.0.1", "--host", help="Interface to listen on; anything but loopback exposes the server."
)
PORT_OPTION = typer.Option(8000, "--port", min=1, max=65535, help="TCP port.")


def web(ctx: typer.Context, host: str = HOST_OPTION, port: int = PORT_OPTION) -> None:
    """Serve the web UI for auditing the judge, and the REST API under /api/v1.

    Pages: the rounds dashboard with the report's plots, a pair browser with the `cai audit list`
    filters, every pair with both responses and all rationales, judge stats per principle, and
    constitution versions with diffs. Read-only unless CAI_WEB_TOKEN is set (at least 16
    characters); then whoever logs in with that token can record overrides and reviews (the next
    export uses overrides). The API takes tokens from `cai token create` (CAI_WEB_TOKEN acts as an
    admin one). Failed logins are throttled per client address and server-wide."""
    _serve(ctx, host, port, with_worker=False)


def serve(
    ctx: typer.Context,
    host: str = HOST_OPTION,
    port: int = PORT_OPTION,
    worker: bool = typer.Option(
        None,
        "--worker/--no-worker",
        help="Run jobs in this process too. Default: yes on SQLite (one writer, one machine), no on "
        "PostgreSQL, where `cai worker` processes run them.",
        show_default=False,
    ),
) -> None:
    """Serve the web UI and the REST API (/api/v1, schema at /api/v1/openapi.json), and on SQLite
    run every kind of job in this process: one command, a working service on one machine."""
    _serve(ctx, host, port, with_worker=worker)


def _serve(ctx: typer.Context, host: str, port: int, with_worker: bool | None) -> None:
    import os

    from cai.errors import BadInput
    from cai.web.security import check_token

    token = os.environ.get("CAI_WEB_TOKEN") or None
    check_token(token)  # before anything listens: a short token is exit 2, never a warning
    try:
        import uvicorn

        from cai.web.app import create_app
    except ModuleNotFoundError as exc:
        raise BadInput(
            f"cai web needs the `web` extra ({exc.name} is missing): pip install 'cai[web]'"
        ) from None
    if host not in LOOPBACK:
        err.print(
            f"[yellow]warning:[/yellow] listening on {host}: the server is reachable from other machines "
            "over plain HTTP",
            highlight=False,
        )
    app = create_app(settings(ctx).database_url, token)
    ws = workspace(ctx)
    if with_worker is None:
        with_worker = ws.engine.dialect.name == "sqlite"
    mode = "overrides need a login with CAI_WEB_TOKEN" if token else "read-only (CAI_WEB_TOKEN is not set)"
    shown = f"[{host}]" if ":" in host else host
    err.print(f"cai on http://{shown}:{port}/ (API: /api/v1) — web UI {mode}", highlight=False)
    running = _start_worker(ws) if with_worker else None
    if running is None and ctx.command.name == "serve":
        err.print("jobs: run `cai worker` processes against this database", highlight=False)
    try:
        # proxy_headers (uvicorn's default, spelled out): the client address the login throttle
        # keys on and the URL scheme come from X-Forwarded-For/-Proto only when the peer is a
        # proxy listed in FORWARDED_ALLOW_IPS (default: loopback); a remote client's are ignored.
        uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=True)
    finally:
        if running is not None:
            worker, thread = running
            worker.shutdown.set()  # finishes the current batch and hands the job back
            thread.join()


def _start_worker(ws: Workspace) -> tuple[Worker, threading.Thread]:
    from cai.cli.app import quiet_libraries
    from cai.store.models import JOB_KINDS
    from cai.worker import Worker, WorkerOptions

    quiet_libraries()
    worker = Worker(
        ws,
        WorkerOptions(kinds=JOB_KINDS, join=False),
        say=lambda line: err.print(line, highlight=False, markup=False),
    )
    thread = threading.Thread(target=worker.run, name="cai-worker", daemon=True)
    thread.start()
    return worker, thread
