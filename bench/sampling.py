"""Sampling throughput: HFSampler on 16 prompts in one batch against plain transformers
`generate` on the same 16 prompts one at a time (the same model, sampling settings and token
budget), measured in this run on a random Llama over the SmolLM2 vocabulary.

    python bench/sampling.py [--tokens 64] [--hidden 256] [--layers 4]

Rates count the tokens each side actually generated. The target is a ratio of at least 4x.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cai.backends.base import SampleRequest, SamplingParams  # noqa: E402
from cai.backends.hf import HFSampler  # noqa: E402
from tests.tiny_model import build_tiny_model, cached_smollm2_tokenizer  # noqa: E402

TOPICS = [
    "the moon", "bread", "rivers", "chess", "volcanoes", "jazz", "python", "trains",
    "sleep", "coffee", "glaciers", "poetry", "bees", "robots", "tax law", "origami",
]  # fmt: skip


def sequential_generate(sampler: HFSampler, prompts: list[list[int]], params: SamplingParams) -> int:
    """Plain `generate`, one prompt at a time; returns the number of tokens generated."""
    lm, pad = sampler.loaded.lm, sampler.loaded.pad_id
    generated = 0
    for i, prompt in enumerate(prompts):
        torch.manual_seed(i)
        ids = torch.tensor([prompt])
        out = lm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=0,  # generate's default top_k=50 would sample from a different distribution
            max_new_tokens=params.max_new_tokens,
            pad_token_id=pad,
        )
        generated += out.shape[1] - len(prompt)
    return generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="max_new_tokens per prompt")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    # Kept between runs: reading the tokenizer from the GGUF takes ~10 s.
    tokenizer_dir = cached_smollm2_tokenizer(Path(tempfile.gettempdir()) / "cai-bench")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(
            Path(tmp), tokenizer_dir, hidden=args.hidden, layers=args.layers, heads=args.hidden // 32
        )
        sampler = HFSampler(model_dir, batch_size=16)
    params = SamplingParams(max_new_tokens=args.tokens)  # cai's defaults: temperature 0.8, top_p 0.95
    requests = [
        SampleRequest([{"role": "user", "content": f"Write a short story about {topic}."}], seed=i)
        for i, topic in enumerate(TOPICS)
    ]
    prompts = [sampler.loaded.encode_chat(r.messages) for r in requests]

    # Warm up both paths (first-call allocations, lazy imports) outside the timings.
    sampler.sample(requests[:2], SamplingParams(max_new_tokens=4))
    sequential_generate(sampler, prompts[:1], SamplingParams(max_new_tokens=4))

    start = time.perf_counter()
    samples = sampler.sample(requests, params)
    batched_s = time.perf_counter() - start
    batched_tokens = sum(s.completion_tokens or 0 for s in samples)

    start = time.perf_counter()
    sequential_tokens = sequential_generate(sampler, prompts, params)
    sequential_s = time.perf_counter() - start

    batched, sequential = batched_tokens / batched_s, sequential_tokens / sequential_s
    print(
        f"model: random Llama, hidden {args.hidden}, {args.layers} layers, vocab {len(sampler.loaded.tokenizer)}; "
        f"{len(requests)} prompts x up to {args.tokens} tokens, temperature {params.temperature}, "
        f"top_p {params.top_p}; torch threads {torch.get_num_threads()}"
    )
    print(f"batched:    {batched_tokens} tokens in {batched_s:.2f} s (one HFSampler.sample call, batch 16)")
    print(f"sequential: {sequential_tokens} tokens in {sequential_s:.2f} s (16 model.generate calls)")
    print(
        f"sampling: batched {batched:.0f} tok/s, sequential {sequential:.0f} tok/s, "
        f"ratio {batched / sequential:.1f}x (target >= 4x)"
    )


if __name__ == "__main__":
    main()
