"""A judge pool's throughput: the same round judged through one endpoint and through three, each
endpoint with the same latency and the same concurrency limit, so the ratio shows what the
pool's dispatch delivers of the capacity it adds (ideal: 3x).

    python bench/judge_pool.py [--pairs 120] [--latency 0.2] [--per-endpoint 4]

The judge is `JudgeRun` (claims, retries, writes), as `cai judge` runs it, over a PooledChat of
OpenAIChat backends; each loopback server runs in a process of its own. Each configuration
judges a fresh copy of the same round (bench/judge_throughput.py's `build_round`)."""

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

from bench.judge_throughput import build_round, judge_run  # noqa: E402
from cai.backends.openai_compat import OpenAIChat  # noqa: E402
from cai.backends.pool import PooledChat  # noqa: E402
from tests.fake_openai import FakeOpenAI, prefer_marker  # noqa: E402


def serve(latency: float, conn: Connection) -> None:
    with FakeOpenAI(prefer_marker("GOOD"), latency=latency) as server:
        conn.send(server.base_url)
        conn.recv()  # until the bench is done


async def judge(db_url: str, pairs: int, urls: list[str], per_endpoint: int) -> tuple[float, int]:
    """Seconds to judge a fresh round of `pairs` through a pool of `urls`; judgments stored."""
    built = build_round(db_url, pairs)
    members = [(url, OpenAIChat(url, "fake-judge"), per_endpoint) for url in urls]
    backend = PooledChat(members, "fake-judge")
    # Enough slots that the pool, not the runner, is the limit.
    run = judge_run(built, backend, concurrency=2 * per_endpoint * len(urls))
    started = time.perf_counter()
    stats = await run.run()
    elapsed = time.perf_counter() - started
    await backend.aclose()
    return elapsed, stats.judged


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=120, help="pairs per round (two judgments each)")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per request at each server")
    parser.add_argument("--per-endpoint", type=int, default=4, help="requests in flight per endpoint")
    args = parser.parse_args()
    links, servers, urls = [], [], []
    for _ in range(3):
        parent, child = multiprocessing.Pipe()
        process = multiprocessing.Process(target=serve, args=(args.latency, child), daemon=True)
        process.start()
        links.append(parent)
        servers.append(process)
        urls.append(parent.recv())
    try:
        results = {}
        for count in (1, 3):
            with tempfile.TemporaryDirectory() as tmp:
                results[count] = asyncio.run(
                    judge(f"sqlite:///{tmp}/bench.db", args.pairs, urls[:count], args.per_endpoint)
                )
    finally:
        for link in links:
            link.send("done")
        for process in servers:
            process.join(timeout=5)
    ceiling = args.per_endpoint / args.latency
    for count, (seconds, judged) in results.items():
        print(
            f"{count} endpoint{'s' if count > 1 else ' '}: {judged} judgments in {seconds:.2f}s = "
            f"{judged / seconds:.1f}/s (ceiling {count * ceiling:.1f}/s: {args.per_endpoint} in flight "
            f"x {args.latency}s latency per endpoint)"
        )
    (t1, n1), (t3, n3) = results[1], results[3]
    print(f"throughput, 3 endpoints against 1: {(n3 / t3) / (n1 / t1):.2f}x (ideal 3x)")


if __name__ == "__main__":
    main()
