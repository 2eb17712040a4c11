"""`cai loop`: rounds chained through their trained policies, a summary per round, and a rerun
after a kill at any step that finishes the chain without redoing or duplicating anything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from cai.stages.status import STEPS, steps_left
from cai.store.db import session_scope
from cai.store.models import (
    EvaluationRow,
    JudgmentRow,
    PairRow,
    PolicyRow,
    ResponseRow,
    RoundRow,
    SnapshotRow,
    TrainingRunRow,
)
from tests import fake_openai as fake
from tests.conftest import REPO, Cli, table_counts
from tests.test_judging import fresh_policy_then_judge, policy_then_judge
from tests.tiny_model import smollm2_tokenizer_dir, tiny_model_dir

__all__ = ["smollm2_tokenizer_dir", "tiny_model_dir"]  # session fixtures

PROMPTS, EVAL_PROMPTS = 12, 6


def test_steps_left_resume_at_the_step_a_status_belongs_to() -> None:
    assert steps_left("created") == list(STEPS)
    assert steps_left("judging") == ["judge", "export", "train", "eval"]
    assert steps_left("exported") == ["train", "eval"]
    assert steps_left("evaluating") == ["eval"]
    assert steps_left("done") == []
    with pytest.raises(ValueError, match="unknown round status"):
        steps_left("sleeping")


def prepare(cli: Cli, policy: Path) -> int:
    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    return int(cli("round", "start", "-c", "helpful-harmless@1", "--policy", policy).stdout)


def loop_args(server: fake.FakeOpenAI, artifacts: Path, rounds: int = 2) -> list[Any]:
    """Policies answer through the fake server (by name); training is real, on the tiny model."""
    return [
        "loop", "--rounds", rounds, "--limit", PROMPTS, "--eval-limit", EVAL_PROMPTS,
        "--backend", "openai", "--base-url", server.base_url,
        "--judge-base-url", server.base_url, "--judge-model", "fake-judge",
        "--max-steps", 2, "--train-batch-size", 2, "--max-length", 128, "--artifacts", artifacts,
    ]  # fmt: skip


def test_loop_chains_rounds_and_a_rerun_redoes_nothing(
    cli: Cli, engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    first = prepare(cli, tiny_model_dir)
    with fake.FakeOpenAI(fresh_policy_then_judge()) as server:
        summaries = json.loads(cli(*loop_args(server, tmp_path), "--json").stdout)
        requests, counts = server.count, table_counts(engine)
        again = json.loads(cli(*loop_args(server, tmp_path), "--json").stdout)
        assert server.count == requests and table_counts(engine) == counts
    # Each stage's wall time is reported by the run that did it; the rerun did nothing.
    assert all(set(s.pop("stage_seconds")) == set(STEPS) for s in summaries)
    assert all(s.pop("stage_seconds") == {} for s in again)
    assert again == summaries
    assert [s["status"] for s in summaries] == ["done", "done"]
    assert all(s["labels"] > 0 and s["wins_ties_losses"] for s in summaries)
    assert summaries[0]["label_sources"] == {"judge": summaries[0]["labels"] - summaries[0]["ties"]}
    assert summaries[0]["train_reward_accuracy"] is not None
    with session_scope(engine) as session:
        rounds = session.scalars(select(RoundRow).order_by(RoundRow.id)).all()
        trained = session.scalars(select(TrainingRunRow).order_by(TrainingRunRow.id)).all()
        second_policy = session.get_one(PolicyRow, rounds[1].policy_id)
    assert [r.id for r in rounds] == [first, first + 1] and rounds[1].parent_round_id == first
    # Round 2 samples from what round 1 trained, and trains it further.
    assert second_policy.id == trained[0].output_policy_id and second_policy.parent_id == rounds[0].policy_id
    assert rounds[1].config["seed"] == rounds[0].config["seed"] + 1
    assert Path(second_policy.model_ref).is_relative_to(tmp_path / "runs" / f"round-{first}")

    longer = json.loads(cli(*loop_args(server_stub(), tmp_path, rounds=1), "--json").stdout)
    assert (
        longer[0].pop("stage_seconds") == {} and longer == summaries[:1]
    )  # a shorter chain is already finished: nothing runs


def server_stub() -> Any:
    class Stub:
        base_url = "http://127.0.0.1:9/v1"  # nothing listens: any request would fail the test

    return Stub()


def test_loop_refuses_bad_input_without_changing_anything(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    refused = cli(*loop_args(server_stub(), tmp_path, rounds=1), expect=2)
    assert "no rounds yet" in refused.stderr
    before = table_counts(engine)
    assert "round 7 not found" in cli(*loop_args(server_stub(), tmp_path), "--from-round", 7, expect=2).stderr
    bad_config = tmp_path / "dpo.yaml"
    bad_config.write_text("beta: -1\n")
    refused = cli(*loop_args(server_stub(), tmp_path), "--train-config", bad_config, expect=2)
    assert "dpo.yaml: beta" in refused.stderr
    assert table_counts(engine) == before


# --- a kill at each step ---------------------------------------------------------------------


def _status(engine: Engine, round_id: int) -> str:
    with session_scope(engine) as session:
        return session.get_one(RoundRow, round_id).status


def _cai(db_url: str, *args: object) -> subprocess.Popen[str]:
    env = {**os.environ, "CAI_DATABASE_URL": db_url}
    return subprocess.Popen(
        [sys.executable, "-m", "cai", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("kill_at", ["generating", "judging", "exported", "training", "evaluating"])
def test_loop_resumes_after_a_kill_at_each_step(
    db_url: str, cli: Cli, engine: Engine, tiny_model_dir: Path, tmp_path: Path, kill_at: str
) -> None:
    round_id = prepare(cli, tiny_model_dir)

    def slow_enough(request: dict[str, Any], draws: Iterator[int]) -> str:
        time.sleep(0.05)  # long enough to catch the round mid-step
        return policy_then_judge(request, draws)

    with fake.FakeOpenAI(fake.with_draws(slow_enough)) as server:
        args = [*loop_args(server, tmp_path, rounds=1), "--concurrency", 2, "--batch-size", 2]
        if kill_at == "exported":
            # 'exported' lasts milliseconds (train marks the round 'training' before loading
            # anything), too short to catch by polling: stop right after export by running the
            # steps up to it one by one, as a crash between export and train would leave them.
            backend = ["--backend", "openai", "--base-url", server.base_url]
            cli("generate", "-r", round_id, "--limit", PROMPTS, *backend)
            cli("judge", "-r", round_id, "--judge-base-url", server.base_url, "--judge-model", "fake-judge")
            cli("export", "-r", round_id, "--out", tmp_path / "snapshots" / f"round-{round_id}")
        else:
            process = _cai(db_url, *args)
            deadline = time.monotonic() + 120
            while (
                _status(engine, round_id) != kill_at
                and process.poll() is None
                and time.monotonic() < deadline
            ):
                time.sleep(0.02)
            assert process.poll() is None, (
                f"the loop ended before reaching {kill_at}: {process.communicate()}"
            )
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert _status(engine, round_id) == kill_at
        finished = _cai(db_url, *args, "--json")
        stdout, stderr = finished.communicate(timeout=300)
    assert finished.returncode == 0, stderr
    [summary] = json.loads(stdout)
    assert summary["status"] == "done"
    with session_scope(engine) as session:

        def count(model: Any, *where: Any) -> int:
            return session.scalar(select(func.count()).select_from(model).where(*where)) or 0

        # Exactly what one uninterrupted round stores: nothing lost, nothing twice.
        assert count(ResponseRow, ResponseRow.origin == "sample") == PROMPTS * 2
        assert count(ResponseRow, ResponseRow.origin == "eval") == EVAL_PROMPTS * 2
        llm = JudgmentRow.template_sha256 != "0" * 64
        pairs = count(PairRow)
        assert (
            count(JudgmentRow, llm) == 2 * pairs and count(JudgmentRow, llm, JudgmentRow.status != "ok") == 0
        )
        assert count(SnapshotRow) == 1 and count(EvaluationRow) == 1
        assert count(TrainingRunRow) == 1 and count(TrainingRunRow, TrainingRunRow.status == "done") == 1
        assert count(PolicyRow) == 2
