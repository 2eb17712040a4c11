"""Rate limits held: a judge with `--rpm R` (and optionally `--tpm T`) at high concurrency against
the loopback server for 60 s, counting the requests the server saw. The target (issue 16): the
achieved requests per minute within 5 % of R over a 60-second run.

    python bench/rate_limit.py [--rpm 300] [--tpm T] [--seconds 60] [--concurrency 64] [--latency 0.05]

The judge is `JudgeRun` (claims, retries, writes), as `cai judge` runs it, on a round built by
bench/judge_throughput.py's `build_round` with more pairs than the limit lets through; it is
stopped after the measured span. The server runs in a process of its own and records when each
request arrived: the span starts at the first arrival. What the limiter allows in a span of S
seconds is `max(1, R/60) + S * R/60` (one second's worth at once, then a steady rate), so the
ideal over 60 s is R plus one second's worth; also shown, the most requests in any 10 s (bound
`max(1, R/60) + 10 * R/60`) and, with --tpm, the estimated tokens per minute against T.
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.judge_throughput import build_round, judge_run  # noqa: E402
from cai.backends.openai_compat import OpenAIChat  # noqa: E402
from cai.backends.ratelimit import estimate_tokens  # noqa: E402
from tests.fake_openai import FakeOpenAI, prefer_marker  # noqa: E402

TOLERANCE = 0.05


def serve_recording(latency: float, conn: Connection) -> None:
    """The loopback server in its own process; sends back (arrival time, estimated tokens) per request."""
    with FakeOpenAI(prefer_marker("GOOD"), latency=latency) as server:
        conn.send(server.base_url)
        conn.recv()  # block until the judge is done
        conn.send([(a.at, estimate_tokens(a.request)) for a in server.arrivals])


async def judge_for(
    seconds: float, base_url: str, built: tuple[Any, ...], concurrency: int, rpm: float, tpm: float | None
) -> int:
    """Judge the round with the limits set until `seconds` have passed; the requests admitted."""
    backend = OpenAIChat(base_url, "fake-judge", rpm=rpm, tpm=tpm)
    run = judge_run(built, backend, concurrency)
    try:
        await asyncio.wait_for(run.run(), seconds)
        raise SystemExit("the round ran out of pairs before the time was up: raise the pairs")
    except TimeoutError:
        pass
    finally:
        await backend.aclose()
    return backend.gate.admitted


def most_within(times: list[float], span: float) -> int:
    best, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= span:
            start += 1
        best = max(best, end - start + 1)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rpm", type=float, default=300.0, help="requests per minute to hold (R)")
    parser.add_argument("--tpm", type=float, help="tokens per minute as well (T)")
    parser.add_argument("--seconds", type=float, default=60.0, help="the measured span")
    parser.add_argument("--concurrency", type=int, default=64, help="judge requests in flight at most")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per request at the server")
    args = parser.parse_args()
    rpm, span = args.rpm, args.seconds
    pairs = int(rpm * span / 60) + 50  # two requests a pair: twice what the span lets through
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=serve_recording, args=(args.latency, child), daemon=True)
    server.start()
    base_url = parent.recv()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            built = build_round(f"sqlite:///{tmp}/bench.db", pairs)
            started = time.perf_counter()
            # A second beyond the span: the span is timed from the first arrival, not from here.
            admitted = asyncio.run(judge_for(span + 1.0, base_url, built, args.concurrency, rpm, args.tpm))
            wall = time.perf_counter() - started
    finally:
        parent.send("done")
        arrivals = sorted(parent.recv())
        server.join(timeout=5)
    first = arrivals[0][0]
    within = [(at, tokens) for at, tokens in arrivals if at - first < span]
    burst = max(1.0, rpm / 60)
    achieved = len(within) * 60 / span
    ideal = burst + rpm * span / 60
    ratio = achieved / rpm
    verdict = "met" if abs(ratio - 1) <= TOLERANCE else "NOT met"
    print(
        f"--rpm {rpm:g} --concurrency {args.concurrency}, server latency {args.latency}s, "
        f"{wall:.1f}s wall, {admitted} requests admitted\n"
        f"requests in the first {span:g}s after the first arrival: {len(within)} "
        f"(the limiter allows {ideal:.0f})\n"
        f"achieved {achieved:.1f} requests/min against --rpm {rpm:g}: {ratio:.3f} "
        f"(target within {TOLERANCE:.0%}: {verdict})\n"
        f"most in any 10s: {most_within([at for at, _ in within], 10.0)} "
        f"(bound {burst + 10 * rpm / 60:.0f})"
    )
    if args.tpm:
        tokens = sum(tokens for _, tokens in within) * 60 / span
        print(f"estimated tokens/min: {tokens:,.0f} against --tpm {args.tpm:,.0f}: {tokens / args.tpm:.3f}")


if __name__ == "__main__":
    main()
