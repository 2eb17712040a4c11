"""`cai report`: an HTML page with PNG plots of how the rounds went."""

from __future__ import annotations

from pathlib import Path

import typer

from cai.cli.app import JSON_OPTION, out, print_json, transaction


def report(
    ctx: typer.Context,
    round_id: int = typer.Option(
        None, "--round", "-r", metavar="ID", help="Only this round; plots still show the rounds before it."
    ),
    out_dir: Path = typer.Option(
        ..., "--out", help="Directory for index.html and the plots.", show_default=False
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Write index.html plus PNG plots: win rate against the previous policy, DPO reward accuracy
    and margin, flip and tie rate per principle, response length and rule pass rates by round.
    Stages a round has not reached yet are noted on the page."""
    from cai.report import write_report
    from cai.store.reporting import gather_report

    with transaction(ctx) as session:
        data = gather_report(session, round_id)  # an unknown round fails here, before any file
    files = write_report(data, out_dir)
    if as_json:
        print_json(
            {"index": str(files[0]), "files": [str(f) for f in files], "rounds": [r.id for r in data.shown]}
        )
        return
    plots = ", ".join(f.name for f in files[1:]) or "none (no data yet)"
    out.print(f"report for {len(data.shown)} round(s) at {files[0]}; plots: {plots}", highlight=False)
