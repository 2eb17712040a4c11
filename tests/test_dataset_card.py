"""Dataset cards and Hub export: every snapshot's README.md (YAML header that `datasets` and the
Hub read, provenance in the body), what `--push-to-hub` uploads, and the upload itself against a
loopback fake of the Hub's HTTP API (the real Hub is never reached from the tests)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Engine, select

from cai.dataset_card import md, render_card
from cai.errors import BadInput
from cai.hub import check_repo_id, upload_plan
from cai.jobs import validate_settings
from cai.sft_export import SftFilters, write_sft_snapshot
from cai.stages.settings import ExportSettings
from cai.store.chains import Chain, ChainStep
from cai.store.db import session_scope
from cai.store.models import (
    CalibrationRow,
    ConstitutionRow,
    JudgeRow,
    PolicyRow,
    PrincipleRow,
    RoundRow,
    SnapshotRow,
    TrainingRunRow,
)
from cai.store.snapshots import RoundProvenance
from tests.conftest import Cli
from tests.test_export import export, labelled_round

__all__ = ["labelled_round"]  # fixtures

DATA = {"train": "data/train-00000-of-00001.parquet", "eval": "data/eval-00000-of-00001.parquet"}


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    header, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(header)


def load_splits(directory: Path, cache: Path) -> dict[str, list[dict[str, Any]]]:
    import datasets

    loaded = datasets.load_dataset(str(directory), cache_dir=str(cache))
    return {split: loaded[split].to_list() for split in loaded}


def without_card(snapshot: Path, where: Path) -> Path:
    shutil.copytree(snapshot, where)
    (where / "README.md").unlink()
    return where


# --- the card ------------------------------------------------------------------------------------


def test_card_header_and_load_dataset_give_todays_splits(
    cli: Cli, labelled_round: int, tmp_path: Path
) -> None:
    out = tmp_path / "snap"
    manifest = export(cli, labelled_round, out, "--eval-fraction", 0.25, "--license", "cc-by-4.0")
    card = (out / "README.md").read_text()
    header = front_matter(card)
    assert header["license"] == "cc-by-4.0"
    assert header["task_categories"] == ["text-generation"]
    assert {"dpo", "preference", "constitutional-ai"} <= set(header["tags"])
    assert header["size_categories"] == ["n<1K"]
    [config] = header["configs"]
    assert config["data_files"] == [{"split": s, "path": p} for s, p in DATA.items()]
    # Listed and hashed in the manifest like the data: a changed card is a changed snapshot.
    assert manifest["files"]["README.md"] == hashlib.sha256(card.encode()).hexdigest()

    with_card = load_splits(out, tmp_path / "cache")
    bare = load_splits(without_card(out, tmp_path / "bare"), tmp_path / "cache")
    assert list(with_card) == list(bare) == ["train", "eval"]
    assert with_card == bare
    assert len(with_card["train"]) == manifest["counts"]["train"] > 0
    assert len(with_card["eval"]) == manifest["counts"]["eval"] > 0


def test_card_records_the_provenance_of_the_data(
    cli: Cli, engine: Engine, labelled_round: int, tmp_path: Path
) -> None:
    first = export(cli, labelled_round, tmp_path / "first")
    with session_scope(engine) as session:
        round_row = session.get_one(RoundRow, labelled_round)
        judge = session.scalars(select(JudgeRow).where(JudgeRow.backend != "rule")).one()
        # An older and a newer calibration of the judge under this constitution: the card gives
        # the newer one. The round's policy becomes a trained child of a base model.
        for accuracy in (0.5, 0.8125):
            session.add(
                CalibrationRow(
                    judge_id=judge.id,
                    constitution_id=round_row.constitution_id,
                    gold_sha256="9" * 64,
                    pairs=48,
                    accuracy=accuracy,
                    consistency=0.875,
                    injection_follow_rate=0.0625,
                    details={},
                )
            )
        base = PolicyRow(name="base-model", model_ref="org/base")
        session.add(base)
        session.flush()
        policy = session.get_one(PolicyRow, round_row.policy_id)
        policy.parent_id = base.id
        policy.snapshot_sha256 = "7" * 64
        snapshot_id = session.scalars(select(SnapshotRow.id)).one()
        run = TrainingRunRow(
            round_id=labelled_round,
            snapshot_id=snapshot_id,
            reference_policy_id=base.id,
            output_policy_id=policy.id,
            status="done",
            output_dir="runs/x",
            config={},
        )
        session.add(run)
        session.flush()
        run_id = run.id
        constitution = session.get_one(ConstitutionRow, round_row.constitution_id)
        principles = session.scalars(
            select(PrincipleRow).where(PrincipleRow.constitution_id == constitution.id)
        ).all()
        config_sha = judge.config_sha256
        ref, sha = f"{constitution.name}@{constitution.version}", constitution.sha256

    manifest = export(cli, labelled_round, tmp_path / "second")
    card = (tmp_path / "second/README.md").read_text()
    lines = card.splitlines()
    assert f"`{ref}`, sha256 `{sha}`." in lines
    for principle in principles:
        assert f"| {md(principle.key)} | llm | {principle.weight:g} | {md(principle.critique)} |" in lines
    judge_row = next(line for line in lines if line.startswith("| fake-judge | openai | pairwise |"))
    assert config_sha in judge_row
    calibration = next(line for line in lines if line.startswith(f"| fake-judge | `{config_sha[:12]}` |"))
    assert calibration == f"| fake-judge | `{config_sha[:12]}` | 0.812 | 0.875 | 0.062 | 48 | `{'9' * 64}` |"
    counts = manifest["counts"]
    assert f"| train | {counts['train']} |" in lines and f"| eval | {counts['eval']} |" in lines
    assert f"| ties | {counts['dropped']['ties']} |" in lines
    assert all(f"| {source} | {n} |" in lines for source, n in counts["by_source"].items())
    lineage = lines.index("| policy | model | trained on snapshot (manifest sha256) | by |")
    assert lines[lineage + 2 : lineage + 4] == [
        f"| fake/policy | fake/policy | `{'7' * 64}` | run {run_id} (dpo) in round {labelled_round} |",
        "| base-model | org/base | — | base model |",
    ]
    assert f"Round {labelled_round} (rl) sampled from `fake/policy`." in card
    # New provenance made a new card, hence a new manifest; the data itself did not change.
    assert manifest["files"]["README.md"] != first["files"]["README.md"]
    for name in manifest["files"]:
        if name != "README.md":
            assert manifest["files"][name] == first["files"][name]


def test_card_is_byte_identical_for_the_same_labels(cli: Cli, labelled_round: int, tmp_path: Path) -> None:
    export(cli, labelled_round, tmp_path / "a", "--license", "mit")
    export(cli, labelled_round, tmp_path / "b", "--license", "mit")
    assert (tmp_path / "a/README.md").read_bytes() == (tmp_path / "b/README.md").read_bytes()
    assert "license: mit" in (tmp_path / "a/README.md").read_text().splitlines()


HOSTILE = "---\nlicense: mit\n---\n| a | b |\n<script>alert(1)</script> *bold* [x](http://e) `c` &amp; $x$"


def hostile_provenance() -> RoundProvenance:
    return RoundProvenance(
        round_id=7,
        constitution={"name": "name: 'quoted' \"and\"\n---", "version": 1, "sha256": "0" * 64},
        policy={"name": "p", "model_ref": "m"},
        judges=[{"backend": "openai", "model": "judge|<b>", "mode": "pairwise", "config_sha256": "1" * 64}],
        description="# not a heading\n- nor a list",
        principles=[{"key": "k", "kind": "llm", "weight": 1.0, "text": HOSTILE}],
        judge_details=[{"params": {"temperature": 0}, "template_sha256": "2" * 64, "calibration": None}],
    )


def test_any_text_stays_literal_in_the_header_and_the_body() -> None:
    from markdown_it import MarkdownIt

    manifest = {"counts": {"train": 3, "eval": 0, "dropped": {"ties": 1}, "by_source": {"judge": 3}}}
    card = render_card(
        "dpo", manifest, hostile_provenance(), {"train": DATA["train"]}, "f" * 64, "apache-2.0"
    )
    header = front_matter(card)
    assert header["license"] == "apache-2.0"  # the principle's "license: mit" cannot reach it
    assert header["pretty_name"] == "cai round 7: preference pairs (name: 'quoted' \"and\"\n---@1)"
    assert header["configs"][0]["data_files"] == [{"split": "train", "path": DATA["train"]}]

    body = card[4:].partition("\n---\n")[2]
    html = MarkdownIt("commonmark").enable("table").render(body)
    assert "<script>" not in html and "<b>" not in html and "<em>" not in html and "<a " not in html
    assert html.count("<h1>") == 1 and "<ul>" not in html  # the description made no heading or list
    rows = table_rows(html)
    # What a reader sees: the text as written (whitespace collapsed), in its own cell of one row.
    assert ["k", "llm", "1", " ".join(HOSTILE.split())] in rows
    assert ["judge|<b>", "openai", "pairwise", "1" * 64, "2" * 64, '{"temperature": 0}'] in rows


def table_rows(html: str) -> list[list[str]]:
    """The text of each table row's cells, as a browser shows them."""
    from html.parser import HTMLParser

    rows: list[list[str]] = []

    class Cells(HTMLParser):
        cell: list[str] | None = None

        def handle_starttag(self, tag: str, attrs: object) -> None:
            if tag == "tr":
                rows.append([])
            elif tag in ("td", "th"):
                self.cell = []

        def handle_endtag(self, tag: str) -> None:
            if tag in ("td", "th") and self.cell is not None:
                rows[-1].append("".join(self.cell))
                self.cell = None

        def handle_data(self, data: str) -> None:
            if self.cell is not None:
                self.cell.append(data)

    Cells(convert_charrefs=True).feed(html)
    return rows


