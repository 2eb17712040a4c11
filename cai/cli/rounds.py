"""`cai round`: start a labeling round and see where it stands."""

from __future__ import annotations

import typer

from cai.cli.app import JSON_OPTION, err, new_app, out, print_json, transaction, workspace
from cai.registry import EMBEDDED_MODEL

app = new_app("Start labeling rounds and show their status and counts.")


@app.command()
def start(
    ctx: typer.Context,
    constitution: str = typer.Option(
        ...,
        "--constitution",
        "-c",
        metavar="NAME@VERSION",
        help="A registered constitution.",
        show_default=False,
    ),
    policy: str = typer.Option(
        EMBEDDED_MODEL,
        "--policy",
        help="Policy to sample from: the embedded model, a local directory or a hub id.",
    ),
    tag: str = typer.Option(None, "--tag", help="Use only train prompts with this tag."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling and principle draws."),
    sl: bool = typer.Option(
        False,
        "--sl",
        help="A supervised (SL-CAI) round: critique-revision chains (cai revise), their SFT snapshot "
        "(cai export --kind sft) and SFT (cai sft). `cai loop` then runs the RL rounds from its model.",
    ),
) -> None:
    """Create a round over the train prompts. Prints the new round id on stdout (details on stderr),
    so `ROUND=$(cai round start -c NAME@1)` works in scripts."""
    from cai.stages.rounds import start_round

    started = start_round(workspace(ctx), constitution, policy, tag, seed, kind="sl" if sl else "rl")
    round_ = started.round
    err.print(
        f"{'SL ' if sl else ''}round {round_.id} started: {round_.constitution}, policy {round_.policy}, "
        f"{started.prompts} train prompts",
        highlight=False,
    )
    out.print(round_.id)


@app.command()
def show(
    ctx: typer.Context,
    round_id: int = typer.Argument(..., metavar="ID", show_default=False),
    as_json: bool = JSON_OPTION,
) -> None:
    """Status and counts: prompts, responses, pairs, judgments, labels, ties, failed."""
    from dataclasses import asdict

    from rich.box import SIMPLE
    from rich.markup import escape
    from rich.table import Table

    from cai.store import repo

    with transaction(ctx) as session:
        round_ = repo.get_round(session, round_id)
        counts = asdict(repo.round_counts(session, round_id))
        if round_.kind == "sl":
            from cai.store.chains import step_counts

            counts |= {f"revision steps {status}": n for status, n in step_counts(session, round_id).items()}
    if as_json:
        print_json({**asdict(round_), "counts": counts})
        return
    out.print(
        f"[bold]{'SL ' if round_.kind == 'sl' else ''}round {round_.id}[/bold]  status [cyan]{round_.status}[/cyan]  "
        f"constitution {round_.constitution}  policy {round_.policy}",
        highlight=False,
    )
    if round_.status == "failed":
        out.print(
            f"[red]failed[/red] in {round_.failed_step or 'an earlier version'}: {escape(round_.error or '')}\n"
            f"running that stage again resumes the round",
            highlight=False,
        )
    table = Table("count", "value", box=SIMPLE, show_header=False)
    for name, value in counts.items():
        table.add_row(name.replace("_", " "), str(value))
    out.print(table)


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """All rounds, newest last."""
    from dataclasses import asdict

    from rich.table import Table

    from cai.store import repo

    with transaction(ctx) as session:
        rounds = repo.list_rounds(session)
    if as_json:
        print_json([asdict(r) for r in rounds])
        return
    table = Table("id", "kind", "status", "constitution", "policy", "created")
    for r in rounds:
        table.add_row(str(r.id), r.kind, r.status, r.constitution, r.policy, f"{r.created_at:%Y-%m-%d %H:%M}")
    out.print(table)
