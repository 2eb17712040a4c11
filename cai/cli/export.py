"""`cai export`: a round's labels as a snapshot that TRL loads with no glue code."""

from __future__ import annotations

from pathlib import Path

import typer

from cai.cli.app import JSON_OPTION, out, print_json, transaction


def export(
    ctx: typer.Context,
    round_id: int = typer.Option(..., "--round", "-r", metavar="ID", show_default=False),
    out_dir: Path = typer.Option(None, "--out", help="Snapshot directory (default: snapshots/round-ID)."),
    min_confidence: float = typer.Option(
        None, "--min-confidence", min=0.0, max=1.0, help="Drop judge labels less sure than this."
    ),
    principle: str = typer.Option(None, "--principle", help="Only pairs judged under this principle id."),
    eval_fraction: float = typer.Option(
        0.1, "--eval-fraction", min=0.0, max=0.9, help="Share of prompts held out."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompt-level train/eval split."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a different snapshot already at --out."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Write data/train-*.parquet and data/eval-*.parquet (prompt, chosen, rejected as chat
    messages, plus provenance) and manifest.json, last. Ties are left out; human overrides
    replace judge labels; revision pairs are kept only where the revision won. Load it with
    `datasets.load_dataset(DIR)` or `trl dpo --dataset_name DIR`."""
    from cai.export import ExportFilters, manifest_sha256, write_snapshot
    from cai.store import repo
    from cai.store.snapshots import labelled_pairs, record_snapshot, round_provenance

    target = out_dir or Path("snapshots") / f"round-{round_id}"
    filters = ExportFilters(min_confidence, principle, eval_fraction, seed)
    with transaction(ctx) as session:
        repo.get_round(session, round_id)  # a clear error for an unknown round
        pairs = labelled_pairs(session, round_id)
        provenance = round_provenance(session, round_id)
    manifest = write_snapshot(target, pairs, provenance, filters, overwrite)
    digest = manifest_sha256(target)
    with transaction(ctx) as session:
        snapshot_id, created = record_snapshot(
            session, round_id, str(target.resolve()), digest, manifest["counts"], manifest["filters"]
        )
    if as_json:
        print_json({"snapshot": snapshot_id, "path": str(target), "manifest_sha256": digest, **manifest})
        return
    counts = manifest["counts"]
    dropped = ", ".join(f"{k} {v}" for k, v in counts["dropped"].items() if v) or "none"
    sources = ", ".join(f"{k} {v}" for k, v in counts["by_source"].items())
    out.print(
        f"snapshot {snapshot_id}{'' if created else ' (unchanged)'} at {target}: train {counts['train']}, "
        f"eval {counts['eval']} (labels from {sources}; dropped: {dropped}); manifest sha256 {digest[:12]}",
        highlight=False,
    )