def chains(texts: list[str]) -> list[Chain]:
    return [
        Chain(
            prompt_id=i,
            prompt_sha256=f"{i:064x}",
            conversation=[{"role": "user", "content": f"Question {i}?"}],
            first_answer=f"A first answer {i}.",
            first_answer_id=10 * i,
            steps=[ChainStep(1, "honesty", "It could be clearer.", text, 10 * i + 1)],
        )
        for i, text in enumerate(texts, start=1)
    ]


def write_sft(out: Path, texts: list[str], overwrite: bool = False) -> dict[str, Any]:
    provenance = RoundProvenance(1, {"name": "c", "version": 1, "sha256": "0" * 64}, {"name": "p"}, [])
    return write_sft_snapshot(
        out, chains(texts), provenance, SftFilters(eval_fraction=0.3), [], {}, overwrite
    )


def test_sft_snapshots_have_a_card_and_load_as_before(tmp_path: Path) -> None:
    manifest = write_sft(tmp_path / "sft", [f"A clearer answer {i}." for i in range(10)])
    header = front_matter((tmp_path / "sft/README.md").read_text())
    assert "sft" in header["tags"] and header["license"] == "unknown"
    assert "README.md" in manifest["files"]
    with_card = load_splits(tmp_path / "sft", tmp_path / "cache")
    assert with_card == load_splits(without_card(tmp_path / "sft", tmp_path / "bare"), tmp_path / "cache")
    assert set(with_card) == {"train", "eval"}
    assert with_card["train"][0]["messages"][-1]["role"] == "assistant"


