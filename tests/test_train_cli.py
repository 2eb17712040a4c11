"""`cai train` on a round: the snapshot trains the round's policy, per-step metrics land in the
database, and the result is registered as the next policy with its lineage."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import Engine, select

from cai.store.db import session_scope
from cai.store.models import PolicyRow, TrainingRunRow, TrainingStepRow
from tests import fake_openai as fake
from tests.conftest import REPO, Cli
from tests.test_judging import fresh_policy_then_judge, judge_args
from tests.tiny_model import smollm2_tokenizer_dir, tiny_model_dir

__all__ = ["smollm2_tokenizer_dir", "tiny_model_dir"]  # session fixtures


def judged_round(cli: Cli, policy_dir: Path, limit: int = 24) -> int:
    """A round of `policy_dir` with `limit` prompts sampled and judged (fake endpoints); returns its id."""
    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    round_id = int(cli("round", "start", "-c", "helpful-harmless@1", "--policy", policy_dir).stdout)
    with fake.FakeOpenAI(fresh_policy_then_judge()) as server:
        cli(
            "generate", "-r", round_id, "--backend", "openai", "--base-url", server.base_url, "--limit", limit
        )
        cli(*judge_args(server, round_id))
    return round_id


def test_train_registers_the_next_policy_with_its_lineage(
    cli: Cli, engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    round_id = judged_round(cli, tiny_model_dir)
    cli("export", "-r", round_id, "--out", tmp_path / "snap")
    missing = cli("train", "-r", round_id, "--snapshot", tmp_path / "nowhere", expect=2)
    assert "not a snapshot" in missing.stderr

    args = [
        "train",
        "-r",
        round_id,
        "--output",
        tmp_path / "run",
        "--max-steps",
        3,
        "--batch-size",
        2,
        "--lr",
        1e-3,
    ]
    summary = json.loads(cli(*args, "--max-length", 128, "--json").stdout)
    assert summary["steps"] == 3 and summary["resumed"] is False
    assert "rewards/accuracies" in summary["last_step"]

    with session_scope(engine) as session:
        run = session.get_one(TrainingRunRow, summary["training_run"])
        steps = session.scalars(
            select(TrainingStepRow.step).where(TrainingStepRow.training_run_id == run.id)
        ).all()
        policy = session.get_one(PolicyRow, summary["policy_id"])
        parent = session.get_one(PolicyRow, policy.parent_id)
    assert run.status == "done" and run.output_policy_id == policy.id and run.config["max_steps"] == 3
    assert list(steps)[:3] == [1, 2, 3]
    assert parent.model_ref == str(tiny_model_dir.resolve()) or parent.name == str(tiny_model_dir)
    assert policy.snapshot_sha256 and policy.training_config["learning_rate"] == 1e-3
    assert Path(policy.model_ref, "config.json").is_file()
    assert json.loads(cli("round", "show", round_id, "--json").stdout)["status"] == "trained"
