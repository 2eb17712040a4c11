"""Judge throughput: pairs judged per second by `JudgeRun` (store, claims, retries, batched writes)
against the loopback server with a fixed latency L at concurrency C, beside bare `AsyncOpenAI`
calls under a semaphore of C measured in the same run, and beside the ceiling C/(2L) (two orders
per pair). The server runs in a process of its own, as a real judge server would.

    python bench/judge_throughput.py [--setting low-latency|high-concurrency] [--rounds 2]
    python bench/judge_throughput.py --latency L --concurrency C [--pairs N]

Settings and their targets for cai/bare (issue 12): `low-latency` L=0.05 s, C=32, >= 0.8;
`high-concurrency` L=0.5 s, C=128, >= 0.9. On 2 shared cores both sides are bound by CPU (the
`openai` SDK costs 3-5 ms of it a request), so the ratio mostly compares CPU per request; both
are printed. Machine load drifts, so each round runs bare, cai, cai, bare and the ratio is taken
over the totals.

The bare client is `client.chat.completions.create(**body)` with exactly the body cai sends
(`OpenAIChat.request_body`, after negotiation) and the same client settings, so the same httpx
pool (1000 connections, 100 kept alive idle: neither side reconnects at C=128). cai sends it
through the SDK's `post` and reads the JSON itself (see `create_completion`), which saves about a
third of the SDK's CPU; its runner spends most of that again on rendering, parsing, claims and
writes. Neither side is timed on its first request: cai's settles what the endpoint accepts (a
rerun recalls that from the judge row), the bare one matches it.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import openai  # noqa: E402
from sqlalchemy import Engine  # noqa: E402

from cai.backends.base import ChatBackend, ChatRequest  # noqa: E402
from cai.backends.openai_compat import OpenAIChat  # noqa: E402
from cai.constitution import Constitution, load_constitution  # noqa: E402
from cai.judge import pairwise_request  # noqa: E402
from cai.judging import JudgeOptions, JudgeRun  # noqa: E402
from cai.promptsets import PromptInput  # noqa: E402
from cai.store import judges, queue, repo  # noqa: E402
from cai.store import samples as stored_samples  # noqa: E402
from cai.store.db import ensure_schema, make_engine, session_scope  # noqa: E402
from cai.templates import TemplateSet  # noqa: E402
from tests.fake_openai import FakeOpenAI, prefer_marker  # noqa: E402

CONSTITUTION = REPO / "constitutions/helpful-harmless/v1.yaml"
MODEL = "fake-judge"


@dataclass(frozen=True)
class Setting:
    latency: float
    concurrency: int
    target: float | None
    """cai/bare throughput to reach; None for a setting of one's own."""


SETTINGS = {
    "low-latency": Setting(0.05, 32, 0.8),
    "high-concurrency": Setting(0.5, 128, 0.9),
}


def build_round(db_url: str, pairs: int) -> tuple[Engine, int, int, Constitution]:
    engine = make_engine(db_url)
    ensure_schema(engine)
    loaded = load_constitution(REPO / "constitutions/helpful-harmless/v1.yaml")
    templates = TemplateSet()
    with session_scope(engine) as session:
        record, _ = repo.register_constitution(session, loaded)
        prompts = [
            PromptInput((("user", f"Question number {i}?"),), "train", (), f"bench:{i}") for i in range(pairs)
        ]
        repo.import_prompts(session, prompts, "bench")
        policy = repo.ensure_policy(session, "bench-policy", "bench")
        round_id = repo.create_round(session, record, policy, {"split": "train", "seed": 0}).id
        stored = {p.id: p for p in stored_samples.round_prompts(session, round_id)}
        for prompt_id in stored:
            for index, text in enumerate(("GOOD answer.", "Another answer.")):
                stored_samples.add_response(
                    session,
                    round_id=round_id,
                    prompt_id=prompt_id,
                    policy_id=policy.id,
                    sample_index=index,
                    text=text,
                    sampling={},
                )
        session.flush()
        samples = stored_samples.stored_samples(session, round_id, policy.id)
        for prompt_id in stored:
            stored_samples.add_pairs(
                session, round_id, prompt_id, [(samples[(prompt_id, 0)][0], samples[(prompt_id, 1)][0])]
            )
        config = judges.JudgeConfig(
            "openai", "fake-judge", "pairwise", templates.sha256["judge_pairwise"], {}
        )
        judge_id = judges.ensure_judge(session, config)
        rules_id = judges.ensure_judge(session, judges.RULES_JUDGE)
        checks = queue.check_pair_rules(session, round_id, judge_id, rules_id, loaded.constitution, record.id)
        queue.plan_judgments(
            session,
            round_id,
            judge_id,
            rules_id,
            loaded.constitution,
            record.id,
            record.sha256,
            config.template_sha256,
            0,
            checks,
        )
    return engine, round_id, judge_id, loaded.constitution


def sample_request() -> ChatRequest:
    """A pairwise request like those of `build_round`'s pairs."""
    constitution = load_constitution(CONSTITUTION).constitution
    _, request = pairwise_request(
        TemplateSet(),
        constitution,
        constitution.principles[0],
        [{"role": "user", "content": "Question number 0?"}],
        "GOOD answer.",
        "Another answer.",
        "AB",
    )
    return request


