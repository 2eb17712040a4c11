"""Publishing a snapshot to the Hugging Face Hub as a dataset repository. `upload_plan` decides,
with no network, what goes up and how (the snapshot's own files as its manifest lists them, the
card among them, plus the manifest; the repository; the commit message); `push` carries a plan
out with `huggingface_hub` in one commit. Imports beyond the standard library happen inside the
functions, so importing this module (settings validation does) stays cheap."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cai.errors import BadInput

# The Hub's rule for a repository id: `owner/name`, each of word characters, '-' and '.', no
# '--' or '..', not starting or ending with '-' or '.', a name at most 96 characters.
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_PART}/{_PART}")


def check_repo_id(repo_id: str) -> str:
    """`repo_id` when the Hub would accept it as a dataset repository id; ValueError otherwise.
    The owner is required: without it the Hub would pick the token's user, a network call."""
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ValueError(
            f"{repo_id!r} is not a Hub repository id: owner/name, each of letters, digits, '_', '-' "
            "and '.', not starting or ending with '-' or '.', without '--' or '..', at most 96 characters"
        )
    return repo_id


@dataclass(frozen=True)
class UploadPlan:
    """One commit to a dataset repository: which files of `folder` go up, under the same paths."""

    repo_id: str
    private: bool
    folder: Path
    files: tuple[str, ...]
    """Paths relative to `folder`: the manifest's files (parquet files, the card) and the manifest."""
    commit_message: str


def upload_plan(snapshot: Path, repo_id: str, private: bool = False) -> UploadPlan:
    """What pushing `snapshot` to `repo_id` uploads. Only a complete, unaltered snapshot with a
    dataset card qualifies (load_manifest checks every file's hash), and only its own files go:
    never a work directory, nor anything else left in the folder."""
    from cai.dataset_card import CARD
    from cai.export import MANIFEST, load_manifest, manifest_sha256

    check_repo_id(repo_id)
    manifest = load_manifest(snapshot)
    if CARD not in manifest.get("files", {}):
        raise BadInput(f"{snapshot}: this snapshot has no dataset card ({CARD}): export it again to push it")
    kind = "SFT" if manifest.get("format", "").startswith("cai-sft") else "DPO"
    return UploadPlan(
        repo_id=repo_id,
        private=private,
        folder=Path(snapshot),
        files=(*sorted(manifest["files"]), MANIFEST),
        commit_message=(
            f"cai round {manifest.get('round')}: {kind} snapshot, manifest sha256 {manifest_sha256(snapshot)}"
        ),
    )


@dataclass(frozen=True)
class PushResult:
    repo_url: str
    commit_url: str


class HubUploadFailed(RuntimeError):
    """The Hub refused or failed the upload: the snapshot is intact, and a rerun pushes again."""


def hub_token() -> str:
    """The Hugging Face token that pushing uses: $HF_TOKEN, else the one `hf auth login` saved.
    BadInput without one, before anything is exported or sent."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise BadInput(
            "--push-to-hub: no Hugging Face token is configured: set HF_TOKEN, or run `hf auth login`"
        )
    return token


def push(plan: UploadPlan, token: str, endpoint: str | None = None) -> PushResult:
    """Create the dataset repository (private when the plan says so; an existing repository keeps
    its visibility) and upload the plan's files in one commit, so the card, the data and the
    manifest land together. `endpoint`: the Hub's address (default $HF_ENDPOINT, else the Hub);
    read at call time, where huggingface_hub reads it once, at import."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=plan.folder / name) for name in plan.files
    ]
    try:
        repo_url = api.create_repo(plan.repo_id, repo_type="dataset", private=plan.private, exist_ok=True)
        commit = api.create_commit(
            plan.repo_id, operations, commit_message=plan.commit_message, repo_type="dataset"
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "no response"
        raise HubUploadFailed(
            f"pushing {plan.folder} to {api.endpoint} ({plan.repo_id}) failed: HTTP {status}: "
            f"{' '.join(str(exc).split())[:300]}"
        ) from None
    return PushResult(repo_url=str(repo_url), commit_url=commit.commit_url)
