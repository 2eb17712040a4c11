"""Export hardening: one row per content (never both orientations, never identical texts), work
directories of killed exports removed at the next export, and the snapshot row following the
copy a re-export wrote."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from cai.store.db import session_scope
from cai.store.models import LabelRow, PairRow, ResponseRow, SnapshotRow, TrainingRunRow
from cai.store.training import latest_snapshot
from tests.conftest import Cli
from tests.test_export import export, labelled_round
from tests.test_train_cli import judged_round
from tests.tiny_model import smollm2_tokenizer_dir, tiny_model_dir

__all__ = ["labelled_round", "smollm2_tokenizer_dir", "tiny_model_dir"]  # fixtures


def add_pair(session: Session, like: PairRow, text_a: str, text_b: str, verdict: str, source: str) -> int:
    """A new pair on `like`'s prompt whose responses have these texts, labelled `verdict`."""
    template = session.get_one(ResponseRow, like.response_a_id)
    responses = []
    for text in (text_a, text_b):
        row = ResponseRow(
            round_id=template.round_id,
            prompt_id=template.prompt_id,
            policy_id=template.policy_id,
            sample_index=1000 + (session.scalar(select(func.max(ResponseRow.id))) or 0),  # past any sample
            text=text,
            sampling={},
        )
        session.add(row)
        session.flush()
        responses.append(row.id)
    pair = PairRow(
        round_id=like.round_id,
        prompt_id=like.prompt_id,
        response_a_id=responses[0],
        response_b_id=responses[1],
    )
    session.add(pair)
    session.flush()
    judge_id = session.scalar(select(LabelRow.judge_id).where(LabelRow.judge_id.is_not(None)).limit(1))
    chosen, rejected = responses if verdict == "A" else responses[::-1]
    session.add(
        LabelRow(
            pair_id=pair.id,
            judge_id=judge_id if source == "judge" else None,
            source=source,
            verdict=verdict,
            chosen_response_id=chosen,
            rejected_response_id=rejected,
            confidence=0.9,
        )
    )
    session.flush()
    return pair.id


def texts(session: Session, pair_id: int) -> tuple[str, str]:
    """(chosen, rejected) of the pair's judge label."""
    label = session.scalars(select(LabelRow).where(LabelRow.pair_id == pair_id)).one()
    return (
        session.get_one(ResponseRow, label.chosen_response_id).text,
        session.get_one(ResponseRow, label.rejected_response_id).text,
    )


def test_each_content_is_exported_once_in_one_orientation(
    cli: Cli, engine: Engine, labelled_round: int, tmp_path: Path
) -> None:
    before = export(cli, labelled_round, tmp_path / "before", "--eval-fraction", 0.0)
    with session_scope(engine) as session:
        first, second = session.scalars(
            select(PairRow).join(LabelRow, LabelRow.pair_id == PairRow.id).where(LabelRow.verdict != "tie")
        ).all()[:2]
        chosen, rejected = texts(session, first.id)
        # Identical samples paired again: the same texts preferred the other way round, and again
        # the same way. Only the first pair is exported, in its own orientation.
        swapped = add_pair(session, first, rejected, chosen, "A", "judge")
        again = add_pair(session, first, chosen, rejected, "A", "judge")
        identical = add_pair(session, first, "Same words.", "Same words.", "A", "judge")
        # A human's label on a later copy of the second pair's content beats the judge's.
        chosen2, rejected2 = texts(session, second.id)
        human = add_pair(session, second, chosen2, rejected2, "B", "human")
        first_id, second_id = first.id, second.id

    manifest = export(cli, labelled_round, tmp_path / "snap", "--eval-fraction", 0.0)
    rows = pq.read_table(tmp_path / "snap/data/train-00000-of-00001.parquet").to_pylist()
    exported = {r["pair_id"]: r for r in rows}
    assert first_id in exported and human in exported
    assert not {swapped, again, identical, second_id} & exported.keys()
    assert (exported[first_id]["chosen"][0]["content"], exported[first_id]["rejected"][0]["content"]) == (
        chosen,
        rejected,
    )
    assert exported[human]["chosen"][0]["content"] == rejected2 and exported[human]["label_source"] == "human"

    assert all(r["chosen"][0]["content"] != r["rejected"][0]["content"] for r in rows)
    contents = [
        (json.dumps(r["prompt"]), frozenset((r["chosen"][0]["content"], r["rejected"][0]["content"])))
        for r in rows
    ]
    assert len(contents) == len(set(contents))
    assert len(rows) == before["counts"]["train"]  # three copies dropped, one replaced
    assert manifest["counts"]["dropped"]["duplicates"] == before["counts"]["dropped"]["duplicates"] + 3
    assert manifest["counts"]["dropped"]["identical_texts"] == 1


