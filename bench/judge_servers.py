"""Judge servers: judgments per second of the embedded judge (SmolLM2-135M-Instruct) run
in-process by transformers against the same model's GGUF behind llama.cpp's OpenAI-compatible
server, on the same requests, in one process; then the extra requests that structured-output
negotiation costs on a 100-pair `cai judge` round against servers that accept less.

    python bench/judge_servers.py [--pairs 24] [--chunk 1] [--repeats 1] [--max-tokens 384]
                                  [--server-concurrency 1] [--bf16] [--without-logprobs]
    python bench/judge_servers.py --negotiation-only [--round-pairs 100]

Part 1 renders pairwise requests (both orders) from the shipped gold pairs and real templates
with `cai.judge.pairwise_request`, and times each backend over all of them, one request at a
time, as `cai demo` drives either: the in-process judge holds one model behind a lock, and
llama-cpp-python's server runs one request at a time too (a lock around its model), so more in
flight (`--server-concurrency`, with `--chunk` pairs of at least half that) only queues there,
measured: 6 requests took 18.1 s one by one and 21.1 s all at once. `--bf16` adds the
in-process judge in bf16 (cai's CPU default is float32), `--without-logprobs` the server asked
for the verdict's text alone (what cai settles on where logprobs are refused). The backends
take turns chunk by chunk (`--chunk` pairs at a time, in a rotating order, so that load from
other processes falls on all of them alike), `--repeats` times; the median of each backend's
total is printed, with the machine's load average. Loading the model, starting the server and
the negotiation probe are timed apart, before the timed runs. The server needs
`pip install 'llama-cpp-python[server]'`; without it part 1 says why and stops.

Part 2 runs `cai generate` and `cai judge` (as subprocesses, on a fresh SQLite database) against
the loopback server playing three kinds of endpoint: one that takes JSON-schema output (as
vLLM), one that takes only `json_object` and answers a schema with HTTP 500 (as llama.cpp's
server), and one that takes plain text only, and counts the requests beyond two per pair.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cai.backends.base import ChatBackend, ChatRequest, ChatResult  # noqa: E402
from cai.calibrate import default_gold, load_pairs  # noqa: E402
from cai.constitution import load_constitution  # noqa: E402
from cai.judge import ORDERS, ParseError, pairwise_request, parse_pairwise  # noqa: E402
from cai.templates import TemplateSet  # noqa: E402
from tests.fake_openai import FakeOpenAI  # noqa: E402
from tests.test_judging import fresh_policy_then_judge  # noqa: E402

CONSTITUTION = REPO / "constitutions/helpful-harmless/v1.yaml"
SERVER_MODEL = "smollm2-135m-instruct"


# --- part 1: in-process against llama.cpp's server ----------------------------------------------


def gold_requests(pairs: int, max_tokens: int, warm_up: bool = False) -> list[tuple[ChatRequest, str]]:
    """Both orders of `pairs` gold pairs spread over the principles, with each request's order;
    with `warm_up`, the last gold pair alone, which the timed set leaves out (the server would
    otherwise reuse its cached prompt)."""
    constitution = load_constitution(CONSTITUTION).constitution
    gold = load_pairs(default_gold(), "better", "worse", constitution)
    chosen = gold[-1:] if warm_up else gold[: len(gold) - 1 : max(1, (len(gold) - 1) // pairs)][:pairs]
    by_id = {p.id: p for p in constitution.principles}
    templates = TemplateSet()
    requests = []
    for pair in chosen:
        for order in ORDERS:
            _, request = pairwise_request(
                templates,
                constitution,
                by_id[pair.principle],
                [{"role": "user", "content": pair.prompt}],
                pair.better,
                pair.worse,
                order,
                max_tokens,
            )
            requests.append((request, order))
    return requests


async def timed_run(
    backend: ChatBackend, requests: list[tuple[ChatRequest, str]], concurrency: int
) -> tuple[float, list[ChatResult]]:
    """Seconds for every request under a semaphore of `concurrency`, and the results in order."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(request: ChatRequest) -> ChatResult:
        async with semaphore:
            return await backend.complete(request)

    started = time.perf_counter()
    results = await asyncio.gather(*(one(request) for request, _ in requests))
    return time.perf_counter() - started, list(results)


def verdicts(requests: list[tuple[ChatRequest, str]], results: list[ChatResult]) -> list[str | None]:
    """Each result's verdict in the pair's own terms (A: the gold better response), None when
    unparseable: a fast judge whose replies cannot be read judges nothing."""
    found: list[str | None] = []
    for (_, order), result in zip(requests, results, strict=True):
        try:
            found.append(parse_pairwise(result.text, order, result.choice_probs).verdict)
        except ParseError:
            found.append(None)
    return found


