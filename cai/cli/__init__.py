"""`cai` command line: one sub-app per stage, each command a thin call into that stage."""

from __future__ import annotations

import typer

from cai.cli import (
    audit,
    constitution,
    db,
    demo,
    evaluate,
    export,
    jobs,
    labeling,
    loop,
    prompts,
    report,
    rounds,
    sl,
    templates,
    tokens,
    train,
    web,
)
from cai.cli.app import DATABASE_SOURCE, new_app

app = new_app(
    "Turn a written constitution into preference data and an aligned model (RLAIF with DPO).\n\n"
    "Typical start: [bold]cai constitution register[/bold] FILE, [bold]cai prompts import[/bold] FILE, "
    "[bold]cai round start[/bold] --constitution NAME@VERSION."
)
app.add_typer(db.app, name="db")
app.add_typer(constitution.app, name="constitution")
app.add_typer(prompts.app, name="prompts")
app.add_typer(rounds.app, name="round")
app.add_typer(templates.app, name="templates")
app.command("generate")(labeling.generate)
app.add_typer(labeling.judge_app, name="judge")
app.command("revise")(sl.revise)
app.command("export")(export.export)
app.command("train")(train.train)
app.command("sft")(sl.sft)
app.command("eval")(evaluate.evaluate)
app.command("loop")(loop.loop)
app.command("demo")(demo.demo)
app.add_typer(audit.app, name="audit")
app.command("report")(report.report)
app.command("web")(web.web)
app.command("serve")(web.serve)
app.add_typer(jobs.app, name="jobs")
app.add_typer(tokens.app, name="token")
app.command("worker")(jobs.worker)


@app.callback()
def root(
    ctx: typer.Context,
    db_url: str = typer.Option(
        None,
        "--db",
        envvar="CAI_DATABASE_URL",
        metavar="URL",
        help="Database URL (default sqlite:///cai.db). PostgreSQL: postgresql+psycopg://user@host/db",
        show_default=False,
    ),
) -> None:
    from cai.config import load_settings
    from cai.workspace import Workspace

    ctx.obj = Workspace(load_settings(database_url=db_url), database_source=DATABASE_SOURCE)


def main() -> None:
    app()
