"""Training throughput: `train_dpo` with cai's CPU settings against TRL's DPOConfig defaults (made
runnable on CPU by the minimum: float32 instead of bf16, the reference passed explicitly), on the
same synthetic snapshot, in one process. The model is a random Llama over the SmolLM2 vocabulary,
or with --embedded the real SmolLM2-135M-Instruct (cai's default policy: 30 layers, where the
transformer body, not the 49k-word output head, dominates a step, as in real use).

    python bench/train.py [--pairs 64] [--hidden 256] [--layers 4] [--embedded]

Rates count the prompt+completion tokens of every chosen and rejected sequence trained on, over the
whole `train_dpo` call (loading, reference log-probs, steps, saving). Every run does one epoch.
cai's settings are timed twice: as `cai train` runs by default (all weights), and with the LoRA
adapters `cai demo` trains. The CPU target is a ratio of at least 1.3x. With --embedded the
default is 32 pairs (4 steps a run), so the whole bench stays within 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers import AutoTokenizer  # noqa: E402
from trl import DPOConfig  # noqa: E402

from cai.train import TrainConfig, cpu_has_native_bf16, train_dpo  # noqa: E402
from tests.test_train import synthetic_pairs, write_snapshot  # noqa: E402
from tests.tiny_model import build_tiny_model, cached_smollm2_tokenizer  # noqa: E402


def trl_defaults(tmp: Path, bf16: bool) -> TrainConfig:
    """TRL's DPOConfig defaults expressed as a TrainConfig (one epoch, like cai's run). TRL's own
    default is bf16; with `bf16=False` it is the float32 run that CPUs without native bf16 need."""
    trl = DPOConfig(output_dir=str(tmp), use_cpu=True, bf16=bf16)
    return TrainConfig(
        beta=trl.beta,
        loss_type=trl.loss_type,
        learning_rate=trl.learning_rate,
        per_device_train_batch_size=trl.per_device_train_batch_size,
        gradient_accumulation_steps=trl.gradient_accumulation_steps,
        max_length=trl.max_length,
        precompute_ref_log_probs=trl.precompute_ref_log_probs,
        gradient_checkpointing=trl.gradient_checkpointing,
        seed=trl.seed,
        logging_steps=int(trl.logging_steps),
        save_steps=int(trl.save_steps),
        num_train_epochs=1,
        bf16=trl.bf16,
    )


def tokens_per_epoch(snapshot_rows: list[dict[str, Any]], model_dir: Path, max_length: int) -> int:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    total = 0
    for row in snapshot_rows:
        for side in ("chosen", "rejected"):
            text = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
            total += min(len(tokenizer(text, add_special_tokens=False).input_ids), max_length)
    return total


def timed(snapshot: Path, model_dir: Path, out: Path, config: TrainConfig) -> tuple[float, int]:
    start = time.perf_counter()
    result = train_dpo(snapshot, model_dir, out, config)
    return time.perf_counter() - start, result.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, help="Pairs in the snapshot (default 64; 32 with --embedded).")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embedded", action="store_true", help="Train the real embedded model.")
    args = parser.parse_args()
    args.pairs = args.pairs or (32 if args.embedded else 64)
    native_bf16 = cpu_has_native_bf16()

    # Kept between runs: reading the tokenizer from the GGUF takes ~10 s.
    tokenizer_dir = cached_smollm2_tokenizer(Path(tempfile.gettempdir()) / "cai-bench")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.embedded:
            from cai.backends import policy_location
            from cai.registry import EMBEDDED_MODEL

            model_dir = Path(policy_location(EMBEDDED_MODEL, EMBEDDED_MODEL))
            described = "SmolLM2-135M-Instruct (embedded)"
        else:
            model_dir = build_tiny_model(
                tmp / "model", tokenizer_dir, hidden=args.hidden, layers=args.layers, heads=args.hidden // 32
            )
            described = f"random Llama, hidden {args.hidden}, {args.layers} layers"
        rows = synthetic_pairs(args.pairs)
        snapshot = write_snapshot(tmp / "snapshot", rows, [])
        cai = {
            "cai settings": TrainConfig(),
            "cai settings, LoRA r 16 (as cai demo)": TrainConfig(lora_r=16, lora_alpha=32),
        }
        baselines = {"TRL defaults, float32": trl_defaults(tmp / "trl-args", bf16=False)}
        # On a CPU without native bf16 (AVX2 only), bf16 is emulated: several times slower than
        # float32, a baseline nobody would run there, and it alone took over 15 minutes.
        if native_bf16:
            baselines["TRL defaults as shipped (bf16)"] = trl_defaults(tmp / "trl-args", bf16=True)
        tokens = tokens_per_epoch(rows, model_dir, min(TrainConfig().max_length or 10**9, 1024))

        # Warm up (lazy imports, first allocations) outside the timings.
        train_dpo(snapshot, model_dir, tmp / "warmup", TrainConfig(max_steps=1))
        timings = {name: timed(snapshot, model_dir, tmp / f"trl-{i}", config)
                   for i, (name, config) in enumerate(baselines.items())}  # fmt: skip
        cai_timings = {name: timed(snapshot, model_dir, tmp / f"cai-{i}", config)
                       for i, (name, config) in enumerate(cai.items())}  # fmt: skip

    print(
        f"model: {described}; {args.pairs} pairs, "
        f"{tokens} tokens per epoch; torch threads {torch.get_num_threads()}; "
        f"CPU native bf16: {native_bf16}"
    )
    if not native_bf16:
        print("TRL defaults as shipped (bf16): skipped, this CPU would only emulate bf16")

    def settings(config: TrainConfig) -> str:
        bf16 = config.bf16 if config.bf16 is not None else cpu_has_native_bf16()
        return (
            f"batch {config.per_device_train_batch_size}, bf16 {bf16}, "
            f"gradient_checkpointing {config.gradient_checkpointing}, "
            f"precompute_ref_log_probs {config.precompute_ref_log_probs}"
        )

    for name, (seconds, steps) in timings.items():
        print(
            f"{name}: {seconds:.1f} s, {steps} steps, {tokens / seconds:.0f} tok/s ({settings(baselines[name])})"
        )
    for name, (seconds, steps) in cai_timings.items():
        config = cai[name]
        lora = f", lora_r {config.lora_r}" if config.lora_r else ""
        print(
            f"{name}: {seconds:.1f} s, {steps} steps, {tokens / seconds:.0f} tok/s ({settings(config)}{lora})"
        )
        for baseline, (baseline_s, _) in timings.items():
            print(f"  ratio to {baseline}: {baseline_s / seconds:.2f}x (CPU target >= 1.3x)")


if __name__ == "__main__":
    main()
