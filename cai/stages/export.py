"""The export stage: a round's labels as a snapshot directory that TRL loads with no glue code,
with its dataset card, optionally pushed to the Hugging Face Hub."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cai.export import manifest_sha256, remove_stale_work_dirs, write_snapshot
from cai.hub import PushResult, hub_token, push, upload_plan
from cai.stages.progress import Progress, Silent
from cai.stages.settings import ExportSettings
from cai.stages.status import Event, Stage, advance, check_kind, failure_recorded
from cai.store import repo
from cai.store.snapshots import labelled_pairs, record_snapshot, round_provenance
from cai.workspace import Workspace


@dataclass(frozen=True)
class ExportResult:
    snapshot_id: int
    created: bool
    path: Path
    manifest_sha256: str
    manifest: dict[str, Any]
    hub: PushResult | None = None
    """Where --push-to-hub uploaded the snapshot."""


def default_snapshot_dir(round_id: int, artifacts: Path = Path(".")) -> Path:
    return artifacts / "snapshots" / f"round-{round_id}"


def run_export(
    ws: Workspace, round_id: int, settings: ExportSettings, progress: Progress | None = None
) -> ExportResult:
    """Write the snapshot (files first, manifest last) and record it; a judged round becomes
    `exported`. The same labels give the same files and the same snapshot row. With
    `push_to_hub`, the snapshot is then uploaded (a missing token is refused before any work)."""
    progress = progress or Silent()
    target = settings.out or default_snapshot_dir(round_id)
    token = hub_token() if settings.push_to_hub else None
    if settings.kind == "sft":
        result = _export_sft(ws, round_id, settings, target, progress)
    else:
        result = _export_dpo(ws, round_id, settings, target, progress)
    if settings.push_to_hub is None or token is None:
        return result
    plan = upload_plan(result.path, settings.push_to_hub, settings.private)
    progress.note(f"pushing {len(plan.files)} files to the Hub dataset {plan.repo_id}")
    return replace(result, hub=push(plan, token))


def _export_dpo(
    ws: Workspace, round_id: int, settings: ExportSettings, target: Path, progress: Progress
) -> ExportResult:
    """An RL round's labels as a preference snapshot; the round becomes `exported`."""
    with ws.session() as session:
        check_kind(repo.get_round(session, round_id).kind, Stage.EXPORT, round_id)
        pairs = labelled_pairs(session, round_id)
        provenance = round_provenance(session, round_id)
    with failure_recorded(ws, round_id, Stage.EXPORT):
        for leftover in remove_stale_work_dirs(target.parent):
            progress.note(f"removed {leftover}: left by an export that was killed")
        progress.task(f"round {round_id}: writing snapshot", len(pairs))
        manifest = write_snapshot(
            target, pairs, provenance, settings.filters(), settings.overwrite, settings.license
        )
        digest = manifest_sha256(target)
        progress.update(len(pairs), len(pairs))
        with ws.session() as session:
            snapshot_id, created = record_snapshot(
                session, round_id, str(target.resolve()), digest, manifest["counts"], manifest["filters"]
            )
            advance(session, round_id, Stage.EXPORT, Event.FINISH)
    return ExportResult(snapshot_id, created, target, digest, manifest)


def _export_sft(
    ws: Workspace, round_id: int, settings: ExportSettings, target: Path, progress: Progress
) -> ExportResult:
    """An SL round's chains as an SFT snapshot; the round becomes `exported`."""
    from cai.sft_export import write_sft_snapshot
    from cai.store import chains

    with ws.session() as session:
        check_kind(repo.get_round(session, round_id).kind, Stage.SFT_EXPORT, round_id)
        round_chains = chains.round_chains(session, round_id)
        revisers = chains.revisers(session, round_id)
        verdicts = {p.responses: p.verdict for p in labelled_pairs(session, round_id) if p.kind == "revision"}
        provenance = round_provenance(session, round_id)
    with failure_recorded(ws, round_id, Stage.SFT_EXPORT):
        for leftover in remove_stale_work_dirs(target.parent):
            progress.note(f"removed {leftover}: left by an export that was killed")
        progress.task(f"round {round_id}: writing SFT snapshot", len(round_chains))
        manifest = write_sft_snapshot(
            target,
            round_chains,
            provenance,
            settings.sft_filters(),
            revisers,
            verdicts,
            settings.overwrite,
            settings.license,
        )
        digest = manifest_sha256(target)
        progress.update(len(round_chains), len(round_chains))
        with ws.session() as session:
            snapshot_id, created = record_snapshot(
                session, round_id, str(target.resolve()), digest, manifest["counts"], manifest["filters"]
            )
            advance(session, round_id, Stage.SFT_EXPORT, Event.FINISH)
    return ExportResult(snapshot_id, created, target, digest, manifest)
