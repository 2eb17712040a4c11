"""`cai templates`: check judge / critique / revision templates before a round uses them."""

from __future__ import annotations

from pathlib import Path

import typer

from cai.cli.app import new_app, out

app = new_app("Check the jinja2 templates the judge renders (prompts/*.jinja).")


@app.command()
def check(
    directory: Path = typer.Argument(
        None, help="Templates directory (default: CAI_TEMPLATES_DIR, else the shipped prompts/)."
    ),
) -> None:
    """Render every required template with sample values; exit 2 naming the file and line of any
    undefined variable, syntax error or construct the sandbox refuses."""
    import os

    from cai.errors import BadInput
    from cai.templates import REQUIRED, TemplateSet

    templates = TemplateSet(directory or os.environ.get("CAI_TEMPLATES_DIR"))
    problems = templates.check()
    if problems:
        raise BadInput(f"{len(problems)} template problem(s)", problems)
    for name in REQUIRED:
        out.print(f"[green]ok[/green] {templates.directory / name}.jinja  {templates.sha256[name][:12]}")
