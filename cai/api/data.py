"""/api/v1 resources over the data a round works on and makes: prompts (import, list), policies
with their lineage, constitution diffs, and snapshots (list, manifest, files)."""

from __future__ import annotations

import re
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Body, Depends, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel

from cai.api.auth import requires
from cai.api.params import MAX_ID, RowId
from cai.api.resources import workspace
from cai.auth import Actor, Role
from cai.errors import BadInput, NotFound
from cai.store.actions import record
from cai.store.repo import PolicyLineage
from cai.workspace import Workspace

router = APIRouter()
MAX_PROMPT_FILE_BYTES = 64 * 1024 * 1024
SAFE_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Prompt(BaseModel):
    id: int
    sha256: str
    split: str
    tags: list[str]
    messages: list[dict[str, Any]] | None
    text: str | None
    source: str | None


class PromptPage(BaseModel):
    items: list[Prompt]
    total: int
    next_cursor: int | None


class PromptImport(BaseModel):
    read: int
    imported: int
    already_stored: int
    duplicates_in_file: int
    by_split: dict[str, int]
    split_conflicts: list[str]


@router.get("/prompts", response_model=PromptPage, summary="Stored prompts, in id order")
def list_prompts(
    split: Literal["train", "eval"] | None = None,
    tag: str | None = Query(None, max_length=200),
    limit: int = Query(50, ge=1, le=500),
    cursor: int | None = Query(None, ge=0, le=MAX_ID, description="next_cursor of the page before"),
    ws: Workspace = Depends(workspace),
    actor: Actor = Depends(requires(Role.VIEWER)),
) -> PromptPage:
    from dataclasses import asdict

    from cai.store import repo

    with ws.session() as session:
        found, total = repo.list_prompts(session, split=split, tag=tag, limit=limit + 1, after=cursor)
    page = found[:limit]
    return PromptPage(
        items=[Prompt(**asdict(p)) for p in page],
        total=total,
        next_cursor=page[-1].id if len(found) > limit else None,
    )


@router.post("/prompts", response_model=PromptImport, status_code=201, summary="Import a prompt file")
def import_prompts(
    content: bytes = Body(b"", media_type="application/octet-stream", description="The file, as on disk."),
    filename: str = Query(..., description="Its name: the suffix (.jsonl, .csv, .parquet) picks the reader."),
    split: Literal["train", "eval"] | None = Query(None, description="For every row (default: the row's)."),
    tag: list[str] = Query([], description="Tags for every imported prompt."),
    ws: Workspace = Depends(workspace),
    actor: Actor = Depends(requires(Role.OPERATOR)),
) -> PromptImport:
    """All rows or none: any bad row refuses the file, naming every bad row by line."""
    from dataclasses import asdict

    from cai.promptsets import read_prompt_file
    from cai.store import repo

    if not SAFE_FILENAME.fullmatch(filename):
        raise BadInput(f"filename: {filename!r} is not a plain file name (letters, digits, . _ -)")
    if len(content) > MAX_PROMPT_FILE_BYTES:
        raise BadInput(f"{filename}: over {MAX_PROMPT_FILE_BYTES // 2**20} MiB")
    with tempfile.TemporaryDirectory(prefix="cai-upload-") as tmp:
        path = Path(tmp) / filename
        path.write_bytes(content)
        try:
            prompts = read_prompt_file(path, split=split, tags=tuple(tag))
        except BadInput as exc:  # name the file as uploaded, not where it was put for reading
            raise BadInput(
                str(exc).replace(f"{tmp}/", ""), [p.replace(f"{tmp}/", "") for p in exc.problems]
            ) from None
    with ws.session() as session:
        report = repo.import_prompts(session, prompts, source=filename)
        record(session, actor.name, "prompts.import", filename, imported=report.imported, read=report.read)
    return PromptImport(**asdict(report))


@router.get(
    "/policies", response_model=list[PolicyLineage], summary="Every policy, with the rounds that made it"
)
def list_policies(
    ws: Workspace = Depends(workspace), actor: Actor = Depends(requires(Role.VIEWER))
) -> list[PolicyLineage]:
    from cai.store import repo

    with ws.session() as session:
        return repo.policy_lineages(session)


class ConstitutionDiff(BaseModel):
    from_ref: str
    to_ref: str
    added: list[str]
    removed: list[str]
    changed: list[str]
    diff: str
    """Unified diff of the two versions' canonical text."""


@router.get(
    "/constitutions/{name}/diff",
    response_model=ConstitutionDiff,
    summary="Principles added, removed, changed",
)
def diff_constitutions(
    name: str,
    from_version: int = Query(..., alias="from", ge=1, le=MAX_ID),
    to_version: int = Query(..., alias="to", ge=1, le=MAX_ID),
    ws: Workspace = Depends(workspace),
    actor: Actor = Depends(requires(Role.VIEWER)),
) -> ConstitutionDiff:
    from cai.constitution import diff_summary, diff_text
    from cai.store import repo

    with ws.session() as session:
        old = repo.get_constitution(session, name, from_version).constitution
        new = repo.get_constitution(session, name, to_version).constitution
    return ConstitutionDiff(
        from_ref=old.ref, to_ref=new.ref, **diff_summary(old, new), diff=diff_text(old, new)
    )


class Snapshot(BaseModel):
    id: int
    round_id: int
    manifest_sha256: str
    counts: dict[str, Any]
    filters: dict[str, Any]
    created_at: datetime


@router.get("/rounds/{round_id}/snapshots", response_model=list[Snapshot], summary="A round's exports")
def list_snapshots(
    round_id: RowId, ws: Workspace = Depends(workspace), actor: Actor = Depends(requires(Role.VIEWER))
) -> list[Snapshot]:
    from cai.store import repo, snapshots

    with ws.session() as session:
        repo.get_round(session, round_id)
        return [
            Snapshot.model_validate(s, from_attributes=True)
            for s in snapshots.list_snapshots(session, round_id)
        ]


@router.get("/snapshots/{snapshot_id}/manifest", summary="The snapshot's manifest.json, checked")
def snapshot_manifest(
    snapshot_id: RowId, ws: Workspace = Depends(workspace), actor: Actor = Depends(requires(Role.VIEWER))
) -> dict[str, Any]:
    from cai.export import load_manifest

    return load_manifest(_snapshot_dir(ws, snapshot_id))


@router.get(
    "/snapshots/{snapshot_id}/files/{split}",
    response_class=FileResponse,
    summary="One split's Parquet file",
    responses={200: {"content": {"application/vnd.apache.parquet": {}}}},
)
def snapshot_file(
    snapshot_id: RowId,
    split: Literal["train", "eval"],
    ws: Workspace = Depends(workspace),
    actor: Actor = Depends(requires(Role.VIEWER)),
) -> FileResponse:
    from cai.export import load_manifest

    directory = _snapshot_dir(ws, snapshot_id)
    # Only files the (checked) manifest lists are served, so no path reaches outside the snapshot.
    names = [name for name in load_manifest(directory)["files"] if name.startswith(f"data/{split}-")]
    if not names:
        raise NotFound(f"snapshot {snapshot_id} has no {split} split")
    return FileResponse(
        directory / names[0],
        media_type="application/vnd.apache.parquet",
        filename=f"snapshot-{snapshot_id}-{Path(names[0]).name}",
    )


def _snapshot_dir(ws: Workspace, snapshot_id: int) -> Path:
    from cai.store import snapshots

    with ws.session() as session:
        return Path(snapshots.get_snapshot(session, snapshot_id).path)
