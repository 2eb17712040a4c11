"""The training stage (cai.train) on a tiny random Llama: DPO moves the weights and reports per-step
metrics, a snapshot feeds TRL's DPOTrainer as is, a killed run resumes, bad input is refused."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from cai.errors import BadInput
from cai.train import (
    TrainConfig,
    dpo_args,
    dpo_trainer_class,
    load_config,
    load_snapshot,
    pair_lengths,
    train_dpo,
    trl_loss_types,
)
from tests.tiny_model import smollm2_tokenizer_dir, tiny_model_dir

# Session fixtures from tests/tiny_model.py (see test_hf_backend.py).
__all__ = ["smollm2_tokenizer_dir", "tiny_model_dir"]

TOPICS = [
    "the moon", "bread", "rivers", "chess", "volcanoes", "jazz", "python", "trains",
    "sleep", "coffee", "glaciers", "poetry", "bees", "robots", "tax law", "origami",
]  # fmt: skip
# Small steps would do on a real model; on the tiny random one a large rate makes changes obvious.
FAST = {"per_device_train_batch_size": 2, "learning_rate": 1e-3, "max_length": 128}


def synthetic_pairs(n: int, start: int = 0) -> list[dict[str, Any]]:
    """Preference rows in the snapshot's format: a helpful answer is chosen over a curt refusal."""
    rows = []
    for i in range(start, start + n):
        topic = TOPICS[i % len(TOPICS)]
        prompt = [{"role": "user", "content": f"Tell me something interesting about {topic}."}]
        if i % 3 == 0:
            prompt.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        rows.append(
            {
                "prompt": prompt,
                "chosen": [
                    {
                        "role": "assistant",
                        "content": f"Happy to! {topic.capitalize()} has a long history, and people who "
                        f"study {topic} keep finding surprising details worth sharing.",
                    }
                ],
                "rejected": [{"role": "assistant", "content": "No. Ask someone else."}],
                "pair_id": i,
                "principle": "helpfulness",
                "confidence": None if i % 4 == 0 else 0.9,
                "label_source": "judge",
            }
        )
    return rows


def write_snapshot(path: Path, train: list[dict[str, Any]], eval: list[dict[str, Any]]) -> Path:
    """A snapshot directory as the export writes it. An empty split gets no file: datasets cannot
    load an empty parquet file."""
    (path / "data").mkdir(parents=True)
    for split, rows in (("train", train), ("eval", eval)):
        if rows:
            pq.write_table(pa.Table.from_pylist(rows), path / "data" / f"{split}-00000-of-00001.parquet")
    (path / "manifest.json").write_text(f'{{"rows": {len(train) + len(eval)}}}')
    return path


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_snapshot(
        tmp_path_factory.mktemp("snapshot"), synthetic_pairs(8), synthetic_pairs(2, start=8)
    )


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


def test_dpo_changes_weights_reports_metrics_and_saves_a_loadable_model(
    tiny_model_dir: Path, snapshot: Path, tmp_path: Path
) -> None:
    logs: list[tuple[int, dict[str, float]]] = []
    result = train_dpo(
        snapshot,
        tiny_model_dir,
        tmp_path / "out",
        TrainConfig(max_steps=3, **FAST),
        on_log=lambda s, m: logs.append((s, m)),
    )
    assert (result.steps, result.resumed, result.model_dir) == (3, False, tmp_path / "out" / "final")

    before, after = weights(tiny_model_dir), weights(result.model_dir)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert not torch.equal(before[name], after[name]), f"{name} did not change"
    assert AutoTokenizer.from_pretrained(result.model_dir).chat_template

    train_logs = [(step, m) for step, m in logs if "loss" in m]
    assert [step for step, _ in train_logs] == [1, 2, 3]
    for _, metrics in train_logs:
        assert {
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
        } <= metrics.keys()
        assert 0.0 <= metrics["rewards/accuracies"] <= 1.0
    # The eval split is scored once, after training, and reported both ways.
    assert any("eval_loss" in m for _, m in logs)
    assert {"train_loss", "eval_loss", "eval_rewards/accuracies"} <= result.metrics.keys()


def test_snapshot_loads_with_load_dataset_and_trains_in_trl_as_is(
    tiny_model_dir: Path, snapshot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # keep ~/.cache clean
    splits = datasets.load_dataset(str(snapshot))
    assert set(splits) == {"train", "eval"}
    assert (splits["train"].num_rows, splits["eval"].num_rows) == (8, 2)
    columns = {"prompt", "chosen", "rejected", "pair_id", "principle", "confidence", "label_source"}
    assert set(splits["train"].column_names) == set(splits["eval"].column_names) == columns
    assert splits["train"][0]["chosen"][0]["role"] == "assistant"

    # The contract users rely on: the splits go straight into TRL, no glue code.
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=DPOConfig(
            output_dir=str(tmp_path / "trl"),
            max_steps=2,
            per_device_train_batch_size=2,
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            report_to="none",
            gradient_checkpointing=False,
        ),
        train_dataset=splits["train"],
        eval_dataset=splits["eval"],
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    assert trainer.train().global_step == 2


class Killed(Exception):
    pass


def test_a_killed_run_resumes_from_its_last_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    # No eval split here: that path is covered too, and each of the three runs is faster.
    snapshot = write_snapshot(tmp_path / "snapshot", synthetic_pairs(4), [])
    config = TrainConfig(max_steps=2, save_steps=1, **FAST)

    def kill_at_step_2(step: int, metrics: dict[str, float]) -> None:
        if step == 2:
            raise Killed  # after step 2's update, before its checkpoint is written

    out = tmp_path / "out"
    with pytest.raises(Killed):
        train_dpo(snapshot, tiny_model_dir, out, config, on_log=kill_at_step_2)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    assert not (out / "final").exists()

    steps: list[int] = []
    result = train_dpo(
        snapshot, tiny_model_dir, out, config, on_log=lambda s, m: "loss" in m and steps.append(s)
    )
    assert result.resumed and result.resumed_from == out / "checkpoint-1"
    assert result.steps == 2
    assert steps == [2]  # continued from the checkpoint: step 1 was not redone
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]  # save_total_limit=1

    # Resuming restores weights, optimizer, scheduler, RNG and data position: the result matches
    # a run that was never interrupted.
    straight = train_dpo(snapshot, tiny_model_dir, tmp_path / "straight", config)
    resumed, uninterrupted = weights(result.model_dir), weights(straight.model_dir)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, msg=name)


