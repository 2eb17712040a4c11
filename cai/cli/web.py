"""`cai web`: serve the audit UI (rounds dashboard, pair browser, overrides, stats, constitution
diffs) from the store."""

from __future__ import annotations

import typer

from cai.cli.app import err, settings

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def web(
    ctx: typer.Context,
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to listen on; anything but loopback exposes the UI."
    ),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
) -> None:
    """Serve the web UI for auditing the judge.

    Pages: the rounds dashboard with the report's plots, a pair browser with the `cai audit list`
    filters, every pair with both responses and all rationales, judge stats per principle, and
    constitution versions with diffs. Read-only unless CAI_WEB_TOKEN is set (at least 16
    characters); then whoever logs in with that token can record overrides and reviews (the next
    export uses overrides). Failed logins are throttled per client address and server-wide."""
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
            f"[yellow]warning:[/yellow] listening on {host}: the UI is reachable from other machines "
            "over plain HTTP",
            highlight=False,
        )
    app = create_app(settings(ctx).database_url, token)
    mode = "overrides need a login with CAI_WEB_TOKEN" if token else "read-only (CAI_WEB_TOKEN is not set)"
    shown = f"[{host}]" if ":" in host else host
    err.print(f"cai web on http://{shown}:{port}/ — {mode}", highlight=False)
    # proxy_headers (uvicorn's default, spelled out): the client address the login throttle keys
    # on and the URL scheme come from X-Forwarded-For/-Proto only when the peer is a proxy listed
    # in FORWARDED_ALLOW_IPS (default: loopback); a remote client's own headers are ignored.
    uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=True)