def part_one(args: argparse.Namespace) -> None:
    import torch

    from cai.backends import make_judge
    from cai.backends.hf import HFChat, ensure_local_model
    from cai.backends.llamacpp_server import llama_cpp_server, unavailable_reason
    from cai.backends.negotiation import EndpointFeatures
    from cai.backends.openai_compat import OpenAIChat
    from cai.registry import EMBEDDED_MODEL, embedded_gguf, resolve_model

    if (reason := unavailable_reason()) is not None:
        print(f"judge servers: skipped: {reason}")
        return
    requests = gold_requests(args.pairs, args.max_tokens)
    warm_up = gold_requests(1, args.max_tokens, warm_up=True)[:1]
    threads = os.cpu_count() or 1
    print(
        f"{len(requests)} judgments ({args.pairs} gold pairs x 2 orders), max_tokens {args.max_tokens}, "
        f"{threads} CPU threads (torch {torch.get_num_threads()}, llama.cpp {threads}), "
        f"median of {args.repeats}",
        flush=True,
    )

    loop = asyncio.new_event_loop()
    started = time.perf_counter()
    local, _ = make_judge(EMBEDDED_MODEL)  # cai's in-process judge: float32 on a CPU
    loop.run_until_complete(timed_run(local, warm_up, 1))
    local_load = time.perf_counter() - started
    contenders: dict[str, tuple[ChatBackend, int]] = {"in-process float32, C=1": (local, 1)}
    if args.bf16:
        bf16 = HFChat(
            ensure_local_model(resolve_model(EMBEDDED_MODEL)), dtype=torch.bfloat16, name=EMBEDDED_MODEL
        )
        loop.run_until_complete(timed_run(bf16, warm_up, 1))
        contenders["in-process bf16, C=1"] = (bf16, 1)

    started = time.perf_counter()
    with llama_cpp_server(embedded_gguf(), model_alias=SERVER_MODEL, threads=threads) as base_url:
        server_up = time.perf_counter() - started
        remote = OpenAIChat(base_url, SERVER_MODEL, timeout=600.0)
        started = time.perf_counter()
        loop.run_until_complete(timed_run(remote, warm_up, 1))  # settles what the endpoint takes
        probe = time.perf_counter() - started
        contenders[f"llama.cpp server, C={args.server_concurrency}"] = (remote, args.server_concurrency)
        if args.without_logprobs:
            # What cai settles on against a server that refuses logprobs: the verdict's text only.
            settled = EndpointFeatures(remote.features.response_format, True, logprobs=False)
            bare = OpenAIChat(base_url, SERVER_MODEL, timeout=600.0, features=settled)
            contenders[f"llama.cpp, no logprobs, C={args.server_concurrency}"] = (
                bare,
                args.server_concurrency,
            )
        print(
            f"start-up: in-process model load + first judgment {local_load:.1f} s; llama.cpp server "
            f"up in {server_up:.1f} s, first judgment (negotiation included) {probe:.1f} s; "
            f"negotiation: {remote.refusals} extra request(s), settled on {remote.features}",
            flush=True,
        )

        load_before = os.getloadavg()[0]
        seconds: dict[str, list[float]] = {name: [] for name in contenders}
        answers: dict[str, list[str | None]] = {name: [] for name in contenders}
        written: dict[str, list[int]] = {name: [] for name in contenders}
        size = 2 * args.chunk
        chunks = [requests[i : i + size] for i in range(0, len(requests), size)]
        names = list(contenders)
        for repeat in range(args.repeats):
            totals = dict.fromkeys(names, 0.0)
            # Every contender runs each chunk in turn, in a rotating order: load from other
            # processes on a shared machine comes and goes within minutes, and falls on all alike.
            for number, chunk in enumerate(chunks):
                shift = (repeat * len(chunks) + number) % len(names)
                for name in names[shift:] + names[:shift]:
                    backend, concurrency = contenders[name]
                    wall, results = loop.run_until_complete(timed_run(backend, chunk, concurrency))
                    totals[name] += wall
                    if repeat == 0:
                        answers[name] += verdicts(chunk, results)
                        written[name] += [r.completion_tokens or 0 for r in results]
            for name, total in totals.items():
                seconds[name].append(total)
        load_after = os.getloadavg()[0]
        refusals = remote.refusals
        for backend in {backend for backend, _ in contenders.values()}:
            loop.run_until_complete(backend.aclose())
    loop.close()

    baseline = len(requests) / statistics.median(seconds["in-process float32, C=1"])
    for name, walls in seconds.items():
        rate = len(requests) / statistics.median(walls)
        found = answers[name]
        parsed = sum(v is not None for v in found)
        correct = sum(v == "A" for v in found)
        # What each judgment wrote: a reply that runs to max_tokens costs far more than a verdict.
        tokens = written[name]
        print(
            f"  {name:<28} {rate:5.2f} judgments/s ({statistics.median(walls):6.1f} s) -> "
            f"ratio {rate / baseline:.2f} vs in-process float32; wrote {statistics.fmean(tokens):.0f} "
            f"tokens a judgment ({sum(t >= args.max_tokens for t in tokens)} hit max_tokens); "
            f"parsed {parsed}/{len(found)}, picked the gold better response {correct}/{len(found)}"
        )
    print(f"  extra requests the negotiation cost against llama.cpp's server: {refusals}")
    print(f"  1-minute load average {load_before:.2f} before the timed runs, {load_after:.2f} after")


