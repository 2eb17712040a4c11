"""Judge throughput: pairs judged per second by `JudgeRun` (store, claims, retries, batched writes)
against the loopback server with a fixed latency L at concurrency C, beside the ceiling C/(2L)
(two orders per pair) and beside bare SDK calls at the same concurrency, measured in this run.
The server runs in a process of its own, as a real judge server would.

    python bench/judge_throughput.py [--pairs 480] [--latency 0.5] [--concurrency 32]

The defaults model a real judge (latency well above the client's CPU cost per request). At very
low latency the `openai` SDK's own CPU time (~5 ms a request on this 2-core machine) becomes the
ceiling; the "bare SDK" figure shows where that lies.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cai.backends.openai_compat import OpenAIChat  # noqa: E402
from cai.constitution import load_constitution  # noqa: E402
from cai.judge import pairwise_request  # noqa: E402
from cai.judging import JudgeOptions, JudgeRun  # noqa: E402
from cai.promptsets import PromptInput  # noqa: E402
from cai.store import judges, queue, repo  # noqa: E402
from cai.store import samples as stored_samples  # noqa: E402
from cai.store.db import ensure_schema, make_engine, session_scope  # noqa: E402
from cai.templates import TemplateSet  # noqa: E402
from tests.fake_openai import FakeOpenAI, prefer_marker  # noqa: E402


def build_round(db_url: str, pairs: int) -> tuple[object, int, int, object]:
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


async def bare_sdk(base_url: str, requests: int, concurrency: int) -> float:
    """Requests per second of plain SDK calls under a semaphore: what this process can reach."""
    constitution = load_constitution(REPO / "constitutions/helpful-harmless/v1.yaml").constitution
    _, request = pairwise_request(
        TemplateSet(),
        constitution,
        constitution.principles[0],
        [{"role": "user", "content": "Q?"}],
        "GOOD answer.",
        "Another answer.",
        "AB",
    )
    backend = OpenAIChat(base_url, "fake-judge")
    semaphore = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with semaphore:
            await backend.complete(request)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(requests)))
    elapsed = time.perf_counter() - started
    await backend.aclose()
    return requests / elapsed


async def judged(
    engine: object, round_id: int, judge_id: int, constitution: object, base_url: str, concurrency: int
) -> float:
    backend = OpenAIChat(base_url, "fake-judge")
    run = JudgeRun(
        engine,
        round_id,
        judge_id,
        constitution,
        backend,
        TemplateSet(),
        JudgeOptions(concurrency=concurrency),
    )  # type: ignore[arg-type]
    stats = await run.run()
    await backend.aclose()
    assert stats.failed == 0, stats
    return stats.judged / 2 / stats.wall_s


def _serve(latency: float, conn: Connection) -> None:
    """Run the fake server in its own process: a real judge server does not share our GIL."""
    with FakeOpenAI(prefer_marker("GOOD"), latency=latency) as server:
        conn.send(server.base_url)
        conn.recv()  # block until the parent is done


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=480)
    parser.add_argument("--latency", type=float, default=0.5, help="seconds per request at the server (L)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (C)")
    args = parser.parse_args()
    ceiling = args.concurrency / (2 * args.latency)
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_serve, args=(args.latency, child), daemon=True)
    server.start()
    base_url = parent.recv()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            engine, round_id, judge_id, constitution = build_round(f"sqlite:///{tmp}/bench.db", args.pairs)
            sdk_pairs_per_s = asyncio.run(bare_sdk(base_url, 2 * args.pairs, args.concurrency)) / 2
            pairs_per_s = asyncio.run(
                judged(engine, round_id, judge_id, constitution, base_url, args.concurrency)
            )
    finally:
        parent.send("done")
        server.join(timeout=5)
    print(
        f"judge throughput: {pairs_per_s:.1f} pairs/s at L={args.latency}s C={args.concurrency}; "
        f"ceiling C/(2L) = {ceiling:.1f} -> ratio {pairs_per_s / ceiling:.2f} (target >= 0.9); "
        f"bare SDK calls {sdk_pairs_per_s:.1f} pairs/s -> ratio {pairs_per_s / sdk_pairs_per_s:.2f}"
    )


if __name__ == "__main__":
    main()
