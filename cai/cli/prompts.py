"""`cai prompts`: import prompt sets and browse them."""

from __future__ import annotations

from pathlib import Path

import typer

from cai.cli.app import JSON_OPTION, err, new_app, out, print_json, transaction
from cai.promptsets import MAX_PROMPT_CHARS

app = new_app("Import prompt sets (JSONL, CSV, Parquet) and list stored prompts.")


@app.command("import")
def import_(
    ctx: typer.Context,
    path: Path = typer.Argument(
        ...,
        help="A .jsonl, .csv or .parquet file with a `prompt` or a `messages` column.",
        show_default=False,
    ),
    split: str = typer.Option(
        None, "--split", help="train or eval for every row (default: the row's `split`, else train)."
    ),
    tags: list[str] = typer.Option([], "--tag", help="Tag every imported prompt (repeatable)."),
    max_chars: int = typer.Option(
        MAX_PROMPT_CHARS,
        "--max-prompt-chars",
        envvar="CAI_MAX_PROMPT_CHARS",
        min=1,
        help="Refuse a row whose turns add up to more characters than this.",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Import prompts in one transaction: any malformed row aborts the import, naming every bad
    row. Prompts are deduplicated by content hash, so re-importing a file adds nothing."""
    from dataclasses import asdict

    from cai.promptsets import read_prompt_file
    from cai.store import repo

    prompts = read_prompt_file(path, split=split, tags=tuple(tags), max_chars=max_chars)
    with transaction(ctx) as session:
        report = repo.import_prompts(session, prompts, source=path.name)
    if as_json:
        print_json(asdict(report))
        return
    out.print(
        f"{path}: read {report.read}, imported {report.imported} "
        f"(train {report.by_split['train']}, eval {report.by_split['eval']}), "
        f"already stored {report.already_stored}, duplicates in file {report.duplicates_in_file}",
        highlight=False,
    )
    for conflict in report.split_conflicts:
        err.print(f"[yellow]warning:[/yellow] {conflict}", highlight=False)


@app.command("list")
def list_(
    ctx: typer.Context,
    split: str = typer.Option(None, "--split", help="Only train or eval prompts."),
    tag: str = typer.Option(None, "--tag", help="Only prompts with this tag."),
    limit: int = typer.Option(50, "--limit", min=1, help="How many to show."),
    offset: int = typer.Option(0, "--offset", min=0, help="How many to skip."),
    as_json: bool = JSON_OPTION,
) -> None:
    """List stored prompts with their split and tags."""
    from dataclasses import asdict

    from rich.table import Table

    from cai.store import repo

    with transaction(ctx) as session:
        records, total = repo.list_prompts(session, split=split, tag=tag, limit=limit, offset=offset)
    if as_json:
        print_json({"total": total, "offset": offset, "prompts": [asdict(r) for r in records]})
        return
    table = Table("id", "split", "tags", "prompt", caption=f"{len(records)} of {total}")
    for r in records:
        shown = (
            r.text if r.text is not None else " / ".join(f"{m['role']}: {m['content']}" for m in r.messages)
        )
        table.add_row(str(r.id), r.split, ", ".join(r.tags), shown[:100] + ("…" if len(shown) > 100 else ""))
    out.print(table)
