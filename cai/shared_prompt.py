"""Each DPO pair's prompt through the model once, for both of its answers.

TRL's DPOTrainer stacks a batch as [chosen rows; rejected rows], each row the prompt followed by
an answer, and runs the model over all of it: every prompt twice. On demo-shaped rounds prompts
are about a quarter of those tokens. `share_prompt_forward` wraps the forward TRL gave the model
(`add_fused_lm_head`): it runs the prompts once, keeps their key/value cache (with its graph, so
gradients flow back through both answers), runs the answers against that cache at the positions
they had, and projects through the output head only the answer tokens that are scored. TRL's
chunked kernel (`trl.kernels.ChunkedLogProbFunction`) does that projection, as in TRL's forward,
so the outputs are the same fields in the same layout: `(rows, length - 1)`, zero off the answers.

A batch that is not laid out that way (answers missing, a prompt that differs between the two
halves, extra model inputs such as token types) goes to TRL's forward unchanged, and so does a
model that cannot take the cache in training (gradient checkpointing), whose head is scaled, or
whose head carries an adapter.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass
from typing import Any

import torch

# Forward arguments this path understands; anything else (images, token types) means the batch
# is not plain text pairs, and TRL's forward handles it.
_PLAIN_INPUTS = {"input_ids", "attention_mask", "use_cache"}


@dataclass(frozen=True)
class PairLayout:
    """Where the prompt and answer of each row lie, for a batch TRL stacked as [chosen; rejected]."""

    prompt_lengths: torch.Tensor  # (rows,) tokens before the first scored one
    answer_lengths: torch.Tensor  # (rows,) scored tokens, from prompt_length on


def pair_layout(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> PairLayout | None:
    """The layout of a [chosen; rejected] batch whose rows are flush left (prompt, then answer,
    then padding), or None if the batch is anything else."""
    rows, length = input_ids.shape
    if rows % 2 or rows == 0:
        return None
    positions = torch.arange(length, device=input_ids.device)
    lengths = attention_mask.sum(dim=1)
    if not torch.equal(attention_mask.bool(), positions < lengths[:, None]):
        return None  # not flush left
    scored = labels != -100
    prompt_lengths = scored.int().argmax(dim=1)
    answer_lengths = lengths - prompt_lengths
    if not bool((prompt_lengths > 0).all() and (answer_lengths > 0).all()):
        return None  # an answer cut away by max_length, or a row with no prompt
    expected = (positions >= prompt_lengths[:, None]) & (positions < lengths[:, None])
    if not torch.equal(scored, expected):
        return None  # scored tokens are not exactly the answer
    half = rows // 2
    if not torch.equal(prompt_lengths[:half], prompt_lengths[half:]):
        return None
    in_prompt = positions < prompt_lengths[:half, None]
    if not bool(((input_ids[:half] == input_ids[half:]) | ~in_prompt).all()):
        return None  # the two halves are not the same prompts in the same order
    return PairLayout(prompt_lengths=prompt_lengths, answer_lengths=answer_lengths)


def _head_is_plain(model: Any) -> bool:
    """True when the logits are the head's projection as is, the only case handled here."""
    config = model.config.get_text_config()
    scales = (
        "final_logit_softcapping",
        "logit_scale",
        "output_multiplier",
        "lm_head_multiplier",
        "logits_scaling",
    )
    return all(getattr(config, name, None) in (None, 1.0) for name in scales)


