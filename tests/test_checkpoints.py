"""Resuming after a kill during a checkpoint save: which checkpoints are complete is read from what
the Trainer writes last, incomplete ones are moved aside (never deleted), and a rerun resumes
from the newest complete one, or starts afresh."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from cai.config import load_settings
from cai.stages.progress import Stopped
from cai.stages.settings import TrainSettings
from cai.stages.train import run_train
from cai.store.db import session_scope
from cai.store.models import TrainingRunRow, TrainingStepRow
from cai.train import (
    INCOMPLETE_DIR,
    TrainConfig,
    TrainResult,
    checkpoint_complete,
    last_complete_checkpoint,
    train_dpo,
)
from cai.workspace import Workspace
from tests.conftest import Cli
from tests.test_train import FAST, synthetic_pairs, write_snapshot
from tests.test_train_cli import judged_round
from tests.tiny_model import smollm2_tokenizer_dir, tiny_model_dir

__all__ = ["smollm2_tokenizer_dir", "tiny_model_dir"]  # session fixtures

# What Trainer.save_model writes first: a kill right after leaves a checkpoint holding only these.
FIRST_WRITTEN = ("config.json", "generation_config.json")


def partial_checkpoint(path: Path, model_dir: Path) -> Path:
    path.mkdir(parents=True)
    for name in FIRST_WRITTEN:
        shutil.copy(model_dir / name, path / name)
    return path


@dataclass(frozen=True)
class Run:
    out: Path
    result: TrainResult


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Run:
    """A real Trainer run of one step (checkpoint-1) in a dir where an earlier run was killed
    while saving checkpoint-5."""
    tmp = tmp_path_factory.mktemp("fresh")
    snapshot = write_snapshot(tmp / "snapshot", synthetic_pairs(2), [])
    out = tmp / "out"
    partial_checkpoint(out / "checkpoint-5", tiny_model_dir)
    config = TrainConfig(max_steps=1, save_steps=1, **FAST)
    return Run(out, train_dpo(snapshot, tiny_model_dir, out, config))


def test_without_a_complete_checkpoint_training_starts_afresh(fresh_run: Run) -> None:
    assert not fresh_run.result.resumed and fresh_run.result.steps == 1
    [aside] = (fresh_run.out / INCOMPLETE_DIR).iterdir()
    assert aside.name.startswith("checkpoint-5.")
    assert sorted(p.name for p in aside.iterdir()) == sorted(FIRST_WRITTEN)  # moved, not emptied
    assert [p.name for p in fresh_run.out.glob("checkpoint-*")] == ["checkpoint-1"]


def test_the_trainer_writes_trainer_state_last(fresh_run: Run) -> None:
    # The predicate rests on this ordering in Trainer._save_checkpoint; a transformers release
    # that changes it must fail here.
    checkpoint = fresh_run.out / "checkpoint-1"
    files = {p.name: p.stat().st_mtime_ns for p in checkpoint.rglob("*") if p.is_file()}
    assert {"trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt"} <= files.keys()
    assert files["trainer_state.json"] == max(files.values())


def test_complete_means_the_trainer_state_was_written_whole(fresh_run: Run, tmp_path: Path) -> None:
    real = fresh_run.out / "checkpoint-1"
    assert checkpoint_complete(real)
    assert last_complete_checkpoint(fresh_run.out) == real

    def copy(name: str) -> Path:  # the real checkpoint's small files: the weights do not matter here
        return shutil.copytree(real, tmp_path / name, ignore=shutil.ignore_patterns("*.pt", "*.safetensors"))

    assert not checkpoint_complete(partial_checkpoint(tmp_path / "checkpoint-2", real))
    (copy("checkpoint-3") / "trainer_state.json").unlink()
    state = (real / "trainer_state.json").read_text()
    (copy("checkpoint-4") / "trainer_state.json").write_text(state[: len(state) // 2])  # cut off
    copy("checkpoint-9")  # its state says step 1: not the save this name stands for
    copy("checkpoint-1.bak")  # not a name the Trainer resumes from
    assert not any(
        checkpoint_complete(tmp_path / n) for n in ("checkpoint-3", "checkpoint-4", "checkpoint-9")
    )
    assert not checkpoint_complete(tmp_path / "checkpoint-1.bak")
    assert last_complete_checkpoint(tmp_path) is None

    copy("checkpoint-1")  # the newest complete one is picked over newer incomplete ones
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-1"


class StopAtStep:
    """Progress that asks the stage to stop once training logs `step` (before its checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step, self.seen = step, 0

    def task(self, label: str, total: int | None = None) -> None:
        pass

    def update(self, done: int, total: int | None = None, info: str = "") -> None:
        self.seen = max(self.seen, done)

    def note(self, message: str) -> None:
        pass

    def stop_requested(self) -> bool:
        return self.seen >= self.step


def test_cai_train_resumes_past_a_checkpoint_cut_short_by_a_kill(
    cli: Cli, engine: Engine, db_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    round_id = judged_round(cli, tiny_model_dir, limit=12)
    cli("export", "-r", round_id, "--out", tmp_path / "snap")

    out = tmp_path / "run"
    config = TrainConfig(max_steps=3, save_steps=1, **FAST)
    ws = Workspace(load_settings(database_url=db_url))
    try:
        with pytest.raises(Stopped):
            run_train(ws, round_id, TrainSettings(output=out, dpo=config), StopAtStep(2))
    finally:
        ws.engine.dispose()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    # The kill: checkpoint-2's save got as far as the model config, no further.
    partial_checkpoint(out / "checkpoint-2", out / "checkpoint-1")

    config_file = tmp_path / "dpo.yaml"
    config_file.write_text("save_steps: 1\n")
    flags = ["--max-steps", 3, "--batch-size", 2, "--lr", 1e-3, "--max-length", 128]
    args = ["train", "-r", round_id, "--output", out, "--config", config_file, *flags, "--json"]
    result = cli(*args)
    summary = json.loads(result.stdout)
    assert summary["resumed"] is True and summary["steps"] == 3
    assert "checkpoint-2 was incomplete" in result.stderr and "resuming from checkpoint-1" in result.stderr

    [aside] = (out / INCOMPLETE_DIR).iterdir()
    assert aside.name.startswith("checkpoint-2.")
    assert sorted(p.name for p in aside.iterdir()) == sorted(FIRST_WRITTEN)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert checkpoint_complete(out / "checkpoint-3")
    with session_scope(engine) as session:
        runs = session.scalars(select(TrainingRunRow)).all()
        steps = session.scalars(
            select(TrainingStepRow.step).where(TrainingStepRow.training_run_id == runs[0].id)
        ).all()
    assert [(r.id, r.status) for r in runs] == [(summary["training_run"], "done")]  # the same run, resumed
    assert sorted(steps) == [1, 2, 3]
