"""The supervised stage's training: TRL's SFTTrainer on an SFT snapshot (cai.sft_export), writing a
model directory. Checkpoints, resume, the final save and LoRA work as for DPO (cai.train)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cai.allocator import freed_memory_kept
from cai.config import config_from_file
from cai.errors import BadInput
from cai.trackers import TrackedRun, known_trackers, tensorboard_flag_as_report_to
from cai.train import (
    OnLog,
    TrainResult,
    callbacks,
    check_optional_dependencies,
    load_snapshot,
    lora_config,
    resume_point,
    train_and_save,
    trainer_args,
)


class SftConfig(BaseModel):
    """SFT settings. The defaults are for a short CPU run on a small model: a few dozen revisions
    move a 135M policy at 1e-5 without undoing its instruction tuning."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(default=1e-5, gt=0)
    num_train_epochs: float = Field(default=1.0, gt=0)
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = Field(default=8, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_length: int | None = Field(default=1024, ge=16)
    # Loss on the revision only, as the paper fine-tunes on revisions: the prompt (red-team
    # requests among them) and earlier turns are context, not targets.
    completion_only_loss: bool = True
    lora_r: int | None = Field(default=None, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    seed: int = 0
    logging_steps: int = Field(default=1, ge=1)
    save_steps: int = Field(default=50, ge=1)
    gradient_checkpointing: bool = False  # as TrainConfig's: on a CPU memory is not the limit
    report_to: list[str] = Field(default_factory=list)  # as TrainConfig's: cai.trackers
    bf16: bool | None = None  # as TrainConfig.bf16: None picks bf16 where it is native

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    _known_trackers = field_validator("report_to")(known_trackers)
    _tensorboard_flag = model_validator(mode="before")(tensorboard_flag_as_report_to)


def load_sft_config(path: Path | None = None, **overrides: Any) -> SftConfig:
    """An SftConfig from a YAML or JSON file, with the `overrides` that are not None on top."""
    return config_from_file(SftConfig, path, "sft config", overrides)


def as_prompt_completion(example: dict[str, Any]) -> dict[str, Any]:
    """A `messages` row as TRL's conversational prompt-completion: every turn but the last is the
    prompt, the last (the final revision) the completion, so that the loss can skip the prompt."""
    messages = example["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def sft_args(config: SftConfig, output_dir: Path, *, gpu: bool, tracked: TrackedRun | None = None) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        completion_only_loss=config.completion_only_loss,
        **trainer_args(SFTConfig, config, output_dir, gpu=gpu, tracked=tracked),
    )


def train_sft(
    snapshot_dir: Path,
    policy_dir: Path,
    output_dir: Path,
    config: SftConfig,
    on_log: OnLog | None = None,
    tracked: TrackedRun | None = None,
) -> TrainResult:
    """Fine-tune `policy_dir` on the SFT snapshot's train split (its eval split, if any, is scored
    after training). A rerun resumes from the newest complete checkpoint under `output_dir`; the
    final model and tokenizer land in `output_dir/final`."""
    from cai.sft_export import SFT_FORMAT

    snapshot_dir, policy_dir, output_dir = Path(snapshot_dir), Path(policy_dir), Path(output_dir)
    check_optional_dependencies(config)
    splits = load_snapshot(snapshot_dir, cache_dir=output_dir / "cache", expected_format=SFT_FORMAT)
    splits = {
        name: split.map(as_prompt_completion, remove_columns=split.column_names)
        for name, split in splits.items()
    }

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    gpu = torch.cuda.is_available()
    args = sft_args(config, output_dir, gpu=gpu, tracked=tracked)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    if not tokenizer.chat_template:
        raise BadInput(f"{policy_dir}: the tokenizer has no chat template; SFT on chat data needs one")
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.bfloat16 if gpu else torch.float32)
    last = resume_point(output_dir)
    with contextlib.nullcontext() if gpu else freed_memory_kept():
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=splits["train"],
            eval_dataset=splits.get("eval"),
            processing_class=tokenizer,
            callbacks=callbacks(on_log, tracked),
            peft_config=lora_config(config),
        )
        return train_and_save(trainer, tokenizer, config, "eval" in splits, output_dir, last, on_log)
