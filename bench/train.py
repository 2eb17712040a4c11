"""Training throughput: `train_dpo` with cai's CPU settings against TRL's DPOConfig defaults (made
runnable on CPU by the minimum: float32 instead of bf16, the reference passed explicitly), on the
same snapshot, in one process. The model is a random Llama over the SmolLM2 vocabulary, or with
--embedded the real SmolLM2-135M-Instruct (cai's default policy: 30 layers, where the transformer
body, not the 49k-word output head, dominates a step, as in real use).

    python bench/train.py [--pairs 32] [--hidden 256] [--layers 4] [--embedded]

The pairs are shaped like a `cai demo` round: the shipped prompts under SmolLM2's chat template,
and answers of 15 to 75 words (the demo caps answers at 96 tokens), so lengths vary as they do in
real rounds. Rates count the prompt+completion tokens of every chosen and rejected sequence
trained on, over the whole `train_dpo` call (loading, reference log-probs, steps, saving). Every
run does one epoch. cai's settings run first, as `cai train` runs by default (all weights) and
with the LoRA adapters `cai demo` trains, then TRL's defaults: a first run after the warm-up that
is still slow counts against cai, and glibc's allocator, tuned by cai's runs and then set back
(cai/allocator.py), is no worse for TRL's run than in a fresh process. The CPU target is a ratio
of at least 1.3x.
"""

from __future__ import annotations

import argparse
import json
import random
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
from tests.test_train import write_snapshot  # noqa: E402
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
        group_by_length=trl.train_sampling_strategy == "group_by_length",
        share_prompt=False,  # TRL runs every prompt once per answer
        seed=trl.seed,
        logging_steps=int(trl.logging_steps),
        save_steps=int(trl.save_steps),
        num_train_epochs=1,
        bf16=trl.bf16,
    )


def demo_shaped_pairs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Snapshot rows with the shipped prompts and answers of 15 to 75 words drawn from the prompts'
    own words: what matters to throughput is the lengths, and these vary as a demo round's do."""
    rng = random.Random(seed)
    lines = (REPO / "prompt_sets" / "helpful-harmless.jsonl").read_text(encoding="utf-8").splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines if line.strip()]
    words = sorted({word for prompt in prompts for word in prompt.split()})

    def answer() -> list[dict[str, str]]:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(15, 75)))
        return [{"role": "assistant", "content": text}]

    return [
        {
            "prompt": [{"role": "user", "content": prompts[i % len(prompts)]}],
            "chosen": answer(),
            "rejected": answer(),
            "pair_id": i,
            "principle": "helpfulness",
            "confidence": 0.9,
            "label_source": "judge",
        }
        for i in range(n)
    ]


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
    # 32 pairs (4 steps of 8) keeps --embedded under 10 minutes on a 2-core AVX2 CPU, where a
    # float32 step of TRL's defaults takes ~45 s.
    parser.add_argument("--pairs", type=int, default=32, help="Pairs in the snapshot.")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embedded", action="store_true", help="Train the real embedded model.")
    parser.add_argument(
        "--as-without-bf16",
        action="store_true",
        help="Train as on a CPU without native bf16 (float32 throughout, no bf16 baseline). With "
        "ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 in the "
        "environment, an AVX-512 CPU then computes as an AVX2-only one would.",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    native_bf16 = cpu_has_native_bf16() and not args.as_without_bf16

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
        rows = demo_shaped_pairs(args.pairs)
        snapshot = write_snapshot(tmp / "snapshot", rows, [])
        bf16 = None if native_bf16 else False  # None: cai's own choice for this CPU
        cai = {
            "cai settings": TrainConfig(bf16=bf16),
            "cai settings, LoRA r 16 (as cai demo)": TrainConfig(lora_r=16, lora_alpha=32, bf16=bf16),
        }
        baselines = {"TRL defaults, float32": trl_defaults(tmp / "trl-args", bf16=False)}
        # On a CPU without native bf16 (AVX2 only), bf16 is emulated: several times slower than
        # float32, a baseline nobody would run there, and it alone took over 15 minutes.
        if native_bf16:
            baselines["TRL defaults as shipped (bf16)"] = trl_defaults(tmp / "trl-args", bf16=True)
        tokens = tokens_per_epoch(rows, model_dir, min(TrainConfig().max_length or 10**9, 1024))

        # Warm up (lazy imports, first allocations) outside the timings.
        train_dpo(
            snapshot,
            model_dir,
            tmp / "warmup",
            trl_defaults(tmp / "trl-args", bf16=False).model_copy(update={"max_steps": 1}),
        )
        cai_timings = {name: timed(snapshot, model_dir, tmp / f"cai-{i}", config)
                       for i, (name, config) in enumerate(cai.items())}  # fmt: skip
        timings = {name: timed(snapshot, model_dir, tmp / f"trl-{i}", config)
                   for i, (name, config) in enumerate(baselines.items())}  # fmt: skip

    print(
        f"model: {described}; {args.pairs} pairs, "
        f"{tokens} tokens per epoch; torch threads {torch.get_num_threads()}; "
        f"CPU native bf16: {cpu_has_native_bf16()}"
    )
    if args.as_without_bf16:
        print("as on a CPU without native bf16: float32 throughout")
    if not native_bf16:
        print("TRL defaults as shipped (bf16): skipped, a CPU without native bf16 would only emulate it")

    def settings(config: TrainConfig) -> str:
        bf16 = config.bf16 if config.bf16 is not None else native_bf16
        return (
            f"batch {config.per_device_train_batch_size}, bf16 {bf16}, "
            f"gradient_checkpointing {config.gradient_checkpointing}, "
            f"precompute_ref_log_probs {config.precompute_ref_log_probs}, group_by_length {config.group_by_length}, "
            f"share_prompt {config.share_prompt}"
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
    print(f"bench wall time: {time.perf_counter() - started:.0f} s (target < 600 s on a 2-core CPU)")


if __name__ == "__main__":
    main()