def test_each_snapshot_loads_its_own_rows_whatever_its_directory_is_called(tmp_path: Path) -> None:
    # `datasets` caches a folder with `configs` by its name and config, not its files: the card's
    # data digest is what keeps one snapshot from loading another's cached rows.
    cache = tmp_path / "cache"
    one = write_sft(tmp_path / "a/snap", [f"one {i}." for i in range(6)])
    two = write_sft(tmp_path / "b/snap", [f"two {i}." for i in range(9)])
    assert one["files"] != two["files"]
    assert {r["messages"][-1]["content"] for r in load_splits(tmp_path / "a/snap", cache)["train"]} <= {
        f"one {i}." for i in range(6)
    }
    assert {r["messages"][-1]["content"] for r in load_splits(tmp_path / "b/snap", cache)["train"]} <= {
        f"two {i}." for i in range(9)
    }
    write_sft(tmp_path / "a/snap", [f"three {i}." for i in range(6)], overwrite=True)
    assert {r["messages"][-1]["content"] for r in load_splits(tmp_path / "a/snap", cache)["train"]} <= {
        f"three {i}." for i in range(6)
    }


def test_a_bad_license_is_bad_input_naming_the_flag(cli: Cli, labelled_round: int, tmp_path: Path) -> None:
    refused = export(cli, labelled_round, tmp_path / "x", "--license", "Not A License", expect=2)
    assert "--license: 'Not A License' is not a Hub license id" in refused["stderr"]
    assert not (tmp_path / "x").exists()