def share_prompt_forward(model: Any, outputs: tuple[str, ...]) -> bool:
    """Wrap `model.forward`, as patched by TRL's `add_fused_lm_head` with these `outputs`, so that
    fused calls on [chosen; rejected] batches run each prompt once. Returns whether it did (a
    second call, or a model this path does not handle, leaves the forward as it is)."""
    if not hasattr(model, "base_model_prefix") or getattr(model, "_cai_shares_prompts", False):
        return False  # a wrapper (a DeepSpeed engine), or wrapped already
    if not _head_is_plain(model):
        return False
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput

    fused_forward = model.forward
    backbone_forward = getattr(model, model.base_model_prefix).forward
    # transformers 5.2x renamed `past_key_values` to `cache`, in the arguments and the outputs.
    cache_field = "cache" if "cache" in inspect.signature(backbone_forward).parameters else "past_key_values"

    def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None, **kwargs: Any) -> Any:
        plain = fused_lm_head and not args and set(kwargs) <= _PLAIN_INPUTS and "attention_mask" in kwargs
        # An adapted head (LoRA on lm_head) is more than its weight: TRL's forward handles it.
        plain = plain and type(self.get_output_embeddings()) is torch.nn.Linear
        # Checkpointed layers drop the cache in training; the prompt could not be kept.
        checkpointed = self.training and any(
            getattr(m, "gradient_checkpointing", False) for m in self.modules()
        )
        layout = (
            pair_layout(kwargs["input_ids"], kwargs["attention_mask"], labels)
            if plain and not checkpointed
            else None
        )
        if layout is None:
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)

        input_ids = kwargs["input_ids"]
        rows, length = input_ids.shape
        half = rows // 2
        device = input_ids.device
        backbone = getattr(self, self.base_model_prefix)
        prompt_lengths, answer_lengths = layout.prompt_lengths, layout.answer_lengths

        # The prompts, once: right-padded to the longest, the padding masked out.
        prompt_width = int(prompt_lengths.max())
        prompt_mask = (torch.arange(prompt_width, device=device) < prompt_lengths[:half, None]).long()
        prompt = backbone(
            input_ids=input_ids[:half, :prompt_width], attention_mask=prompt_mask, use_cache=True
        )
        # The hidden state at a prompt's last token scores the answer's first token.
        last_prompt_state = prompt.last_hidden_state[
            torch.arange(half, device=device), prompt_lengths[:half] - 1
        ]
        cache = getattr(prompt, cache_field)
        cache.reorder_cache(torch.arange(half, device=device).repeat(2))  # one copy per answer, grads kept

        # The answers against that cache, at the positions they hold in the full rows.
        answer_width = int(answer_lengths.max())
        offsets = torch.arange(answer_width, device=device)
        position_ids = prompt_lengths[:, None] + offsets
        answer_ids = input_ids.gather(1, position_ids.clamp(max=length - 1))
        answer_mask = offsets < answer_lengths[:, None]
        answers = backbone(
            input_ids=answer_ids,
            attention_mask=torch.cat((prompt_mask.repeat(2, 1), answer_mask.long()), dim=1),
            position_ids=position_ids,
            **{cache_field: cache},
            use_cache=True,
        )
        # Answer token j is scored from the state before it: the prompt's last for j = 0.
        states = torch.cat(
            (last_prompt_state.repeat(2, 1)[:, None], answers.last_hidden_state[:, :-1]), dim=1
        )
        lm_head = self.get_output_embeddings()
        per_token = ChunkedLogProbFunction.apply(
            states[answer_mask],
            lm_head.weight,
            lm_head.bias,
            answer_ids[answer_mask],
            1.0,
            32768,
            None,
            1.0,
            outputs,
        )
        # Back into TRL's layout: label position q is scored at q - 1, row-major like the mask.
        shifted_scored = (labels != -100)[:, 1:]
        log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
            None if x is None else x.new_zeros(shifted_scored.shape).masked_scatter(shifted_scored, x)
            for x in per_token
        )
        assert log_probs is not None  # always computed
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / shifted_scored.sum().clamp(min=1),
            log_probs=log_probs,
            entropy=entropy,
            log_sum_sq_probs=log_sum_sq_probs,
            mean_logits=mean_logits,
            is_top1=is_top1,
            label_mask=shifted_scored,
        )

    model.forward = types.MethodType(forward, model)
    model._cai_shares_prompts = True
    return True