def test_grouped_batches_pad_less_and_the_reference_pass_runs_in_length_order(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    rows = synthetic_pairs(32)
    for i, row in enumerate(rows):  # answers of 1 to 32 sentences, both of a pair alike in length
        answer = " ".join([row["chosen"][0]["content"]] * (1 + i % 32))
        row["chosen"][0]["content"], row["rejected"][0]["content"] = answer, " ".join(answer.split()[::-1])
    splits = load_snapshot(write_snapshot(tmp_path / "snapshot", rows[::-1], []))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def trainer(group_by_length: bool) -> Any:
        config = TrainConfig(per_device_train_batch_size=4, max_length=1024, group_by_length=group_by_length)
        return dpo_trainer_class(config.group_by_length, config.share_prompt)(
            model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            args=dpo_args(config, tmp_path / f"grouped-{group_by_length}", gpu=False),
            train_dataset=splits["train"],
            processing_class=tokenizer,
        )

    def padding(batches: list[dict[str, torch.Tensor]]) -> float:
        real = sum(int(batch["attention_mask"].sum()) for batch in batches)
        return 1 - real / sum(batch["attention_mask"].numel() for batch in batches)

    grouped, uniform = trainer(True), trainer(False)
    lengths = pair_lengths(grouped.train_dataset)
    assert lengths == sorted(lengths)  # the reference pass met them shortest first
    # The precomputed reference log-probs stayed with their pairs through the sort.
    by_pair = {
        (tuple(row["prompt_ids"]), tuple(row["chosen_ids"])): row["ref_chosen_logps"]
        for row in uniform.train_dataset
    }
    for row in grouped.train_dataset:
        key = (tuple(row["prompt_ids"]), tuple(row["chosen_ids"]))
        assert row["ref_chosen_logps"] == pytest.approx(by_pair[key], rel=1e-5)

    grouped_batches = list(grouped.get_train_dataloader())
    assert sum(len(batch["input_ids"]) for batch in grouped_batches) == 2 * len(rows)  # each pair once
    assert padding(grouped_batches) < 0.5 * padding(list(uniform.get_train_dataloader()))
    # The order comes from the seed and the epoch: the same for a resumed run, new each epoch.
    sampler = grouped._get_train_sampler()
    first = list(sampler)
    assert list(sampler) == first and sorted(first) == list(range(len(rows)))
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_bad_input_is_refused_with_a_clear_message(tiny_model_dir: Path, tmp_path: Path) -> None:
    incomplete = tmp_path / "incomplete"
    (incomplete / "data").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(synthetic_pairs(2)), incomplete / "data" / "train-00000-of-00001.parquet"
    )
    with pytest.raises(BadInput, match=r"incomplete: not a snapshot \(no manifest.json\)"):
        train_dpo(incomplete, tiny_model_dir, tmp_path / "out", TrainConfig())

    path = tmp_path / "train.yaml"
    path.write_text("beta: 0.2\nlearning_rte: 1.0e-5\nloss_type: [sigmoid, dpo_magic]\n")
    with pytest.raises(BadInput) as excinfo:
        load_config(path)
    assert excinfo.value.problems[0].startswith(f"{path}: loss_type: ")
    assert "unknown loss type dpo_magic" in excinfo.value.problems[0]
    assert excinfo.value.problems[1] == f"{path}: learning_rte: Extra inputs are not permitted"

    path.write_text('{"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}')  # JSON works too
    with pytest.raises(BadInput, match="loss_weights has 1 values for 2 loss types"):
        load_config(path)
    assert load_config(path, loss_weights=[1.0, 0.5], beta=None).loss_weights == [1.0, 0.5]
    assert "sigmoid" in trl_loss_types() and "ipo" in trl_loss_types()


def test_lora_trains_adapters_only_and_saves_a_merged_model(
    tiny_model_dir: Path, snapshot: Path, tmp_path: Path
) -> None:
    result = train_dpo(snapshot, tiny_model_dir, tmp_path / "out", TrainConfig(max_steps=2, lora_r=4, **FAST))
    before, after = weights(tiny_model_dir), weights(result.model_dir)  # merged: a plain model dir
    assert before.keys() == after.keys()
    # Only the adapted linear layers move (merged in as W + BA); embeddings and norms stay put.
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert torch.equal(
        before["model.layers.0.input_layernorm.weight"], after["model.layers.0.input_layernorm.weight"]
    )
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"]
    )


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_tensorboard_logging_writes_the_dpo_metrics(
    tiny_model_dir: Path, snapshot: Path, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainConfig(max_steps=2, report_to=["tensorboard"], **FAST)
    train_dpo(snapshot, tiny_model_dir, tmp_path / "out", config)
    scalars: dict[str, list[int]] = {}
    for events in (tmp_path / "out").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.step for e in accumulator.Scalars(tag))
    assert {"train/loss", "train/rewards/accuracies", "train/rewards/margins"} <= set(scalars)
    assert sorted(scalars["train/loss"]) == [1, 2]