# --- what --push-to-hub uploads ------------------------------------------------------------------


@pytest.mark.parametrize("repo_id", ["owner/name", "my-org/cai.round_1", "a/b", "A1/x-y.z"])
def test_repository_ids_the_hub_accepts(repo_id: str) -> None:
    assert check_repo_id(repo_id) == repo_id


@pytest.mark.parametrize(
    "repo_id", ["name-only", "a/b/c", "owner/", "/name", "own er/name", "owner/-name", "owner/na--me", "o/a..b", "o/" + "x" * 97]
)  # fmt: skip
def test_repository_ids_the_hub_refuses(repo_id: str) -> None:
    with pytest.raises(ValueError, match="is not a Hub repository id"):
        check_repo_id(repo_id)


def test_push_flags_are_checked_before_anything_runs(cli: Cli, labelled_round: int, tmp_path: Path) -> None:
    refused = export(cli, labelled_round, tmp_path / "x", "--push-to-hub", "no-owner", expect=2)
    assert "--push-to-hub: 'no-owner' is not a Hub repository id: owner/name" in refused["stderr"]
    refused = export(cli, labelled_round, tmp_path / "x", "--private", expect=2)
    assert "--private applies to the repository that --push-to-hub creates" in refused["stderr"]
    assert not (tmp_path / "x").exists()
    # The same settings arrive as a job's JSON: checked there too, naming the field.
    with pytest.raises(BadInput, match=r"settings\.push_to_hub: 'x' is not a Hub repository id"):
        validate_settings("export", {"push_to_hub": "x"})
    job = validate_settings("export", {"push_to_hub": "o/n", "private": True, "license": "mit"})
    assert isinstance(job, ExportSettings)
    assert (job.push_to_hub, job.private, job.license) == ("o/n", True, "mit")


def test_the_plan_uploads_the_snapshots_own_files_only(cli: Cli, labelled_round: int, tmp_path: Path) -> None:
    from cai.export import manifest_sha256

    out = tmp_path / "snapshots/round-1"
    manifest = export(cli, labelled_round, out, "--eval-fraction", 0.25)
    (out / "notes.txt").write_text("not the snapshot's")
    (tmp_path / "snapshots/.round-1.tmp-host-1-0123abcd/data").mkdir(parents=True)  # a work dir
    plan = upload_plan(out, "owner/cai-round", private=True)
    assert plan.files == ("README.md", DATA["eval"], DATA["train"], "manifest.json")
    assert set(plan.files) == {*manifest["files"], "manifest.json"}
    assert (plan.repo_id, plan.private, plan.folder) == ("owner/cai-round", True, out)
    assert plan.commit_message == (
        f"cai round {labelled_round}: DPO snapshot, manifest sha256 {manifest_sha256(out)}"
    )

    train = out / DATA["train"]
    train.write_bytes(train.read_bytes() + b"x")
    with pytest.raises(BadInput, match="changed since the snapshot was written"):
        upload_plan(out, "owner/cai-round")


def test_a_snapshot_without_a_card_is_not_pushed(tmp_path: Path) -> None:
    write_sft(tmp_path / "sft", ["a.", "b.", "c."])
    manifest = json.loads((tmp_path / "sft/manifest.json").read_text())
    del manifest["files"]["README.md"]  # as snapshots written before cards were
    (tmp_path / "sft/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BadInput, match="no dataset card"):
        upload_plan(tmp_path / "sft", "owner/name")


def test_no_token_is_bad_input_before_any_export(
    cli: Cli, engine: Engine, labelled_round: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))
    refused = export(cli, labelled_round, tmp_path / "x", "--push-to-hub", "owner/name", expect=2)
    assert "--push-to-hub: no Hugging Face token is configured: set HF_TOKEN" in refused["stderr"]
    assert not (tmp_path / "x").exists()
    with session_scope(engine) as session:
        assert session.get_one(RoundRow, labelled_round).status == "judged"


# --- the upload, against a loopback fake of the Hub's HTTP API ------------------------------------


