"""The training stage: DPO (TRL's DPOTrainer) on a snapshot directory, writing a model directory."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cai.allocator import freed_memory_kept
from cai.confidence_loss import ConfidenceMode
from cai.config import config_from_file
from cai.errors import BadInput
from cai.trackers import (
    TrackedRun,
    check_installed,
    known_trackers,
    tags_callback,
    tensorboard_flag_as_report_to,
    tracker_args,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel

    from cai.sft import SftConfig

OnLog = Callable[[int, dict[str, float]], None]
SPLITS = ("train", "eval")
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR-<global step>
INCOMPLETE_DIR = "incomplete-checkpoints"
"""Where checkpoints a killed save left half-written are moved, under the run's output dir. Not
`checkpoint-*.something` beside the others: the Trainer's rotation globs `checkpoint-*` and would
delete (or count) them."""

log = logging.getLogger(__name__)


@functools.cache
def trl_loss_types() -> tuple[str, ...]:
    """The loss types the installed TRL accepts. DPOConfig types `loss_type` as `list[str]`; the only
    list of allowed values it carries is its help text, so read the quoted names from there."""
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata.get("help", "")
    return tuple(dict.fromkeys(re.findall(r"`'([a-z_]+)'`", help_text)))


class TrainConfig(BaseModel):
    """DPO settings. The defaults are for a short CPU run on a small model (SmolLM2-135M); the
    numbers behind them come from bench/train.py."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(default=0.1, gt=0)
    loss_type: list[str] = Field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    # TRL's 1e-6 suits long GPU runs; a CPU demo round is a few dozen steps, and 5e-6 moves a 135M
    # policy visibly in that many while staying well inside DPO's stable range at beta 0.1.
    learning_rate: float = Field(default=5e-6, gt=0)
    num_train_epochs: float = Field(default=1.0, gt=0)
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = Field(default=8, ge=1)  # 8 beat 4 per token on CPU (bench)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    # Judged responses are short; 512 bounds the padded batch (TRL's 1024 only adds padding on CPU).
    max_length: int | None = Field(default=512, ge=16)
    lora_r: int | None = Field(default=None, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    # The reference's log-probs are computed once, before training, in inference mode; then no
    # second copy of the model is loaded or run during the steps (half the weights in memory).
    # The FLOPs are the same; bench/train.py measures the whole call against TRL's defaults.
    precompute_ref_log_probs: bool = True
    # Recomputing activations buys memory, not speed; on CPU memory is not the limit (65.9 s with,
    # 65.0 s without, for 10 steps). TRL turns it on by default.
    gradient_checkpointing: bool = False
    # Batches of pairs of similar length, in random order: every sequence in a batch is padded to its
    # longest, and padding is compute thrown away (a demo-shaped round of 64 pairs in batches of 8:
    # 27% of the tokens were padding at random, 13% grouped). The reference pass, which runs in
    # dataset order, runs over the pairs sorted by length. False: TRL's uniformly random batches.
    group_by_length: bool = True
    # Each pair's prompt runs through the model once, for both answers, instead of once per answer
    # (cai/shared_prompt.py); on demo-shaped rounds that skips about a quarter of the tokens.
    # False: TRL's forward over [chosen; rejected] as it stacks them.
    share_prompt: bool = True
    # How each pair's confidence (the judge's probability for the chosen answer, exported per pair)
    # enters the loss: 'off' trains on hard labels; 'cdpo' smooths each pair's label by 1 - p;
    # 'weight' scales each pair's term by 2p - 1 (cai/confidence_loss.py).
    confidence_loss: ConfidenceMode = "off"
    seed: int = 0
    logging_steps: int = Field(default=1, ge=1)
    save_steps: int = Field(default=50, ge=1)  # a checkpoint to resume from; only the latest is kept
    # Experiment trackers TRL reports to: tensorboard, trackio, mlflow, wandb (cai.trackers).
    report_to: list[str] = Field(default_factory=list)
    # None: bf16 on a GPU, and on a CPU with native bf16 (AVX512-BF16 or AMX), where autocast over
    # the float32 weights made a SmolLM2-135M step 1.7x faster (5.0 s -> 2.95 s, fwd+bwd); float32
    # on other CPUs, where bf16 is emulated and slow. True/False force it.
    bf16: bool | None = None

    @field_validator("loss_type", "report_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    _known_trackers = field_validator("report_to")(known_trackers)
    _tensorboard_flag = model_validator(mode="before")(tensorboard_flag_as_report_to)

    @field_validator("loss_type")
    @classmethod
    def _known_loss(cls, value: list[str]) -> list[str]:
        known = trl_loss_types()
        if not value:
            raise ValueError("give at least one loss type")
        unknown = [v for v in value if known and v not in known]
        if unknown:
            raise ValueError(
                f"unknown loss type {', '.join(unknown)}; the installed TRL accepts {', '.join(known)}"
            )
        return value

    @model_validator(mode="after")
    def _weights_match(self) -> TrainConfig:
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} values for {len(self.loss_type)} loss types"
            )
        return self

    @model_validator(mode="after")
    def _confidence_needs_sigmoid(self) -> TrainConfig:
        if self.confidence_loss == "off":
            return self
        if self.loss_type != ["sigmoid"] or (self.loss_weights or [1.0]) != [1.0]:
            raise ValueError(
                f"confidence_loss {self.confidence_loss!r} reshapes the sigmoid DPO loss; use loss_type sigmoid alone"
            )
        if not self.precompute_ref_log_probs:
            raise ValueError(
                f"confidence_loss {self.confidence_loss!r} reads the precomputed reference log-probs; "
                "set precompute_ref_log_probs true"
            )
        return self


