"""Training under a multi-process launch, as real subprocesses on the CPU: `accelerate launch` with
the shipped cpu-ddp config runs `cai train` in two processes that record the run once, and TRL's
own `trl dpo` CLI trains on a cai snapshot directory with no glue code."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sqlalchemy import Engine, func, select
from transformers import AutoModelForCausalLM

from cai.store.db import session_scope
from cai.store.models import PolicyRow, TrainingRunRow, TrainingStepRow
from tests import fake_openai as fake
from tests.conftest import REPO, Cli
from tests.test_judging import fresh_policy_then_judge, judge_args
from tests.tiny_model import smollm2_tokenizer_dir, tiny_model_dir

__all__ = ["smollm2_tokenizer_dir", "tiny_model_dir"]  # session fixtures

pytestmark = pytest.mark.slow

PROCESSES = 2  # num_processes in accelerate/cpu-ddp.yaml
BATCH = 2


def exported_round(cli: Cli, policy_dir: Path, snapshot_dir: Path) -> int:
    """A round of `policy_dir` with judged pairs, exported to `snapshot_dir`."""
    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    round_id = int(cli("round", "start", "-c", "helpful-harmless@1", "--policy", policy_dir).stdout)
    with fake.FakeOpenAI(fresh_policy_then_judge()) as server:
        cli("generate", "-r", round_id, "--backend", "openai", "--base-url", server.base_url, "--limit", 16)
        cli(*judge_args(server, round_id))
    cli("export", "-r", round_id, "--out", snapshot_dir)
    return round_id


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    # One thread per process: two processes share the machine's cores; offline, with HF caches
    # in the test's directory.
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: list[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        args, cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)}: exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-8000:]}"
        )
    return done


def weights_moved(before_dir: Path, after_dir: Path) -> bool:
    """`after_dir` loads as a transformers model whose weights differ from `before_dir`'s."""
    name = "model.layers.0.self_attn.q_proj.weight"
    before = AutoModelForCausalLM.from_pretrained(before_dir).state_dict()[name]
    after = AutoModelForCausalLM.from_pretrained(after_dir).state_dict()[name]
    return before.shape == after.shape and not torch.equal(before, after)


def trl_command(verb: str, snapshot: Path, model: Path, out: Path) -> list[str]:
    """TRL's own CLI (`trl dpo`, `trl sft`) on a cai snapshot directory as it is: one step on
    the CPU, then the eval split scored (a snapshot's splits are train and eval)."""
    return [
        str(Path(sys.executable).with_name("trl")), verb,
        "--dataset_name", str(snapshot), "--dataset_test_split", "eval",
        "--model_name_or_path", str(model),
        "--output_dir", str(out),
        "--learning_rate", "1e-3", "--max_steps", "1",
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
        "--eval_strategy", "steps", "--eval_steps", "1",
        "--max_length", "128", "--gradient_checkpointing", "false",
        "--save_strategy", "no", "--use_cpu", "--bf16", "false", "--report_to", "none",
    ]  # fmt: skip


