"""Embedded judge: judgments per second of the in-process judge (SmolLM2-135M-Instruct, HFChat,
float32 on the CPU) without and with its prefix cache, on the same real pairwise requests, in one
process.

    python bench/embedded_judge.py [--pairs 6] [--max-tokens 48]

The requests are both orders of `--pairs` gold pairs spread over the principles, rendered by
`cai.judge.pairwise_request` from the shipped template and constitution, with `max_tokens` 48 as
`cai demo` judges. Each request runs on both judges back to back, in alternating order, so load
from other processes falls on both alike; each judge is warmed up on another gold pair first.
Printed: both rates and their ratio, how many prompt tokens a request shares with the one before
(what the cache can skip), and whether the two judges gave the same verdicts, rationales and
choice probabilities.

Measured on a shared 2-core CPU (load average 4-6): 0.204 judgments/s without, 0.319 with,
1.56x, 12/12 identical answers. The judge writes ~2 tokens a judgment, so reading the ~630-token
prompt is nearly all the work. prompts/judge_pairwise.jinja puts everything that does not depend
on the pair first (role, instructions, data rules, the principle), so ~200 tokens are shared; the
fence token, derived from the pair's texts, starts the part that differs. (With the principle
after the responses, as before, only 67 tokens were shared: 1.08x.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.judge_servers import gold_requests  # noqa: E402
from cai.backends.base import ChatResult  # noqa: E402
from cai.backends.hf import HFChat, ensure_local_model  # noqa: E402
from cai.registry import EMBEDDED_MODEL, resolve_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6, help="gold pairs to judge (two orders each)")
    parser.add_argument("--max-tokens", type=int, default=48, help="judge reply limit (cai demo's)")
    args = parser.parse_args()

    requests = [request for request, _ in gold_requests(args.pairs, args.max_tokens)]
    # The last gold pair, which the timed set leaves out.
    warm_up = gold_requests(1, args.max_tokens, warm_up=True)[-1][0]
    model_dir = ensure_local_model(resolve_model(EMBEDDED_MODEL))
    judges = {
        "without": HFChat(model_dir, name=EMBEDDED_MODEL, prefix_cache=False),
        "with": HFChat(model_dir, name=EMBEDDED_MODEL, prefix_cache=True),
    }
    cached = judges["with"].prefix
    assert cached is not None, "SmolLM2's cache should be croppable"
    loop = asyncio.new_event_loop()
    for judge in judges.values():
        loop.run_until_complete(judge.complete(warm_up))
    reused_before = cached.reused_tokens

    seconds = dict.fromkeys(judges, 0.0)
    results: dict[str, list[ChatResult]] = {name: [] for name in judges}
    load_before = os.getloadavg()[0]
    for number, request in enumerate(requests):
        names = list(judges) if number % 2 == 0 else list(reversed(judges))
        for name in names:
            started = time.perf_counter()
            results[name].append(loop.run_until_complete(judges[name].complete(request)))
            seconds[name] += time.perf_counter() - started
    load_after = os.getloadavg()[0]
    loop.close()

    rate = {name: len(requests) / total for name, total in seconds.items()}
    without, with_ = results["without"], results["with"]
    prompt_tokens = sum(r.prompt_tokens or 0 for r in with_)
    same_text = sum(a.text == b.text for a, b in zip(without, with_, strict=True))
    drift = max(
        abs(a.choice_probs[c] - b.choice_probs[c])
        for a, b in zip(without, with_, strict=True)
        if a.choice_probs and b.choice_probs
        for c in a.choice_probs
    )
    print(
        f"{len(requests)} judgments ({args.pairs} gold pairs x 2 orders), max_tokens {args.max_tokens}, "
        f"{EMBEDDED_MODEL} float32, torch threads {torch.get_num_threads()}"
    )
    print(
        f"prompt: {prompt_tokens / len(requests):.0f} tokens a judgment, "
        f"{(cached.reused_tokens - reused_before) / len(requests):.0f} of them read from the prefix cache; "
        f"wrote {sum(r.completion_tokens or 0 for r in with_) / len(requests):.0f} tokens a judgment"
    )
    print(
        f"embedded judge: without prefix cache {rate['without']:.3f} judgments/s ({seconds['without']:.1f} s), "
        f"with {rate['with']:.3f} judgments/s ({seconds['with']:.1f} s), "
        f"ratio {rate['with'] / rate['without']:.2f}x"
    )
    print(
        f"same answers: {same_text}/{len(requests)} identical texts (verdict and rationale), "
        f"largest choice-probability difference {drift:.1e}; "
        f"1-minute load average {load_before:.2f} before, {load_after:.2f} after"
    )


if __name__ == "__main__":
    main()
