"""`cai export`: a round's labels as a snapshot that TRL loads with no glue code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cai.cli.app import JSON_OPTION, out, print_json, transaction

if TYPE_CHECKING:
    from cai.export import ExportFilters


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
    from cai.export import ExportFilters

    filters = ExportFilters(min_confidence, principle, eval_fraction, seed)
    result = run_export(ctx, round_id, out_dir, filters, overwrite)
    digest = result.manifest_sha256
    if as_json:
        print_json(
            {
                "snapshot": result.snapshot_id,
                "path": str(result.path),
                "manifest_sha256": digest,
                **result.manifest,
            }
        )
        return
    counts = result.manifest["counts"]
    dropped = ", ".join(f"{k} {v}" for k, v in counts["dropped"].items() if v) or "none"
    sources = ", ".join(f"{k} {v}" for k, v in counts["by_source"].items())
    out.print(
        f"snapshot {result.snapshot_id}{'' if result.created else ' (unchanged)'} at {result.path}: "
        f"train {counts['train']}, "
        f"eval {counts['eval']} (labels from {sources}; dropped: {dropped}); manifest sha256 {digest[:12]}",
        highlight=False,
    )


@dataclass(frozen=True)
class ExportResult:
    snapshot_id: int
    created: bool
    path: Path
    manifest_sha256: str
    manifest: dict[str, Any]


def run_export(
    ctx: typer.Context,
    round_id: int,
    out_dir: Path | None,
    filters: ExportFilters,
    overwrite: bool = False,
) -> ExportResult:
    """The `cai export` stage, shared with `cai loop`."""
    from cai.export import manifest_sha256, write_snapshot
    from cai.store import repo, work
    from cai.store.snapshots import labelled_pairs, record_snapshot, round_provenance

    target = out_dir or Path("snapshots") / f"round-{round_id}"
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
        if repo.get_round(session, round_id).status == "judged":
            work.set_round_status(session, round_id, "exported")
    return ExportResult(snapshot_id, created, target, digest, manifest)
