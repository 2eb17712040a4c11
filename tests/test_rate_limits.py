"""Rate limits per endpoint (--rpm, --tpm) and the endpoint-wide pause of a 429 with Retry-After,
over real HTTP against the loopback server (tests/fake_openai.py), whose arrival times are the
yardstick. Only upper bounds on what arrives in a window are asserted, with slack on the side
that a loaded machine cannot break: delays only spread requests out, except for requests the
network holds back and delivers together, which is what SLACK_S allows for."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from cai.backends.base import ChatRequest, SampleRequest, SamplingParams
from cai.backends.openai_compat import OpenAIChat, OpenAISampler
from cai.backends.ratelimit import EndpointGate, estimate_tokens
from cai.store.db import session_scope
from cai.store.models import JudgmentRow, LabelRow, PairRow
from tests import fake_openai as fake
from tests.conftest import REPO, Cli, deadline
from tests.test_judging import fresh_policy_then_judge

SLACK_S = 1.0
"""How much later than sent a request may be seen to arrive, relative to the others."""
WINDOWS_S = (0.5, 1.0, 2.0)


@pytest.fixture(autouse=True)
def fail_if_hung() -> Iterator[None]:
    with deadline(90):
        yield


def bucket_bound(per_minute: float, window_s: float) -> float:
    """The most a per-second bucket (cai.backends.ratelimit.SteadyRate) admits in
    `window_s` seconds, widened by SLACK_S: its capacity, plus what drains in the window."""
    return max(1.0, per_minute / 60) + (window_s + SLACK_S) * per_minute / 60


def most_in_window(arrivals: list[fake.Arrival], window_s: float, weight: Any = lambda a: 1) -> float:
    """The largest total `weight` of arrivals within any `window_s` seconds."""
    times = sorted(arrivals, key=lambda a: a.at)
    best, total, start = 0.0, 0.0, 0
    for arrival in times:
        total += weight(arrival)
        while arrival.at - times[start].at > window_s:
            total -= weight(times[start])
            start += 1
        best = max(best, total)
    return best


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def ask_all(backend: OpenAIChat, requests: list[ChatRequest]) -> None:
    async def go() -> None:
        try:
            await asyncio.gather(*(backend.complete(request) for request in requests))
        finally:
            await backend.aclose()

    asyncio.run(go())


# -- the backends


def test_rpm_bounds_the_requests_in_every_window() -> None:
    rpm = 600.0  # 10 a second, 10 at once: 40 requests take 3 s, where unlimited they take 0.1
    with fake.FakeOpenAI() as server:
        backend = OpenAIChat(server.base_url, "fake-judge", rpm=rpm)
        ask_all(backend, [ChatRequest(user(f"question {i}")) for i in range(40)])
        arrivals = server.arrivals
    assert len(arrivals) == 40 and backend.gate.admitted == 40
    for window in WINDOWS_S:
        assert most_in_window(arrivals, window) <= bucket_bound(rpm, window), window


def test_tpm_bounds_the_tokens_in_every_window() -> None:
    """Requests below and above the bucket's size (2000 tokens): a large one waits as long as its
    size asks for, a bucketful at a time."""
    tpm = 120_000.0
    requests = [
        ChatRequest(user("x" * (1600 if i % 2 else 8000)), max_tokens=96 if i % 2 else 900) for i in range(8)
    ]
    with fake.FakeOpenAI() as server:
        backend = OpenAIChat(server.base_url, "fake-judge", tpm=tpm)
        ask_all(backend, requests)
        arrivals = server.arrivals
    sizes = sorted(estimate_tokens(a.request) for a in arrivals)
    assert sizes[0] == 400 + 4 + 96 and sizes[-1] == 2000 + 4 + 900  # both sides of 2000
    assert backend.gate.charged_tokens == sum(sizes)
    for window in WINDOWS_S:
        tokens = most_in_window(arrivals, window, lambda a: estimate_tokens(a.request))
        assert tokens <= bucket_bound(tpm, window), window


def test_a_reply_longer_than_its_estimate_is_charged_to_the_next_request() -> None:
    long_reply = " ".join(["word"] * 3000)  # the loopback server counts a token per word
    tpm = 60_000.0  # 1000 tokens a second, 1000 at once
    with fake.FakeOpenAI(lambda request: long_reply) as server:
        backend = OpenAIChat(server.base_url, "fake-judge", tpm=tpm)
        request = ChatRequest(user("short question"), max_tokens=16)
        estimate = estimate_tokens(backend.request_body(request))

        async def go() -> float:
            started = time.monotonic()
            try:
                await backend.complete(request)
                assert backend.gate.charged_tokens == estimate
                await backend.complete(request)
            finally:
                await backend.aclose()
            return started

        started = asyncio.run(go())
        second = server.arrivals[1].at
    used = 2 + 3000  # the server's usage: words of the prompt and of the reply
    assert backend.gate.charged_tokens == estimate + used
    # The debt was paid before the second request went out: what exceeded the bucket drained first.
    assert second - started >= (estimate + used - 1000) / 1000


def test_the_sampler_keeps_its_rpm_from_one_batch_to_the_next() -> None:
    rpm = 300.0
    with fake.FakeOpenAI(fake.with_draws(lambda request, draws: f"answer {next(draws)}")) as server:
        sampler = OpenAISampler(server.base_url, "fake/policy", concurrency=16, rpm=rpm)
        # Each `sample` call runs an event loop of its own, as `cai generate` makes one per batch:
        # a bucket that started afresh in each would let all 20 through at once.
        for batch in range(10):
            sampler.sample([SampleRequest(user(f"q{batch}-{i}"), seed=i) for i in range(2)], SamplingParams())
        arrivals = server.arrivals
    assert len(arrivals) == 20 and sampler.gate.admitted == 20
    for window in WINDOWS_S:
        assert most_in_window(arrivals, window) <= bucket_bound(rpm, window), window


def test_a_gate_refuses_limits_that_are_not_positive() -> None:
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="rpm must be a positive number"):
            EndpointGate(rpm=bad)
        with pytest.raises(ValueError, match="tpm must be a positive number"):
            EndpointGate(tpm=bad)


# -- cai judge and cai generate


def is_judge(arrival: fake.Arrival) -> bool:
    return "<<<RESPONSE A " in fake.prompt_text(arrival.request)


def start_round(cli: Cli, server: fake.FakeOpenAI, limit: int, *generate: object) -> int:
    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    round_id = int(cli("round", "start", "-c", "helpful-harmless@1", "--policy", "fake/policy").stdout)
    args = ["--backend", "openai", "--base-url", server.base_url, "--limit", limit, "--samples", 3]
    cli("generate", "--round", round_id, *args, *generate)
    return round_id


def judge(cli: Cli, server: fake.FakeOpenAI, round_id: int, *extra: object) -> dict[str, Any]:
    args = ["--judge-base-url", server.base_url, "--judge-model", "fake-judge", "--json", *extra]
    return json.loads(cli("judge", "--round", round_id, *args).stdout)  # type: ignore[attr-defined]


def assert_labelled_exactly_once(engine: Engine, server: fake.FakeOpenAI, summary: dict[str, Any]) -> None:
    """Every pair has one label, every judgment is done, and the server was asked once per
    judgment (plus once per 429 it answered)."""
    assert summary["pairs"] > 0 and summary["labeled"] == summary["pairs"]
    assert summary["failed"] == summary["pending"] == 0
    with session_scope(engine) as session:
        llm = select(func.count()).select_from(JudgmentRow).where(JudgmentRow.template_sha256 != "0" * 64)
        judgments = session.scalar(llm) or 0
        assert session.scalar(llm.where(JudgmentRow.status != "ok")) == 0
        pairs = session.scalar(select(func.count()).select_from(PairRow))
        labelled = session.execute(select(LabelRow.pair_id, func.count()).group_by(LabelRow.pair_id)).all()
    assert len(labelled) == pairs and {count for _, count in labelled} == {1}
    asked = [a for a in server.arrivals if is_judge(a)]
    refused = sum(a.fault is not None for a in asked)
    assert len(asked) == judgments + refused


def test_cai_judge_holds_rpm_and_tpm_and_labels_every_pair_once(
    cli: Cli, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 10 requests and 10000 tokens (about 12 judge requests) a second: either binds alone.
    rpm, tpm = 600.0, 600_000.0
    monkeypatch.setenv("CAI_JUDGE_TPM", str(tpm))  # the environment sets one, the flag the other
    with fake.FakeOpenAI(fresh_policy_then_judge()) as server:
        round_id = start_round(cli, server, 6)
        summary = judge(cli, server, round_id, "--rpm", rpm, "--concurrency", 32)
        assert_labelled_exactly_once(engine, server, summary)
        asked = [a for a in server.arrivals if is_judge(a)]
    assert len(asked) >= 30
    for window in WINDOWS_S:
        assert most_in_window(asked, window) <= bucket_bound(rpm, window), window
        tokens = most_in_window(asked, window, lambda a: estimate_tokens(a.request))
        assert tokens <= bucket_bound(tpm, window), window


def test_a_429_with_retry_after_pauses_every_request_to_the_endpoint(cli: Cli, engine: Engine) -> None:
    pause_s = 2.5
    # At 0.25 s a reply and 3 at once, the round's judge requests after the 429 would take about
    # 2 s: without the pause they would keep arriving throughout it.
    with fake.FakeOpenAI(fresh_policy_then_judge()) as server:
        round_id = start_round(cli, server, 6)
        server.latency = 0.25
        judged = itertools.count(1)
        lock = threading.Lock()

        def fault_for(request: dict[str, Any]) -> fake.Fault | None:
            if "<<<RESPONSE A " not in fake.prompt_text(request):
                return None
            with lock:
                nth = next(judged)
            return fake.status(429, retry_after=pause_s) if nth == 10 else None

        server.fault_for = fault_for
        summary = judge(cli, server, round_id, "--concurrency", 3)
        assert_labelled_exactly_once(engine, server, summary)
        asked = sorted((a for a in server.arrivals if is_judge(a)), key=lambda a: a.at)
    refused = [a for a in asked if a.fault is not None]
    assert len(refused) == 1
    at = refused[0].at
    # Requests already on their way when the 429 came back may arrive just after it; none may be
    # sent until the pause is over, which began once the client read the 429 (after `at`).
    held = [round(a.at - at, 3) for a in asked if at + SLACK_S <= a.at < at + pause_s]
    assert held == []
    later = [a for a in asked if a.at >= at + pause_s]
    assert len(later) >= 10  # the rest of the round, the refused request again among them
    assert fake.prompt_text(refused[0].request) in {fake.prompt_text(a.request) for a in later}


def test_cai_generate_holds_its_rpm(cli: Cli, engine: Engine) -> None:
    rpm = 120.0  # 2 a second: 12 prompts' requests take 5 s, where unlimited they take 0.2
    with fake.FakeOpenAI(fresh_policy_then_judge()) as server:
        # A batch claims 6 samples, 2 prompts: 6 sampler calls, an event loop each.
        start_round(cli, server, 12, "--rpm", rpm, "--batch-size", 6)
        arrivals = server.arrivals
    assert len(arrivals) == 12  # one request a prompt (n = 3)
    for window in WINDOWS_S:
        assert most_in_window(arrivals, window) <= bucket_bound(rpm, window), window


@pytest.mark.parametrize(
    ("args", "env", "shown"),
    [
        (["--rpm", "0"], {}, "--rpm: Input should be greater than 0"),
        (["--tpm", "-5"], {}, "'--tpm'"),
        (["--rpm", "many"], {}, "'--rpm'"),
        (["--rpm", "inf"], {}, "--rpm: Input should be a finite number"),
        ([], {"CAI_JUDGE_RPM": "0"}, "--rpm: Input should be greater than 0"),
        ([], {"CAI_JUDGE_TPM": "lots"}, "'--tpm'"),
    ],
)
def test_bad_limits_are_refused_naming_the_flag(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str], shown: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result: Any = cli(
        "judge", "-r", 1, "--judge-base-url", "http://127.0.0.1:9/v1", "--judge-model", "m", *args, expect=2
    )
    assert shown in " ".join((result.stdout + result.stderr).split()).replace("│", "").replace("  ", " ")


def test_bad_policy_limits_are_refused_naming_the_flag(cli: Cli) -> None:
    result: Any = cli(
        "generate",
        "-r",
        1,
        "--backend",
        "openai",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--rpm",
        "0",
        expect=2,
    )
    assert "--rpm: Input should be greater than 0" in result.stderr
