"""`cai export`: a thin adapter over the export stage (cai.stages.export)."""

from __future__ import annotations

import typer

from cai.cli.app import JSON_OPTION, RichProgress, out, print_json, workspace
from cai.cli.flags import Flags, with_settings
from cai.cli.jobs import SUBMIT_OPTION, submit
from cai.stages.settings import ExportSettings


@with_settings(settings=Flags(ExportSettings))
def export(
    ctx: typer.Context,
    round_id: int = typer.Option(..., "--round", "-r", metavar="ID", show_default=False),
    *,
    settings: ExportSettings,
    submit_job: bool = SUBMIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Write data/train-*.parquet and data/eval-*.parquet (prompt, chosen, rejected as chat
    messages, plus provenance) and manifest.json, last. Ties and pairs of two identical texts
    are left out; a prompt with the same two texts (in either order) is exported once; human
    overrides replace judge labels; revision pairs are kept only where the revision won. Load it
    with `datasets.load_dataset(DIR)` or `trl dpo --dataset_name DIR`.

    With --kind sft (an SL round): one row per revision chain, `messages` = the prompt's turns and
    the chain's final revision, with the first answer and every step as provenance; for `cai sft`
    or `trl sft --dataset_name DIR`.

    Every snapshot carries a dataset card, README.md (constitution and principles, judges and
    their calibration, label sources, counts, policy lineage; --license). --push-to-hub REPO
    then uploads data, card and manifest to a Hub dataset repository in one commit."""
    if submit_job:
        submit(ctx, "export", round_id, settings)
        return
    from cai.stages.export import run_export

    with RichProgress() as progress:
        result = run_export(workspace(ctx), round_id, settings, progress)
    digest = result.manifest_sha256
    if as_json:
        print_json(
            {
                "snapshot": result.snapshot_id,
                "path": str(result.path),
                "manifest_sha256": digest,
                **result.manifest,
                **(
                    {"hub": {"repo_url": result.hub.repo_url, "commit_url": result.hub.commit_url}}
                    if result.hub
                    else {}
                ),
            }
        )
        return
    counts = result.manifest["counts"]
    dropped = ", ".join(f"{k} {v}" for k, v in counts["dropped"].items() if v) or "none"
    if settings.kind == "sft":
        lengths = ", ".join(f"{k}: {v}" for k, v in counts["by_chain_length"].items())
        out.print(
            f"SFT snapshot {result.snapshot_id}{'' if result.created else ' (unchanged)'} at {result.path}: "
            f"train {counts['train']}, eval {counts['eval']} (chains by length {lengths}; dropped: {dropped}); "
            f"manifest sha256 {digest[:12]}",
            highlight=False,
        )
    else:
        sources = ", ".join(f"{k} {v}" for k, v in counts["by_source"].items())
        out.print(
            f"snapshot {result.snapshot_id}{'' if result.created else ' (unchanged)'} at {result.path}: "
            f"train {counts['train']}, "
            f"eval {counts['eval']} (labels from {sources}; dropped: {dropped}); manifest sha256 {digest[:12]}",
            highlight=False,
        )
    if result.hub is not None:
        out.print(f"pushed to {result.hub.repo_url} ({result.hub.commit_url})", highlight=False)