def test_accelerate_launch_trains_in_two_processes_and_records_the_run_once(
    cli: Cli, engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    round_id = exported_round(cli, tiny_model_dir, tmp_path / "snap")
    train_pairs = json.loads((tmp_path / "snap" / "manifest.json").read_text())["counts"]["train"]
    with session_scope(engine) as session:
        policies_before = session.scalar(select(func.count()).select_from(PolicyRow))

    out = tmp_path / "run"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate" / "cpu-ddp.yaml"),
        "--main_process_port", str(free_port()),  # the default port may be taken by another run
        "-m", "cai", "--db", cli.db_url,
        "train", "--round", str(round_id), "--max-steps", "2", "--batch-size", str(BATCH),
        "--lr", "1e-3", "--max-length", "128", "--output", str(out), "--json",
    ]  # fmt: skip
    done = run(launch, tmp_path)
    summary = json.loads(done.stdout)  # rank 0's summary alone: the other rank prints nothing

    with session_scope(engine) as session:
        runs = session.scalars(select(TrainingRunRow)).all()
        steps = session.execute(select(TrainingStepRow.step, TrainingStepRow.metrics)).all()
        new_policies = session.scalars(select(PolicyRow).where(PolicyRow.parent_id.is_not(None))).all()
        policies_after = session.scalar(select(func.count()).select_from(PolicyRow))
    assert [(r.id, r.status) for r in runs] == [(summary["training_run"], "done")]
    assert policies_after == policies_before + 1
    assert [p.id for p in new_policies] == [summary["policy_id"]] == [runs[0].output_policy_id]
    assert sorted(step for step, _ in steps) == [1, 2]
    assert all("loss" in metrics for _, metrics in steps)

    # Two processes really trained: each optimizer step took BATCH pairs per process, so an epoch
    # is ceil(pairs / (BATCH * PROCESSES)) steps; one process would need ceil(pairs / BATCH).
    assert math.ceil(train_pairs / BATCH) != math.ceil(train_pairs / (BATCH * PROCESSES))
    epoch_at = {step: metrics["epoch"] for step, metrics in steps}
    assert epoch_at[1] == pytest.approx(1 / math.ceil(train_pairs / (BATCH * PROCESSES)), abs=1e-3)

    # The final model is complete, loadable and trained; no staging directory is left behind.
    final = out / "final"
    assert summary["model_dir"] == new_policies[0].model_ref == str(final)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert weights_moved(tiny_model_dir, final)


def test_trl_dpo_cli_trains_on_a_snapshot_directory_as_is(
    cli: Cli, tiny_model_dir: Path, tmp_path: Path
) -> None:
    exported_round(cli, tiny_model_dir, tmp_path / "snap")
    out = tmp_path / "trl-out"
    done = run(trl_command("dpo", tmp_path / "snap", tiny_model_dir, out), tmp_path)
    assert "eval_loss" in done.stdout + done.stderr  # the eval split was found and scored
    assert weights_moved(tiny_model_dir, out)  # trl dpo saved the trained model to --output_dir


def test_a_train_job_goes_only_to_a_train_worker_which_runs_it_under_accelerate_launch(
    cli: Cli, engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    round_id = exported_round(cli, tiny_model_dir, tmp_path / "snap")
    train_pairs = json.loads((tmp_path / "snap" / "manifest.json").read_text())["counts"]["train"]
    out = tmp_path / "run"
    train = ["train", "--round", round_id, "--max-steps", 2, "--batch-size", BATCH, "--lr", "1e-3"]
    job_id = int(cli(*train, "--max-length", 128, "--output", out, "--submit").stdout)
    worker = [sys.executable, "-m", "cai", "--db", cli.db_url, "worker", "--once", "--poll", "0.1"]
    run(worker, tmp_path)  # the default kinds leave training to the machine meant for it
    assert json.loads(cli("jobs", "show", job_id, "--json").stdout)["status"] == "queued"

    config = REPO / "accelerate" / "cpu-ddp.yaml"
    run([*worker, "--kinds", "train", "--accelerate-config", str(config)], tmp_path)
    job = json.loads(cli("jobs", "show", job_id, "--json").stdout)
    assert job["status"] == "succeeded", job
    with session_scope(engine) as session:
        runs = session.scalars(select(TrainingRunRow)).all()
        steps = session.execute(select(TrainingStepRow.step, TrainingStepRow.metrics)).all()
    assert [(r.id, r.status, r.output_policy_id) for r in runs] == [
        (job["result"]["training_run"], "done", job["result"]["policy_id"])
    ]
    assert sorted(step for step, _ in steps) == [1, 2]
    # Two processes trained (as in the accelerate test above): the epoch per step says so.
    epoch_at = {step: metrics["epoch"] for step, metrics in steps}
    assert epoch_at[1] == pytest.approx(1 / math.ceil(train_pairs / (BATCH * PROCESSES)), abs=1e-3)
    assert weights_moved(tiny_model_dir, out / "final")
