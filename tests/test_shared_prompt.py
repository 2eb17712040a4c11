"""The shared-prompt forward (cai/shared_prompt.py) against TRL's own fused forward: the same
log-probs and metrics fields, the same gradients, and TRL's path for batches it does not handle."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

from cai.shared_prompt import pair_layout, share_prompt_forward

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
VOCAB = 97


def tiny(kind: str) -> torch.nn.Module:
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    return Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=False))


def preference_batch(pairs: int, seed: int, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """A batch as TRL's collator builds it, from prompts and answers of varied lengths."""
    rng = random.Random(seed)

    def tokens(low: int, high: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(low, high))]

    examples = [
        {"prompt_ids": tokens(3, 12), "chosen_ids": tokens(1, 9), "rejected_ids": tokens(1, 9)}
        for _ in range(pairs)
    ]
    return DataCollatorForPreference(pad_token_id=0, max_length=max_length)(examples)


def fused_call(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        use_cache=False,
        labels=labels,
        fused_lm_head=True,
    )


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_one_prompt_pass_gives_trl_log_probs_metrics_and_gradients(kind: str) -> None:
    trl_model = tiny(kind).train()
    add_fused_lm_head(trl_model, outputs=OUTPUTS)
    shared_model = copy.deepcopy(trl_model)
    assert share_prompt_forward(shared_model, OUTPUTS)
    assert not share_prompt_forward(shared_model, OUTPUTS), "a second wrap would run the prompts twice over"

    batch = preference_batch(pairs=5, seed=1)
    expected, got = fused_call(trl_model, batch), fused_call(shared_model, batch)
    assert got.log_probs.shape == expected.log_probs.shape
    assert torch.count_nonzero(got.log_probs) == int((batch["completion_mask"][:, 1:] == 1).sum())
    for field in ("log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(got, field), getattr(expected, field), atol=2e-5, rtol=1e-4)
    assert torch.equal(got.is_top1, expected.is_top1)
    torch.testing.assert_close(got.loss, expected.loss, atol=2e-5, rtol=1e-4)

    # A DPO-like objective over the summed log-probs: the gradient reaches every weight, through
    # the prompt's cache from both answers, as it does when the prompt runs twice.
    def objective(output) -> torch.Tensor:
        chosen, rejected = output.log_probs.sum(dim=1).chunk(2)
        return -torch.nn.functional.logsigmoid(chosen - 0.5 * rejected).mean()

    objective(expected).backward()
    objective(got).backward()
    for (name, want), (_, have) in zip(
        trl_model.named_parameters(), shared_model.named_parameters(), strict=True
    ):
        assert want.grad is not None and have.grad is not None, name
        torch.testing.assert_close(have.grad, want.grad, atol=2e-5, rtol=1e-3, msg=name)


def test_batches_it_does_not_handle_take_trl_forward() -> None:
    batch = preference_batch(pairs=3, seed=2)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    assert pair_layout(batch["input_ids"], batch["attention_mask"], labels) is not None

    # Prompts that differ between the two halves (as keep_end truncation can make them).
    swapped = batch["input_ids"].clone()
    swapped[-1, 0] = (swapped[0, 0] % (VOCAB - 1)) + 1 if swapped[-1, 0] == swapped[2, 0] else swapped[2, 0]
    assert pair_layout(swapped, batch["attention_mask"], labels) is None
    # An answer cut away entirely by max_length.
    cut = preference_batch(pairs=3, seed=2, max_length=3)
    cut_labels = cut["input_ids"].masked_fill(cut["completion_mask"] == 0, -100)
    assert pair_layout(cut["input_ids"], cut["attention_mask"], cut_labels) is None
    # Left padding.
    flipped = batch["attention_mask"].flip(1)
    assert pair_layout(batch["input_ids"], flipped, labels) is None

    # Such a batch still gets TRL's answer through the wrapped forward.
    trl_model = tiny("llama").eval()
    add_fused_lm_head(trl_model, outputs=OUTPUTS)
    shared_model = copy.deepcopy(trl_model)
    share_prompt_forward(shared_model, OUTPUTS)
    with torch.no_grad():
        torch.testing.assert_close(
            fused_call(shared_model, cut).log_probs, fused_call(trl_model, cut).log_probs
        )