# --- part 2: extra requests on a 100-pair round --------------------------------------------------


def cai(db: str, *args: object) -> str:
    """`cai --db DB ARGS...` in a subprocess, as a user runs it; its stdout."""
    command = [sys.executable, "-m", "cai", "--db", db, *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"cai {' '.join(map(str, args))}: exit {done.returncode}\n{done.stderr}")
    return done.stdout


def part_two(round_pairs: int) -> None:
    endpoints: dict[str, Callable[[], FakeOpenAI]] = {
        "JSON schema (vLLM-like)": lambda: FakeOpenAI(fresh_policy_then_judge()),
        "json_object, schema -> HTTP 500 (llama.cpp-like)": lambda: FakeOpenAI(
            fresh_policy_then_judge(), response_formats=("json_object", "text")
        ),
        "text only": lambda: FakeOpenAI(fresh_policy_then_judge(), response_formats=("text",)),
    }
    print(f"negotiation on a {round_pairs}-pair round (`cai judge`, pairwise, concurrency 16):", flush=True)
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAI(fresh_policy_then_judge()) as policy:
        for number, (name, make) in enumerate(endpoints.items()):
            db = f"sqlite:///{tmp}/round-{number}.db"
            cai(db, "constitution", "register", CONSTITUTION)
            cai(db, "prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
            rounds = []
            for _ in range(2):  # the second round reuses what the first one learned
                round_id = cai(db, "round", "start", "-c", "helpful-harmless@1", "--policy", "fake/policy")
                sampling = ["--limit", round_pairs, "--samples", 2, "--backend", "openai"]
                cai(db, "generate", "-r", round_id.strip(), *sampling, "--base-url", policy.base_url)
                rounds.append(round_id.strip())
            counts = []
            with make() as judge:
                flags = [
                    "--judge-base-url",
                    judge.base_url,
                    "--judge-model",
                    "fake-judge",
                    "--concurrency",
                    16,
                ]
                for round_id in rounds:
                    before = judge.count
                    summary = json.loads(cai(db, "judge", "-r", round_id, *flags, "--json"))
                    asked = judge.count - before
                    counts.append((summary["pairs"], asked, asked - 2 * summary["pairs"], summary["failed"]))
                settled = _settled_format(judge.requests[-1])
            (pairs, asked, extra, failed), (_, _, extra_again, failed_again) = counts
            print(
                f"  {name:<48} {pairs} pairs, {asked} requests for {2 * pairs} judgments: "
                f"+{extra} extra (settled on {settled}); the next round: +{extra_again}; "
                f"failed {failed + failed_again}"
            )


def _settled_format(request: dict[str, Any]) -> str:
    response_format = request.get("response_format") or {"type": "text"}
    kind = str(response_format.get("type"))
    return "json_object with schema" if kind == "json_object" and "schema" in response_format else kind


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=24, help="gold pairs to judge (two orders each)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per backend (median)")
    parser.add_argument("--chunk", type=int, default=1, help="pairs each backend judges in turn")
    parser.add_argument(
        "--server-concurrency",
        type=int,
        default=1,
        help="requests in flight to the server (C; cai judge: 16)",
    )
    parser.add_argument("--max-tokens", type=int, default=384, help="judge reply limit (cai judge's default)")
    parser.add_argument("--bf16", action="store_true", help="also time the in-process judge in bf16")
    parser.add_argument(
        "--without-logprobs", action="store_true", help="also time the server without asking for logprobs"
    )
    parser.add_argument("--round-pairs", type=int, default=100, help="pairs in part 2's round")
    parser.add_argument("--negotiation-only", action="store_true", help="run part 2 only")
    args = parser.parse_args()
    if not args.negotiation_only:
        part_one(args)
    part_two(args.round_pairs)


if __name__ == "__main__":
    main()
