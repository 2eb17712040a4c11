"""`cai db`: schema migrations."""

from __future__ import annotations

import typer

from cai.cli.app import DATABASE_SOURCE, JSON_OPTION, new_app, out, print_json, settings

app = new_app("Create or upgrade the database schema (alembic migrations).")


@app.command()
def upgrade(ctx: typer.Context, revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Upgrade the schema (every other command also does this on first use)."""
    from cai.store.db import current_revision, make_engine
    from cai.store.db import upgrade as run_upgrade

    store = make_engine(settings(ctx).database_url, DATABASE_SOURCE)
    before = current_revision(store)
    run_upgrade(store, revision)
    after = current_revision(store)
    where = store.url.render_as_string()
    if before == after:
        out.print(f"{where}: already at {after}")
    else:
        out.print(f"{where}: upgraded {before or 'empty'} -> {after}")


@app.command()
def current(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Show the database's schema revision and the newest one this cai knows."""
    from cai.store.db import current_revision, head_revision, make_engine

    store = make_engine(settings(ctx).database_url, DATABASE_SOURCE)
    info = {
        "database": store.url.render_as_string(),
        "current": current_revision(store),
        "head": head_revision(store),
    }
    if as_json:
        print_json(info)
        return
    state = "up to date" if info["current"] == info["head"] else "needs `cai db upgrade`"
    out.print(f"{info['database']}: revision {info['current'] or 'none'} (head {info['head']}, {state})")
