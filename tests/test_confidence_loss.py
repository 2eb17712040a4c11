"""Per-pair confidence in the DPO loss (cai.confidence_loss through cai.train's trainer), on the
tiny random Llama: confidence 1 is TRL's sigmoid loss exactly, lower confidence pushes less (cDPO)
or weighs less, and a snapshot without confidences trains as before."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOTrainer

from cai.confidence_loss import correction, sigmoid_loss
from cai.train import TrainConfig, dpo_args, dpo_trainer_class, train_dpo
from tests.test_train import FAST, synthetic_pairs, weights, write_snapshot
from tests.tiny_model import smollm2_tokenizer_dir, tiny_model_dir

__all__ = ["smollm2_tokenizer_dir", "tiny_model_dir"]

BETA = 0.1


def make_trainer(model_dir: Path, rows: list[dict[str, Any]], out: Path, mode: str | None) -> Any:
    """TRL's own DPOTrainer (mode None) or cai's with `mode`, on the same model and rows, with cai's
    precomputed reference and no reordering (so both see the same batches)."""
    # float32 on every CPU: with native bf16 (AMX) the default autocasts, and the gradients'
    # proportionality then holds only to bf16 precision (0.7 % off, measured on a Xeon with AMX).
    config = TrainConfig(beta=BETA, group_by_length=False, share_prompt=False, bf16=False, **FAST)
    trainer_class = DPOTrainer if mode is None else dpo_trainer_class(False, False, mode)
    return trainer_class(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=dpo_args(config, out, gpu=False),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )


def batch_of(trainer: Any, indices: list[int]) -> dict[str, Any]:
    """Examples `indices` of the trainer's tokenized train set, collated as its dataloader would."""
    dataset = trainer._remove_unused_columns(trainer.train_dataset)
    return trainer.data_collator([dataset[i] for i in indices])


def loss_and_grads(trainer: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach(), grads


def rows_with(confidences: list[float | None]) -> list[dict[str, Any]]:
    rows = synthetic_pairs(len(confidences))
    for row, confidence in zip(rows, confidences, strict=True):
        row["confidence"] = confidence
    return rows


@pytest.mark.parametrize("mode", ["cdpo", "weight"])
def test_confidence_one_is_trls_sigmoid_loss_exactly(tiny_model_dir: Path, tmp_path: Path, mode: str) -> None:
    rows = rows_with([1.0, 1.0, 1.0, 1.0])
    trl = make_trainer(tiny_model_dir, rows, tmp_path / "trl", None)
    cai = make_trainer(tiny_model_dir, rows, tmp_path / "cai", mode)
    trl_loss, trl_grads = loss_and_grads(trl, batch_of(trl, [0, 1, 2, 3]))
    cai_batch = batch_of(cai, [0, 1, 2, 3])
    assert cai_batch["confidence"].tolist() == [1.0] * 4
    cai_loss, cai_grads = loss_and_grads(cai, cai_batch)
    assert torch.equal(cai_loss, trl_loss)
    assert torch.equal(cai_grads, trl_grads)


def test_lower_confidence_pushes_the_margin_less(tiny_model_dir: Path, tmp_path: Path) -> None:
    """At the start the policy is its reference (margin 0), where TRL's gradient on one pair is
    -beta/2 * grad(margin). cDPO with eps = 1 - p adds eps * beta * grad(margin): the same direction,
    scaled by (1/2 - eps) / (1/2); at p = 0.5 the pair teaches nothing."""
    sure = make_trainer(tiny_model_dir, rows_with([1.0]), tmp_path / "sure", "cdpo")
    _, sure_grads = loss_and_grads(sure, batch_of(sure, [0]))
    for p in (0.8, 0.6, 0.5):
        unsure = make_trainer(tiny_model_dir, rows_with([p]), tmp_path / f"p{p}", "cdpo")
        _, grads = loss_and_grads(unsure, batch_of(unsure, [0]))
        expected = (0.5 - (1 - p)) / 0.5
        assert torch.allclose(grads, expected * sure_grads, atol=1e-6 * float(sure_grads.abs().max()))
    weighted = make_trainer(tiny_model_dir, rows_with([0.75]), tmp_path / "weighted", "weight")
    _, grads = loss_and_grads(weighted, batch_of(weighted, [0]))
    assert torch.allclose(grads, 0.5 * sure_grads, atol=1e-6 * float(sure_grads.abs().max()))  # 2p - 1


def test_correction_moves_the_gradient_toward_the_rejected_answer_as_confidence_falls() -> None:
    margins = torch.tensor([2.0, 0.0, -2.0], requires_grad=True)
    slopes = []
    for p in (1.0, 0.9, 0.7, 0.5):
        loss = sigmoid_loss(margins, BETA) + correction(margins, torch.full((3,), p), "cdpo", BETA).mean()
        (grad,) = torch.autograd.grad(loss, margins)
        slopes.append(grad)
    # Descent raises a margin where the slope is negative; less confidence, less raising.
    for more_sure, less_sure in itertools.pairwise(slopes):
        assert (less_sure > more_sure).all()
    # Missing confidence (NaN) is a hard label; below a coin toss counts as one.
    hard = correction(margins, torch.tensor([float("nan")] * 3), "cdpo", BETA)
    assert torch.equal(hard, torch.zeros(3))
    assert torch.equal(
        correction(margins, torch.full((3,), 0.2), "cdpo", BETA),
        correction(margins, torch.full((3,), 0.5), "cdpo", BETA),
    )


def test_a_snapshot_without_confidences_trains_as_before(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = synthetic_pairs(4)
    for row in rows:
        del row["confidence"]
    snapshot = write_snapshot(tmp_path / "snapshot", rows, [])
    runs = {}
    for mode in ("off", "cdpo"):
        config = TrainConfig(max_steps=2, confidence_loss=mode, **FAST)
        runs[mode] = weights(train_dpo(snapshot, tiny_model_dir, tmp_path / mode, config).model_dir)
    assert runs["off"].keys() == runs["cdpo"].keys()
    assert all(torch.equal(runs["off"][k], runs["cdpo"][k]) for k in runs["off"])
    assert not all(torch.equal(runs["off"][k], weights(tiny_model_dir)[k]) for k in runs["off"])


def test_confidence_loss_refuses_losses_it_cannot_reshape() -> None:
    with pytest.raises(ValueError, match="use loss_type sigmoid alone"):
        TrainConfig(confidence_loss="cdpo", loss_type=["ipo"])
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        TrainConfig(confidence_loss="weight", precompute_ref_log_probs=False)