async def bare_sdk(base_url: str, pairs: int, concurrency: int) -> float:
    """Seconds for plain SDK calls under a semaphore, two per pair: what this process can reach."""
    request = sample_request()
    negotiated = OpenAIChat(base_url, MODEL)
    await negotiated.complete(request)
    body = negotiated.request_body(request)
    await negotiated.aclose()
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", timeout=60.0, max_retries=0)
    semaphore = asyncio.Semaphore(concurrency)

    async def one() -> str | None:
        async with semaphore:
            completion = await client.chat.completions.create(**body)
            return completion.choices[0].message.content

    await one()
    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(2 * pairs)))
    elapsed = time.perf_counter() - started
    await client.close()
    return elapsed


def judge_run(
    built: tuple[Engine, int, int, Constitution], backend: ChatBackend, concurrency: int
) -> JudgeRun:
    """The `JudgeRun` `cai judge` would make for a round built by `build_round`."""
    engine, round_id, judge_id, constitution = built
    return JudgeRun(
        engine,
        round_id,
        judge_id,
        constitution,
        backend,
        TemplateSet(),
        JudgeOptions(concurrency=concurrency),
    )


async def judged(
    engine: Engine, round_id: int, judge_id: int, constitution: Constitution, base_url: str, concurrency: int
) -> float:
    """Seconds for `JudgeRun` to judge a round built by `build_round`, every pair in both orders."""
    backend = OpenAIChat(base_url, MODEL)
    await backend.complete(sample_request())
    run = judge_run((engine, round_id, judge_id, constitution), backend, concurrency)
    stats = await run.run()
    await backend.aclose()
    assert stats.failed == 0, stats
    return stats.wall_s


def serve_loopback(latency: float, conn: Connection) -> None:
    """Run the fake server in its own process: a real judge server does not share our GIL."""
    with FakeOpenAI(prefer_marker("GOOD"), latency=latency) as server:
        conn.send(server.base_url)
        conn.recv()  # block until the parent is done


@dataclass
class Side:
    seconds: float = 0.0
    cpu_s: float = 0.0
    pairs: int = 0

    def measure(self, pairs: int, run: Coroutine[Any, Any, float]) -> float:
        """Run `run` (which returns the seconds it timed) on a fresh event loop; its pairs/s."""
        cpu = time.process_time()
        seconds = asyncio.run(run)
        self.cpu_s += time.process_time() - cpu
        self.seconds += seconds
        self.pairs += pairs
        return pairs / seconds

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.cpu_s / (2 * self.pairs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="low-latency")
    parser.add_argument(
        "--latency", type=float, help="seconds per request at the server (L); a custom setting"
    )
    parser.add_argument("--concurrency", type=int, help="requests in flight (C); a custom setting")
    parser.add_argument("--pairs", type=int, default=480, help="pairs per measurement (two requests each)")
    parser.add_argument("--rounds", type=int, default=2, help="bare, cai, cai, bare: this many times")
    args = parser.parse_args()
    preset = SETTINGS[args.setting]
    custom = args.latency is not None or args.concurrency is not None
    setting = Setting(
        preset.latency if args.latency is None else args.latency,
        preset.concurrency if args.concurrency is None else args.concurrency,
        None if custom else preset.target,
    )
    name = "custom" if custom else args.setting
    latency, concurrency = setting.latency, setting.concurrency
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=serve_loopback, args=(latency, child), daemon=True)
    server.start()
    base_url = parent.recv()
    bare, cai = Side(), Side()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs = 0
            for _ in range(args.rounds):
                line = []
                for side in (bare, cai, cai, bare):
                    if side is bare:
                        rate = bare.measure(args.pairs, bare_sdk(base_url, args.pairs, concurrency))
                        line.append(f"bare {rate:.1f}")
                    else:
                        runs += 1
                        built = build_round(f"sqlite:///{tmp}/bench{runs}.db", args.pairs)
                        rate = cai.measure(args.pairs, judged(*built, base_url, concurrency))
                        line.append(f"cai {rate:.1f}")
                print("pairs/s: " + ", ".join(line), flush=True)
    finally:
        parent.send("done")
        server.join(timeout=5)
    ratio = cai.pairs_per_s / bare.pairs_per_s
    ceiling = concurrency / (2 * latency)
    verdict = (
        "no target"
        if setting.target is None
        else (f"target >= {setting.target}: {'met' if ratio >= setting.target else 'NOT met'}")
    )
    print(
        f"setting {name}: L={latency}s C={concurrency}, {args.pairs} pairs x {2 * args.rounds} per side\n"
        f"bare AsyncOpenAI: {bare.pairs_per_s:.1f} pairs/s, {bare.cpu_ms_per_request:.2f} ms CPU a request\n"
        f"cai JudgeRun:     {cai.pairs_per_s:.1f} pairs/s, {cai.cpu_ms_per_request:.2f} ms CPU a request "
        f"(ceiling C/(2L) = {ceiling:.1f}: {cai.pairs_per_s / ceiling:.2f})\n"
        f"cai/bare = {ratio:.2f} ({verdict})"
    )


if __name__ == "__main__":
    main()