def load_config(path: Path | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a YAML or JSON file (JSON is YAML), with `overrides` on top; overrides that
    are None are ignored, so a CLI can pass its unset options through. Raises BadInput naming the
    file and every bad field."""
    return config_from_file(TrainConfig, path, "train config", overrides)


@dataclass(frozen=True)
class TrainResult:
    metrics: dict[str, float]
    """The run's summary (train_loss, train_runtime...) plus eval_* metrics when the snapshot has an eval split."""
    steps: int
    model_dir: Path
    """output_dir/final: the trained model and tokenizer (LoRA runs are merged into the base)."""
    resumed_from: Path | None
    """The checkpoint this run continued from, or None for a fresh run."""

    @property
    def resumed(self) -> bool:
        return self.resumed_from is not None


def load_snapshot(
    snapshot_dir: Path, cache_dir: Path | None = None, expected_format: str | None = None
) -> dict[str, Dataset]:
    """The snapshot's non-empty splits ('train', 'eval') as datasets. Refuses an incomplete or
    altered snapshot (no manifest.json, or files that no longer match it), and one of another
    format than `expected_format` (default: a preference snapshot)."""
    import pyarrow.parquet as pq
    from datasets import load_dataset

    from cai.export import FORMAT, load_manifest

    snapshot_dir = Path(snapshot_dir)
    load_manifest(snapshot_dir, expected_format or FORMAT)

    data_files: dict[str, list[str]] = {}
    for split in SPLITS:
        # datasets cannot load an empty parquet file (0-row row group: "BatchSize must be greater
        # than 0"; no row group: "corresponds to no data"), so leave empty splits out.
        files = [str(f) for f in sorted((snapshot_dir / "data").glob(f"{split}-*.parquet"))]
        if files and sum(pq.ParquetFile(f).metadata.num_rows for f in files) > 0:
            data_files[split] = files
    if "train" not in data_files:
        raise BadInput(f"{snapshot_dir}: the snapshot has no training rows")
    loaded = load_dataset("parquet", data_files=data_files, cache_dir=str(cache_dir) if cache_dir else None)
    return {split: loaded[split] for split in data_files}


def is_main_process() -> bool:
    """False in the other processes of a multi-process launch (`accelerate launch`, torchrun),
    which train but leave the database and console output to rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


def train_dpo(
    snapshot_dir: Path,
    policy_dir: Path,
    output_dir: Path,
    config: TrainConfig,
    reference_dir: Path | None = None,
    on_log: OnLog | None = None,
    tracked: TrackedRun | None = None,
) -> TrainResult:
    """Train `policy_dir` (a transformers model dir with its tokenizer) with DPO on the snapshot's
    train split against the reference (default: the policy itself, the round's starting point).
    Checkpoints go to `output_dir` and a rerun resumes from the latest complete one (incomplete
    ones, from a run killed while saving, are moved aside); the final model and
    tokenizer land in `output_dir/final`. `on_log(step, metrics)` gets every training log (loss,
    rewards/*, logps/*...) and the final eval metrics. `tracked` names and tags the run in the
    trackers of `config.report_to`."""
    snapshot_dir, policy_dir, output_dir = Path(snapshot_dir), Path(policy_dir), Path(output_dir)
    reference_dir = Path(reference_dir) if reference_dir is not None else None
    check_optional_dependencies(config)
    splits = load_snapshot(snapshot_dir, cache_dir=output_dir / "cache")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    # Built before any model is loaded: under `accelerate launch` with DeepSpeed ZeRO-3 the config
    # registers itself with transformers, and from_pretrained then loads the weights already
    # partitioned across the processes instead of a full copy on each.
    args = dpo_args(config, output_dir, gpu=gpu, tracked=tracked)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    if not tokenizer.chat_template:
        raise BadInput(f"{policy_dir}: the tokenizer has no chat template; DPO on chat data needs one")
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=dtype)

    same_reference = reference_dir is None or reference_dir.resolve() == policy_dir.resolve()
    ref_model: PreTrainedModel | None = None
    # Without ref_model TRL would load one from config._name_or_path, except when the policy as
    # loaded here (before a resume restores checkpoint weights) serves as the reference: with
    # LoRA (adapters disabled) or for precomputed log-probs. Then no second copy is needed at all.
    if not (same_reference and (config.lora_r is not None or config.precompute_ref_log_probs)):
        ref_model = AutoModelForCausalLM.from_pretrained(reference_dir or policy_dir, dtype=dtype)

    last = resume_point(output_dir)
    # On a GPU the host's allocator is off the step's path; on a CPU it is on it (cai.allocator).
    with contextlib.nullcontext() if gpu else freed_memory_kept():
        trainer = dpo_trainer_class(config.group_by_length, config.share_prompt, config.confidence_loss)(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=splits["train"],
            eval_dataset=splits.get("eval"),
            processing_class=tokenizer,
            callbacks=callbacks(on_log, tracked),
            peft_config=lora_config(config),
        )
        return train_and_save(trainer, tokenizer, config, "eval" in splits, output_dir, last, on_log)


def resume_point(output_dir: Path) -> Path | None:
    """Create `output_dir` and return the checkpoint a run resumes from: the newest complete one,
    once the main process has moved the incomplete ones aside (the others only read: every
    process skips the same directories)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        set_aside_incomplete_checkpoints(output_dir)
    return last_complete_checkpoint(output_dir)


def train_and_save(
    trainer: Any,
    tokenizer: Any,
    config: TrainConfig | SftConfig,
    evaluate: bool,
    output_dir: Path,
    resume_from: Path | None,
    on_log: OnLog | None,
) -> TrainResult:
    """Run a built trainer (resuming from `resume_from`), score the eval split when `evaluate`,
    and save the model and tokenizer to `output_dir/final`, LoRA merged into it."""
    from transformers import PrinterCallback, ProgressCallback

    merge_lora = config.lora_r is not None
    if merge_lora and _parameters_sharded(trainer):
        # The merge runs on one process over its own copy of the weights; with ZeRO-3 or FSDP
        # that copy is a shard, and the merged model would be silently incomplete.
        raise BadInput(
            "lora_r: LoRA runs are merged on one process, which needs every process to hold the whole "
            "model; use DDP or DeepSpeed ZeRO-2, or train without LoRA under ZeRO-3/FSDP"
        )
    if on_log is not None:
        # The caller shows its own progress; transformers' bar and log printing would repeat it.
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
    metrics = train_then_evaluate(trainer, resume_from, evaluate=evaluate)
    final = save_final(trainer, tokenizer, output_dir, merge_lora=merge_lora)
    return TrainResult(
        metrics=metrics, steps=trainer.state.global_step, model_dir=final, resumed_from=resume_from
    )


def train_then_evaluate(trainer: Any, resume_from: Path | None, *, evaluate: bool) -> dict[str, float]:
    """Train (resuming from `resume_from`), then score the eval split once when `evaluate`; the
    run's summary and eval metrics. The eval runs at the end of training, before the tracker
    integrations close their runs: after `train()` returns, its metrics would open a second run
    in MLflow and trackio."""
    from transformers import TrainerCallback

    eval_metrics: dict[str, Any] = {}

    class EvaluateAtTrainEnd(TrainerCallback):
        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            eval_metrics.update(trainer.evaluate())

    if evaluate:
        trainer.callback_handler.callbacks.insert(0, EvaluateAtTrainEnd())  # before the trackers'
    summary = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return {k: float(v) for k, v in (summary.metrics | eval_metrics).items() if isinstance(v, int | float)}


def checkpoint_complete(checkpoint: Path) -> bool:
    """True when the Trainer finished writing this `checkpoint-N` directory. Trainer._save_checkpoint
    (transformers 5.x) writes the model, then optimizer, scheduler, scaler and RNG state, and
    trainer_state.json last, through a plain open/write; so a trainer_state.json that parses and
    names step N marks a complete checkpoint, and anything less is a save that was cut short. The
    weight files themselves are not checked: under DeepSpeed or FSDP they have other names."""
    match = CHECKPOINT_NAME.match(checkpoint.name)
    if match is None or not checkpoint.is_dir():
        return False
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False  # missing, or cut off mid-write
    return isinstance(state, dict) and state.get("global_step") == int(match.group(1))


def _checkpoints(output_dir: Path) -> list[Path]:
    """The `checkpoint-N` directories under `output_dir`, newest (highest step) first."""
    if not output_dir.is_dir():
        return []
    steps = {p: CHECKPOINT_NAME.match(p.name) for p in output_dir.iterdir()}
    found = [(int(m.group(1)), p) for p, m in steps.items() if m and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint under `output_dir` (what a rerun resumes from), or None."""
    return next((p for p in _checkpoints(Path(output_dir)) if checkpoint_complete(p)), None)


def set_aside_incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """Move every incomplete `checkpoint-N` under `output_dir` into `output_dir/incomplete-checkpoints/`
    (renamed `checkpoint-N.<UTC time>`), so that resuming never picks one and nothing is deleted;
    returns where they went. Call it from one process only."""
    output_dir = Path(output_dir)
    moved = []
    for checkpoint in _checkpoints(output_dir):
        if checkpoint_complete(checkpoint):
            continue
        aside = output_dir / INCOMPLETE_DIR
        aside.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = aside / f"{checkpoint.name}.{stamp}"
        if target.exists():
            target = aside / f"{checkpoint.name}.{stamp}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(checkpoint, target)
        except FileNotFoundError:
            continue  # another process moved it first
        log.warning("%s was incomplete (a save cut short); moved it to %s", checkpoint, target)
        moved.append(target)
    return moved


def cpu_has_native_bf16() -> bool:
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def dpo_args(config: TrainConfig, output_dir: Path, *, gpu: bool, tracked: TrackedRun | None = None) -> Any:
    """The DPOConfig for `config`. Weights stay float32 on a CPU; with bf16 the matmuls run in
    bf16 under autocast (mixed precision), which is what `bf16=True` means with `use_cpu`."""
    from trl import DPOConfig

    return DPOConfig(
        beta=config.beta,
        loss_type=list(config.loss_type),
        loss_weights=config.loss_weights,
        precompute_ref_log_probs=config.precompute_ref_log_probs,
        **trainer_args(DPOConfig, config, output_dir, gpu=gpu, tracked=tracked),
    )


def trainer_args(
    args_class: type,
    config: TrainConfig | SftConfig,
    output_dir: Path,
    *,
    gpu: bool,
    tracked: TrackedRun | None = None,
) -> dict[str, Any]:
    """The arguments DPO and SFT runs share (DPOConfig and SFTConfig are both TrainingArguments)."""
    fields = args_class.__dataclass_fields__  # type: ignore[attr-defined]
    # transformers 5 renamed the option; the old name still works but warns on every run.
    renamed = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {
        "output_dir": str(output_dir),
        "learning_rate": config.learning_rate,
        "num_train_epochs": config.num_train_epochs,
        "max_steps": config.max_steps,
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "per_device_eval_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "max_length": config.max_length,
        renamed: config.gradient_checkpointing,
        "seed": config.seed,
        "logging_steps": config.logging_steps,
        # Checkpoints (model, optimizer, scheduler, RNG) are what a killed run resumes from; one is enough.
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": 1,
        "eval_strategy": "no",  # the eval split is scored once, after training
        "dataloader_num_workers": 0,  # worker processes only add fork and pickling cost on 2 cores
        # One pass over the weights instead of a loop of tensor ops: 84 ms against 272 ms a step
        # for SmolLM2-135M's AdamW update on 2 CPU cores; fused on GPUs too.
        "optim": "adamw_torch_fused",
        **tracker_args(config.report_to, tracked),
        "use_cpu": not gpu,
        "bf16": config.bf16 if config.bf16 is not None else gpu or cpu_has_native_bf16(),
    }


def check_optional_dependencies(config: TrainConfig | SftConfig) -> None:
    check_installed(config.report_to)


def callbacks(on_log: OnLog | None, tracked: TrackedRun | None) -> list[Any] | None:
    """The callbacks cai adds to a trainer: the log forwarder, and the tracker tags."""
    added = ([log_forwarder(on_log)] if on_log else []) + ([tags_callback(tracked)] if tracked else [])
    return added or None


def lora_config(config: TrainConfig | SftConfig) -> Any:
    if config.lora_r is None:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def pair_lengths(dataset: Dataset) -> list[int]:
    """Each tokenized pair's padded length in a DPO batch: its prompt plus its longer completion."""
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    prompt, chosen, rejected = (
        pc.list_value_length(table.column(name)) for name in ("prompt_ids", "chosen_ids", "rejected_ids")
    )
    return pc.add(prompt, pc.max_element_wise(chosen, rejected)).to_pylist()


@functools.cache
def dpo_trainer_class(
    group_by_length: bool, share_prompt: bool, confidence_loss: ConfidenceMode = "off"
) -> type:
    """TRL's DPOTrainer with cai's options (TrainConfig's fields): `group_by_length` sorts the tokenized pairs by
    length (the reference pass then pads little) and draws training batches of similar length;
    `share_prompt` runs each pair's prompt once for both answers; `confidence_loss` lets each pair's
    `confidence` column shape its term of the loss (cai.confidence_loss)."""
    import torch
    from trl import DPOTrainer

    class LengthGroupedSampler(torch.utils.data.Sampler[int]):
        """Pairs drawn at random into groups of up to 50 batches, each group sorted by length and
        cut into batches, and the batches then shuffled: similar lengths share a batch, and
        neither the batches' composition across groups nor their order follows length. A round
        of up to 50 batches is one group. Drawn from the run's seed and the epoch rather than
        the global RNG, so that a resumed run skips into the same order it was cut from."""

        def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
            self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

        def set_epoch(self, epoch: int) -> None:  # called by the Trainer before each epoch
            self.epoch = epoch

        def __len__(self) -> int:
            return len(self.lengths)

        def __iter__(self) -> Iterator[int]:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            drawn = torch.randperm(len(self.lengths), generator=generator).tolist()
            group = 50 * self.batch_size
            batches = []
            for start in range(0, len(drawn), group):
                by_length = sorted(drawn[start : start + group], key=self.lengths.__getitem__)
                batches += [
                    by_length[i : i + self.batch_size] for i in range(0, len(by_length), self.batch_size)
                ]
            order = torch.randperm(len(batches), generator=generator).tolist()
            return (index for b in order for index in batches[b])

    class CaiDPOTrainer(DPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if confidence_loss != "off":
                # Set after TRL's own setup, which precomputes the reference log-probs with the
                # plain collator (it reads the keys it knows and ignores the rest).
                self.data_collator = _with_confidence(self.data_collator)

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            columns: list[str] = list(self._signature_columns or [])
            if confidence_loss != "off" and "confidence" not in columns:
                self._signature_columns = [*columns, "confidence"]  # type: ignore[assignment]

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            from datasets import Dataset

            dataset = super()._prepare_dataset(dataset, *args, **kwargs)
            if not group_by_length or not isinstance(dataset, Dataset):  # a stream has no length
                return dataset
            lengths = pair_lengths(dataset)
            order = sorted(range(len(lengths)), key=lengths.__getitem__)  # stable: ties keep their order
            return dataset.select(order).flatten_indices()

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            if not group_by_length:
                return super()._get_train_sampler(train_dataset)
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(pair_lengths(dataset), batch, self.args.seed)

        # TRL patches the models' forwards (its fused output head) in __init__ and then computes the
        # reference log-probs there; these two methods are the first to run after the patch.
        def _precompute_ref_logps(self, *args: Any, **kwargs: Any) -> Any:
            self._share_prompts()
            return super()._precompute_ref_logps(*args, **kwargs)

        def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
            self._share_prompts()
            confidence = inputs.pop("confidence", None)
            if confidence is None:
                return super()._compute_loss(model, inputs, return_outputs)
            from cai.confidence_loss import correction, sigmoid_loss

            # TRL's forward is observed, not replaced: its outputs give each pair's margin.
            seen: list[Any] = []

            def observed(*args: Any, **kwargs: Any) -> Any:
                outputs = model(*args, **kwargs)
                seen.append(outputs.log_probs)
                return outputs

            result = super()._compute_loss(observed, inputs, return_outputs)
            loss = result[0] if return_outputs else result
            seq_len = inputs["completion_mask"].size(1) - 1
            chosen, rejected = seen[0][:, -seq_len:].sum(dim=1).chunk(2, dim=0)
            margins = (chosen - inputs["ref_chosen_logps"]) - (rejected - inputs["ref_rejected_logps"])
            expected = sigmoid_loss(margins, self.beta)
            if not torch.allclose(loss.detach(), expected.detach(), rtol=1e-4, atol=1e-5):
                raise RuntimeError(
                    f"confidence_loss {confidence_loss!r}: the installed TRL's DPO loss ({loss.item():.6f}) is not "
                    f"the sigmoid loss of its margins ({expected.item():.6f}); this TRL release computes it "
                    "differently, so confidence cannot be applied. Train with confidence_loss 'off'."
                )
            loss = (
                loss + correction(margins, confidence.to(margins.device), confidence_loss, self.beta).mean()
            )
            return (loss, *result[1:]) if return_outputs else loss

        def _share_prompts(self) -> None:
            if not share_prompt or getattr(self, "_cai_prompts_shared", False):
                return
            from accelerate.utils import is_peft_model

            from cai.shared_prompt import share_prompt_forward

            self._cai_prompts_shared = True
            # The fields TRL's DPOTrainer asks its fused head for (the loss, then its metrics).
            outputs: tuple[str, ...] = ("log_probs", "entropy", "mean_logits", "is_top1")
            if self.use_weighting:
                outputs += ("log_sum_sq_probs",)
            model: Any = self.model
            share_prompt_forward(model.get_base_model() if is_peft_model(model) else model, outputs)
            if self.ref_model is not None:
                share_prompt_forward(self.ref_model, ("log_probs",))

    return CaiDPOTrainer


def _with_confidence(collate: Any) -> Any:
    """`collate` that also stacks each pair's `confidence` (NaN where a label has none)."""
    import torch

    def collate_with_confidence(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(examples)
        values = [example.get("confidence") for example in examples]
        batch["confidence"] = torch.tensor([float("nan") if v is None else float(v) for v in values])
        return batch

    return collate_with_confidence


def log_forwarder(on_log: OnLog) -> Any:
    """A TrainerCallback handing each training log (and the final eval) to `on_log`; the end-of-run
    summary (train_runtime...) goes into TrainResult.metrics instead."""
    from transformers import TrainerCallback

    class LogForwarder(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            if logs and "train_runtime" not in logs:
                on_log(
                    state.global_step, {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
                )

    return LogForwarder()


def _parameters_sharded(trainer: Any) -> bool:
    """True when no single process holds the whole model: DeepSpeed ZeRO-3 or FSDP."""
    state = trainer.accelerator.state
    deepspeed = getattr(state, "deepspeed_plugin", None)
    return getattr(state, "fsdp_plugin", None) is not None or (
        deepspeed is not None and deepspeed.zero_stage == 3
    )


def save_final(trainer: Any, tokenizer: Any, output_dir: Path, *, merge_lora: bool) -> Path:
    """Write the trained model and tokenizer to `output_dir/final` from any number of processes.
    Every process must call this: under ZeRO-3 or FSDP the weights are gathered collectively, so
    each one joins `save_model`. Only the main process writes, into a staging dir whose path all
    processes agree on, and then swaps it in: `final` is only ever complete. No process returns
    before `final` exists."""
    accelerator = trainer.accelerator
    main = accelerator.is_main_process
    final = output_dir / "final"
    staging = output_dir / ".final.staging"  # a fixed name: every process must pass the same path
    if main:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    try:
        if merge_lora:
            # A plain model dir (adapters merged into the base) that every backend loads as is.
            # LoRA is refused under sharded training, so the main process holds every weight.
            if main:
                merged = accelerator.unwrap_model(trainer.model).merge_and_unload()
                merged.save_pretrained(staging)
        else:
            trainer.save_model(str(staging))  # collective; writes on the main process only
        if main:
            tokenizer.save_pretrained(staging)  # the tokenizer the policy came with, chat template included
            if not any(staging.glob("model*.safetensors")):
                # ZeRO-3 without 16-bit gathering leaves only sharded DeepSpeed checkpoint files.
                raise BadInput(
                    f"{staging}: no model weights were written; with DeepSpeed ZeRO-3 set "
                    "zero3_save_16bit_model: true in the accelerate config"
                )
            _swap_in(staging, final)
    finally:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _swap_in(source: Path, target: Path) -> None:
    """Replace `target` with the complete directory `source` by renames, so `target` is never partial."""
    old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if target.exists():
            os.rename(target, old)
        os.rename(source, target)
    finally:
        shutil.rmtree(old, ignore_errors=True)
