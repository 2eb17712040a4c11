"""`cai constitution`: validate, register, list, show and diff versioned constitutions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cai.cli.app import JSON_OPTION, err, new_app, out, print_json, transaction

if TYPE_CHECKING:
    from cai.store.repo import ConstitutionRecord

app = new_app("Validate, register and inspect versioned constitutions (constitutions/<name>/v<N>.yaml).")


@app.command()
def validate(
    paths: list[Path] = typer.Argument(..., help="Constitution YAML files.", show_default=False),
) -> None:
    """Check files without touching the database; exit 2 listing every `file:line: field: message`."""
    from cai.constitution import validate_files
    from cai.errors import BadInput

    problems = validate_files(paths)
    if problems:
        raise BadInput(f"{len(problems)} problem(s)", problems)
    for path in paths:
        out.print(f"[green]ok[/green] {path}", highlight=False)


@app.command()
def register(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="A constitution YAML file.", show_default=False),
) -> None:
    """Store a constitution version. Re-registering identical content is a no-op; the same
    name and version with different content is refused (bump the version)."""
    from cai.constitution import load_constitution
    from cai.store import repo

    loaded = load_constitution(path)
    with transaction(ctx) as session:
        record, created = repo.register_constitution(session, loaded)
    verb = "registered" if created else "already registered (identical content)"
    out.print(
        f"{record.ref} {verb}: {record.principles} principles, sha256 {record.sha256[:12]}", highlight=False
    )


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """List registered constitutions and versions."""
    from rich.table import Table

    from cai.store import repo

    with transaction(ctx) as session:
        records = repo.list_constitutions(session)
    if as_json:
        print_json([_record_json(r) for r in records])
        return
    if not records:
        err.print("no constitutions registered yet: cai constitution register FILE")
        return
    table = Table("name", "version", "principles", "sha256", "registered", "description")
    for r in records:
        table.add_row(
            r.name,
            str(r.version),
            str(r.principles),
            r.sha256[:12],
            f"{r.created_at:%Y-%m-%d %H:%M}",
            r.description[:60] + ("…" if len(r.description) > 60 else ""),
        )
    out.print(table)


@app.command()
def show(
    ctx: typer.Context,
    ref: str = typer.Argument(..., metavar="NAME[@VERSION]", help="Latest version when none is given."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Print a stored constitution as it was registered."""
    from cai.constitution import parse_ref
    from cai.store import repo

    name, version = parse_ref(ref)
    with transaction(ctx) as session:
        stored = repo.get_constitution(session, name, version)
    if as_json:
        print_json({**_record_json(stored.record), "body": stored.constitution.model_dump(mode="json")})
        return
    record = stored.record
    err.print(f"# {record.ref}  sha256 {record.sha256}  from {record.source_path}", style="dim")
    sys.stdout.write(stored.source_text)  # verbatim: rich would re-wrap long lines


@app.command()
def diff(
    ctx: typer.Context,
    old: str = typer.Argument(..., metavar="NAME@A", show_default=False),
    new: str = typer.Argument(..., metavar="NAME@B", show_default=False),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show which principles were added, removed or changed, then a unified diff."""
    from cai.constitution import diff_summary, diff_text, parse_ref
    from cai.store import repo

    with transaction(ctx) as session:
        a = repo.get_constitution(session, *parse_ref(old)).constitution
        b = repo.get_constitution(session, *parse_ref(new)).constitution
    summary, text = diff_summary(a, b), diff_text(a, b)
    if as_json:
        print_json({"from": a.ref, "to": b.ref, **summary, "diff": text})
        return
    for key, colour in (("added", "green"), ("removed", "red"), ("changed", "yellow")):
        if summary[key]:
            out.print(f"[{colour}]{key}:[/{colour}] {', '.join(summary[key])}", highlight=False)
    if not text:
        out.print(f"{a.ref} and {b.ref} have identical content")
        return
    for line in text.splitlines():
        style = "green" if line.startswith("+") else "red" if line.startswith("-") else None
        out.print(line, style=style, markup=False, highlight=False)


def _record_json(record: ConstitutionRecord) -> dict[str, object]:
    from dataclasses import asdict

    return {**asdict(record), "ref": record.ref}