KILLED_EXPORT = """
import os, sys
from pathlib import Path
import cai.export
from cai.store.snapshots import LabelledPair, RoundProvenance

def killed(path, rows):  # SIGKILL halfway through writing the snapshot's files
    Path(path).write_bytes(b"PAR1 half a file")
    os.kill(os.getpid(), 9)

cai.export._write_parquet = killed
pair = LabelledPair(1, "sample", "0" * 64, [{"role": "user", "content": "hi"}], "a", "b", "A", None, "judge", None, None)
cai.export.write_snapshot(Path(sys.argv[1]), [pair], RoundProvenance(1, {}, {}, []), cai.export.ExportFilters(0.0))
"""


def age(path: Path, seconds: float) -> Path:
    then = time.time() - seconds
    for item in [path, *path.rglob("*")]:
        os.utime(item, (then, then))
    return path


def test_work_dirs_of_killed_exports_are_removed_at_the_next_export(
    cli: Cli, labelled_round: int, tmp_path: Path
) -> None:
    parent = tmp_path / "snapshots"
    parent.mkdir()
    killed = subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, parent / "round-1"])
    assert killed.wait() == -signal.SIGKILL
    [leftover] = parent.iterdir()
    assert leftover.name.startswith(".round-1.tmp-") and (leftover / "data").is_dir()

    def work_dir(name: str, older_than_s: float = 0) -> Path:
        (parent / name / "data").mkdir(parents=True)
        return age(parent / name, older_than_s)

    host, dead, _ = leftover.name.removeprefix(".round-1.tmp-").rsplit("-", 2)
    assert int(dead) == killed.pid
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        removed = [
            leftover,
            work_dir(f".round-1.old-{host}-{dead}-0123abcd"),  # the same dead export
            work_dir(f".round-2.tmp-{host}-{os.getpid()}-0123abcd"),  # our pid, but not our export
            work_dir(f".round-1.tmp-elsewhere-{live.pid}-0123abcd", older_than_s=2 * 86400),
            work_dir(".round-1.tmp-89abcdef", older_than_s=2 * 86400),  # named before pids were
        ]
        kept = [
            work_dir(f".round-1.tmp-{host}-{live.pid}-0123abcd", older_than_s=3600),  # still running
            work_dir(f".round-1.tmp-elsewhere-{dead}-0123abcd"),  # another machine's
            work_dir(".round-1.tmp-89abcdef0"),  # not a name an export makes
            work_dir(f"round-1.tmp-{host}-{dead}-0123abcd"),
            work_dir(".round-1.tmp-01234567"),  # an old-style name, but recent
        ]
        (parent / f".round-3.tmp-{host}-{dead}-0123abcd").write_text("a file, not ours")
        kept.append(parent / f".round-3.tmp-{host}-{dead}-0123abcd")

        result = cli("export", "--round", labelled_round, "--out", parent / "round-1")
    finally:
        live.kill()
        live.wait()
    assert not [p for p in removed if p.exists()]
    assert all(p.exists() for p in kept)
    assert sorted(p.name for p in parent.iterdir()) == sorted(["round-1", *(p.name for p in kept)])
    assert result.stderr.count("left by an export that was killed") == len(removed)


def test_training_finds_the_copy_a_re_export_wrote(
    cli: Cli, engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    round_id = judged_round(cli, tiny_model_dir, limit=12)
    first = json.loads(cli("export", "-r", round_id, "--out", tmp_path / "one", "--json").stdout)
    second = json.loads(cli("export", "-r", round_id, "--out", tmp_path / "two", "--json").stdout)
    assert second["snapshot"] == first["snapshot"]  # the same labels: one snapshot, now in two places
    shutil.rmtree(tmp_path / "one")
    with session_scope(engine) as session:
        assert latest_snapshot(session, round_id).path == str((tmp_path / "two").resolve())

    flags = ["--max-steps", 1, "--batch-size", 2, "--max-length", 128, "--json"]
    summary = json.loads(cli("train", "-r", round_id, "--output", tmp_path / "run", *flags).stdout)
    assert summary["steps"] == 1
    with session_scope(engine) as session:
        run = session.get_one(TrainingRunRow, summary["training_run"])
        assert run.snapshot_id == second["snapshot"]
        assert len(session.scalars(select(SnapshotRow)).all()) == 1

    # Gone from everywhere: the refusal says what to do.
    shutil.rmtree(tmp_path / "two")
    refused = cli("train", "-r", round_id, "--output", tmp_path / "run2", *flags, expect=2)
    assert f"{tmp_path / 'two'}, which no longer holds it" in refused.stderr
    assert f"cai export --round {round_id}" in refused.stderr