class FakeHub:
    """The Hub routes one commit takes (create the repo, validate the card's YAML, ask how each file
    uploads, commit), recorded; any other request is refused with 404 and recorded too.
    `refuse_commit` answers the commit with 403, as the Hub does for a token without write access."""

    def __init__(self, refuse_commit: bool = False) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.refuse_commit = refuse_commit
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._record()
                self._json(404, {"error": "not here"})

            def do_POST(self) -> None:
                body = self._record()
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    request = json.loads(body)
                    self._json(
                        200, {"url": f"{hub.url}/datasets/{request['organization']}/{request['name']}"}
                    )
                elif path == "/api/validate-yaml":
                    yaml.safe_load(json.loads(body)["content"].split("---")[1])
                    self._json(200, {"errors": [], "warnings": []})
                elif path.endswith("/preupload/main"):
                    files = json.loads(body)["files"]
                    modes = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                    self._json(200, {"files": modes})
                elif path.endswith("/commit/main"):
                    if hub.refuse_commit:
                        self._json(403, {"error": "You don't have the rights to write to this repository"})
                    else:
                        repo = path.removeprefix("/api/datasets/").removesuffix("/commit/main")
                        self._json(
                            200, {"commitUrl": f"{hub.url}/datasets/{repo}/commit/abc", "commitOid": "abc"}
                        )
                else:
                    self._json(404, {"error": "not here"})

            def _record(self) -> bytes:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append((self.command, self.path, dict(self.headers), body))
                return body

            def _json(self, code: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def routes(self) -> list[tuple[str, str]]:
        return [(method, path.split("?")[0]) for method, path, _, _ in self.requests]

    def committed(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        """The commit's header and its files (path -> bytes)."""
        [body] = [body for _, path, _, body in self.requests if path.split("?")[0].endswith("/commit/main")]
        lines = [json.loads(line) for line in body.decode().splitlines()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {
            line["value"]["path"]: base64.b64decode(line["value"]["content"])
            for line in lines
            if line["key"] == "file"
        }
        return header, files


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_token")
    yield


def test_push_uploads_the_plan_in_one_commit(
    cli: Cli, labelled_round: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_env: None
) -> None:
    out = tmp_path / "snap"
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = export(cli, labelled_round, out, "--push-to-hub", "owner/cai-data", "--private")
    assert hub.routes() == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/datasets/owner/cai-data/preupload/main"),
        ("POST", "/api/datasets/owner/cai-data/commit/main"),
    ]
    assert all(
        headers.get("authorization") == "Bearer hf_loopback_token" for _, _, headers, _ in hub.requests
    )
    create = json.loads(hub.requests[0][3])
    assert (create["name"], create["organization"], create["type"], create["visibility"]) == (
        "cai-data",
        "owner",
        "dataset",
        "private",
    )
    header, files = hub.committed()
    plan = upload_plan(out, "owner/cai-data", private=True)
    assert header["summary"] == plan.commit_message
    assert sorted(files) == sorted(plan.files)
    assert all(files[name] == (out / name).read_bytes() for name in plan.files)
    assert result["hub"] == {
        "repo_url": f"{hub.url}/datasets/owner/cai-data",
        "commit_url": f"{hub.url}/datasets/owner/cai-data/commit/abc",
    }
    with FakeHub() as hub:  # again, unchanged, as a person reads it
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        printed = cli("export", "--round", labelled_round, "--out", out, "--push-to-hub", "owner/cai-data")
    assert f"pushed to {hub.url}/datasets/owner/cai-data ({hub.url}/datasets/owner/cai-data/commit/abc)" in (
        " ".join(printed.stdout.split())
    )


def test_a_refused_upload_fails_clearly_and_keeps_the_snapshot(
    cli: Cli, labelled_round: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_env: None
) -> None:
    out = tmp_path / "snap"
    with FakeHub(refuse_commit=True) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        refused = cli("export", "--round", labelled_round, "--out", out, "--push-to-hub", "owner/x", expect=1)
    assert f"pushing {out} to {hub.url} (owner/x) failed: HTTP 403" in " ".join(refused.stderr.split())
    from cai.export import load_manifest

    assert "README.md" in load_manifest(out)["files"]  # exported; a rerun pushes again
