"""Snapshots: what TRL loads with no glue code, byte-identical for the same labels, human
overrides first, and refused when incomplete or altered."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from cai.errors import BadInput
from cai.export import load_manifest
from cai.store.db import session_scope
from cai.store.models import LabelRow, PairRow, SnapshotRow
from tests import fake_openai as fake
from tests.conftest import Cli
from tests.test_judging import fresh_policy_then_judge, judge_args, start_round


@pytest.fixture
def labelled_round(cli: Cli) -> Iterator[int]:
    with fake.FakeOpenAI(fresh_policy_then_judge()) as server:
        round_id = start_round(cli, server, limit=40)
        cli(*judge_args(server, round_id))
        yield round_id


def export(cli: Cli, round_id: int, out: Path, *extra: object, expect: int = 0) -> dict:
    result = cli("export", "--round", round_id, "--out", out, "--json", *extra, expect=expect)
    return json.loads(result.stdout) if expect == 0 else {"stderr": result.stderr}


def test_snapshot_loads_with_datasets_and_counts_match(
    cli: Cli, engine: Engine, labelled_round: int, tmp_path: Path
) -> None:
    import datasets

    out = tmp_path / "snap"
    manifest = export(cli, labelled_round, out, "--eval-fraction", 0.25)
    with session_scope(engine) as session:
        decided = session.scalars(select(LabelRow).where(LabelRow.verdict != "tie")).all()
        ties = session.scalars(select(LabelRow).where(LabelRow.verdict == "tie")).all()
    assert manifest["counts"]["train"] + manifest["counts"]["eval"] == len(decided)
    assert manifest["counts"]["dropped"]["ties"] == len(ties)
    assert manifest["counts"]["eval"] > 0
    assert manifest["constitution"]["name"] == "helpful-harmless" and manifest["round"] == labelled_round

    loaded = datasets.load_dataset(str(out))  # no arguments: the layout names the splits
    assert set(loaded) == {"train", "eval"}
    assert len(loaded["train"]) == manifest["counts"]["train"]
    row = loaded["train"][0]
    assert row["prompt"][-1]["role"] == "user"
    assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
    assert "GOOD" in row["chosen"][0]["content"] and "GOOD" not in row["rejected"][0]["content"]
    assert {"pair_id", "principle", "confidence", "label_source"} <= set(row)
    # Prompts never straddle the split.
    train_prompts = {json.dumps(r["prompt"]) for r in loaded["train"]}
    assert not train_prompts & {json.dumps(r["prompt"]) for r in loaded["eval"]}


def test_same_labels_give_byte_identical_files(
    cli: Cli, engine: Engine, labelled_round: int, tmp_path: Path
) -> None:
    first = export(cli, labelled_round, tmp_path / "a")
    second = export(cli, labelled_round, tmp_path / "b")
    for name in ["manifest.json", *first["files"]]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first["snapshot"] == second["snapshot"]
    again = export(cli, labelled_round, tmp_path / "a")  # re-export in place: unchanged
    assert again["manifest_sha256"] == first["manifest_sha256"]
    with session_scope(engine) as session:
        assert len(session.scalars(select(SnapshotRow)).all()) == 1


def test_human_override_replaces_the_judge(
    cli: Cli, engine: Engine, labelled_round: int, tmp_path: Path
) -> None:
    with session_scope(engine) as session:
        label = session.scalars(select(LabelRow).where(LabelRow.verdict == "A")).first()
        pair = session.get_one(PairRow, label.pair_id)
        session.add(
            LabelRow(
                pair_id=pair.id,
                source="human",
                verdict="B",
                chosen_response_id=pair.response_b_id,
                rejected_response_id=pair.response_a_id,
            )
        )
        pair_id = pair.id
    export(cli, labelled_round, tmp_path / "snap", "--eval-fraction", 0.0)
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "snap/data/train-00000-of-00001.parquet").to_pylist()
    overridden = next(r for r in rows if r["pair_id"] == pair_id)
    assert overridden["label_source"] == "human"
    assert "GOOD" not in overridden["chosen"][0]["content"]  # the human's choice, not the judge's


def test_an_empty_eval_split_has_no_file_and_still_loads(
    cli: Cli, labelled_round: int, tmp_path: Path
) -> None:
    import datasets

    manifest = export(cli, labelled_round, tmp_path / "snap", "--eval-fraction", 0.0)
    assert manifest["counts"]["eval"] == 0
    assert list(manifest["files"]) == ["README.md", "data/train-00000-of-00001.parquet"]
    assert set(datasets.load_dataset(str(tmp_path / "snap"))) == {"train"}


def test_filters(cli: Cli, labelled_round: int, tmp_path: Path) -> None:
    everything = export(cli, labelled_round, tmp_path / "all")
    total = everything["counts"]["train"] + everything["counts"]["eval"]
    import pyarrow.parquet as pq

    some = pq.read_table(tmp_path / "all/data/train-00000-of-00001.parquet").to_pylist()[0]["principle"]
    only = export(cli, labelled_round, tmp_path / "one", "--principle", some)
    assert 0 < only["counts"]["train"] + only["counts"]["eval"] <= total
    assert (
        only["counts"]["dropped"]["other_principle"]
        == total - only["counts"]["train"] - only["counts"]["eval"]
    )
    assert everything["filters"]["principle"] is None and only["filters"]["principle"] == some


def test_incomplete_or_altered_snapshots_are_refused(cli: Cli, labelled_round: int, tmp_path: Path) -> None:
    out = tmp_path / "snap"
    export(cli, labelled_round, out)
    load_manifest(out)
    train = out / "data/train-00000-of-00001.parquet"
    train.write_bytes(train.read_bytes() + b"tampered")
    with pytest.raises(BadInput, match="changed since the snapshot was written"):
        load_manifest(out)
    (out / "manifest.json").unlink()
    with pytest.raises(BadInput, match="not a snapshot"):
        load_manifest(out)


def test_existing_directory_is_not_clobbered(cli: Cli, labelled_round: int, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused = export(cli, labelled_round, out, expect=2)
    assert (
        f"{out} exists and holds something else; choose another directory, or overwrite it"
        in refused["stderr"]
    )
    assert (out / "notes.txt").read_text() == "mine"
    export(cli, labelled_round, out, "--overwrite")
    load_manifest(out)


def test_a_round_without_labels_is_bad_input(cli: Cli, tmp_path: Path) -> None:
    with fake.FakeOpenAI(fresh_policy_then_judge()) as server:
        round_id = start_round(cli, server, limit=3)
    refused = export(cli, round_id, tmp_path / "x", expect=2)
    assert "no labels yet: run cai judge" in refused["stderr"]
    assert not (tmp_path / "x").exists()
