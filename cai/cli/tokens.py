"""`cai token`: named bearer tokens with roles, for the API and the web UI."""

from __future__ import annotations

import typer

from cai.cli.app import JSON_OPTION, err, new_app, out, print_json, transaction

app = new_app(
    "Create, list and revoke API tokens. Roles, each including the ones before it: viewer (reads), "
    "annotator (overrides and reviews labels), operator (constitutions, prompts, jobs), admin (tokens)."
)


@app.command()
def create(
    ctx: typer.Context,
    name: str = typer.Option(..., "--name", help="Who or what holds the token; writes record it."),
    role: str = typer.Option(..., "--role", help="viewer, annotator, operator or admin."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a token and print it once: only its SHA-256 is stored, so it cannot be shown again
    (revoke it and create another if it is lost)."""
    from cai.auth import Role
    from cai.store import tokens

    parsed = Role.parse(role, "--role")
    with transaction(ctx) as session:
        token = tokens.create(session, name, parsed, created_by="cli")
    if as_json:
        print_json({"name": name, "role": parsed.label, "token": token})
        return
    out.print(token, highlight=False, soft_wrap=True)
    err.print(
        f"token for {name} ({parsed.label}): shown once; send it as `Authorization: Bearer <token>`",
        highlight=False,
    )


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Every token's name, role, and when it was created, last used and revoked (never the token)."""
    from dataclasses import asdict

    from rich.table import Table

    from cai.store import tokens

    with transaction(ctx) as session:
        infos = tokens.list_tokens(session)
    if as_json:
        print_json([asdict(info) for info in infos])
        return
    table = Table("name", "role", "created", "last used", "revoked")
    for info in infos:
        table.add_row(
            info.name,
            info.role,
            f"{info.created_at:%Y-%m-%d %H:%M}",
            f"{info.last_used_at:%Y-%m-%d %H:%M}" if info.last_used_at else "-",
            f"{info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else "-",
        )
    out.print(table)


@app.command()
def revoke(ctx: typer.Context, name: str = typer.Argument(..., help="The token's name.")) -> None:
    """Revoke a token: requests with it get 401 from then on. The name stays taken, for the record."""
    from cai.errors import BadInput
    from cai.store import tokens

    with transaction(ctx) as session:
        if not tokens.revoke(session, name):
            raise BadInput(f"{name}: no token of that name, or it is revoked already")
    out.print(f"revoked {name}", highlight=False)
