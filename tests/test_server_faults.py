"""A judge or policy server that is not what it should be: an HTML page or a proxy's error page
instead of a chat completion, JSON that is not one, a URL nothing listens on, faults on a share
of the policy requests. Over real HTTP (tests/fake_openai.py), through the real `openai` SDK, the
real CLI and database: such a reply is a retried fault whose message names the server and quotes
what came back; a run that got nothing back fails (exit 1, round resumable); a run that got part
of it back keeps that part."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from cai.backends import openai_compat
from cai.backends.base import (
    PermanentError,
    Retry,
    SampleRequest,
    SamplingIncomplete,
    SamplingParams,
    TransientError,
    retry_transient,
)
from cai.backends.openai_compat import OpenAIChat, OpenAISampler
from cai.judge import Verdict, pairwise_request
from cai.judging import JudgeOptions, judge_once, pairwise_parser
from cai.store.db import session_scope
from cai.store.models import CalibrationRow, JudgmentRow, PairRow, ResponseRow
from cai.templates import TemplateSet, sample_context
from tests import fake_openai as fake
from tests.conftest import REPO, Cli, deadline
from tests.test_judging import GOOD, fresh_policy_then_judge

LIMIT = 6
"""Prompts per round: sampled 2 each, so 6 pairs at most and 12 judgments (both orders)."""

NOT_A_COMPLETION = {
    "HTML page, 200": (fake.html_page(), "(text/html) is not a chat completion"),
    "HTML page, 502": (fake.html_page(502), "HTTP 502: (text/html)"),
    "JSON error detail, 200": (fake.json_body({"detail": "Not Found"}), '"{"detail": "Not Found"}"'),
    "JSON list": (fake.json_body([1, 2]), '"[1, 2]"'),
    "choices not a list": (fake.json_body({"choices": "abc"}), "is not a chat completion"),
    "choice without a message": (fake.json_body({"choices": [{"message": "x"}]}), "not a chat completion"),
    "body not JSON": (fake.invalid_body(), "the reply is not JSON"),
}


@pytest.fixture(autouse=True)
def fail_if_hung() -> Iterator[None]:
    with deadline(60):
        yield


@pytest.fixture(autouse=True)
def quick_sampler_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampler's default number of tries, with a backoff of milliseconds."""
    monkeypatch.setattr(openai_compat, "SAMPLER_RETRY", Retry(backoff_base=0.001, backoff_cap=0.01))


@pytest.fixture
def server() -> Iterator[fake.FakeOpenAI]:
    with fake.FakeOpenAI(fresh_policy_then_judge()) as running:
        yield running


def always(fault: fake.Fault) -> Callable[[dict[str, Any]], fake.Fault]:
    return lambda request: fault


def closed_url() -> str:
    """The URL of a port nothing listens on (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def start_round(cli: Cli) -> int:
    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    return int(cli("round", "start", "-c", "helpful-harmless@1", "--policy", "fake/policy").stdout)


def generate(cli: Cli, round_id: int, base_url: str, *extra: object, expect: int = 0) -> Any:
    args = ["--backend", "openai", "--base-url", base_url, "--limit", LIMIT, "--batch-size", 4]
    return cli("generate", "-r", round_id, *args, *extra, expect=expect)


def judge(cli: Cli, round_id: int, base_url: str, *extra: object, expect: int = 0) -> Any:
    args = ["--judge-base-url", base_url, "--judge-model", "fake-judge", "--timeout", 5]
    return cli("judge", "-r", round_id, *args, "--max-attempts", 2, *extra, expect=expect)


def round_state(cli: Cli, round_id: int) -> tuple[str, str | None]:
    shown = json.loads(cli("round", "show", round_id, "--json").stdout)
    return shown["status"], shown["failed_step"]


def count(engine: Engine, row: Any) -> int:
    with session_scope(engine) as session:
        return session.scalar(select(func.count()).select_from(row)) or 0


def judge_request() -> Any:
    from cai.constitution import load_constitution

    constitution = load_constitution(REPO / "constitutions/helpful-harmless/v1.yaml").constitution
    context = sample_context("judge_pairwise")
    _, request = pairwise_request(
        TemplateSet(),
        constitution,
        constitution.principles[0],
        context["conversation"],
        f"{GOOD} answer",
        "other answer",
        "AB",
    )
    return request


def judge_against(server: fake.FakeOpenAI, max_attempts: int, base_url: str | None = None) -> Any:
    """One judge call, with its retries, as `cai judge` makes it."""

    async def go() -> Any:
        backend = OpenAIChat(base_url or server.base_url, "fake-judge", timeout=5)
        try:
            options = JudgeOptions(max_attempts=max_attempts, backoff_base=0.001)
            return await judge_once(backend, judge_request(), pairwise_parser("AB"), options)
        finally:
            await backend.aclose()

    return asyncio.run(go())


# -- the backends: what counts as a reply, and what an error says


@pytest.mark.parametrize(("fault", "shown"), NOT_A_COMPLETION.values(), ids=NOT_A_COMPLETION.keys())
def test_a_reply_that_is_not_a_chat_completion_is_retried(
    server: fake.FakeOpenAI, fault: fake.Fault, shown: str
) -> None:
    server.inject(fault)
    outcome = judge_against(server, max_attempts=2)
    assert isinstance(outcome.parsed, Verdict) and outcome.parsed.verdict == "A"
    assert outcome.attempts == 2 and server.count == 2


@pytest.mark.parametrize(("fault", "shown"), NOT_A_COMPLETION.values(), ids=NOT_A_COMPLETION.keys())
def test_a_reply_that_is_not_a_chat_completion_names_the_server_and_quotes_the_reply(
    server: fake.FakeOpenAI, fault: fake.Fault, shown: str
) -> None:
    server.inject(fault, fault)
    outcome = judge_against(server, max_attempts=2)
    assert outcome.parsed is None and outcome.error_kind == "transient"
    assert outcome.error.startswith(f"{server.base_url}: ")
    assert shown in outcome.error
    assert len(outcome.error) < 400  # a short prefix of what came back, never the whole page
    if fault.kind == "html":
        assert "502 Bad Gateway" in outcome.error and "nginx" in outcome.error
        assert re.search(r'\.\.\." \(6\d\d characters\)$', outcome.error)  # cut, and says so


def test_an_unreachable_server_is_named_with_the_cause() -> None:
    url = closed_url()
    outcome = judge_against(fake.FakeOpenAI(), max_attempts=1, base_url=url)
    assert outcome.error_kind == "transient"
    assert outcome.error.startswith(f"{url}: connection failed: ConnectError: ")

    sampler = OpenAISampler(url, "fake/policy", retry=Retry(max_attempts=2, backoff_base=0.001))
    with pytest.raises(SamplingIncomplete) as info:
        sampler.sample([SampleRequest([{"role": "user", "content": "hi"}], seed=1)], SamplingParams())
    assert info.value.samples == [None]
    assert "1 of 1 samples failed after up to 2 attempts" in str(info.value)
    assert f"{url}: connection failed: ConnectError" in str(info.value)


def test_the_sampler_retries_transient_faults_and_keeps_what_came_back(server: fake.FakeOpenAI) -> None:
    doomed = "doomed prompt"
    server.fault_for = lambda request: fake.html_page(502) if fake.prompt_text(request) == doomed else None
    server.inject(fake.status(503), fake.drop())  # the first two requests, whichever they are
    requests = [
        SampleRequest([{"role": "user", "content": text}], seed=seed)
        for seed, text in enumerate(["first", doomed, "third", "first"])
    ]
    sampler = OpenAISampler(server.base_url, "fake/policy", retry=Retry(max_attempts=3, backoff_base=0.001))
    with pytest.raises(SamplingIncomplete) as info:
        sampler.sample(requests, SamplingParams())
    got = info.value.samples
    assert got[1] is None and all(got[i] is not None for i in (0, 2, 3))
    assert got[0] is not None and got[3] is not None and got[0].text != got[3].text  # n=2, one request
    assert "1 of 4 samples failed after up to 3 attempts" in str(info.value)
    assert f"{server.base_url}: HTTP 502: (text/html)" in str(info.value)
    prompts = [fake.prompt_text(r) for r in server.requests]
    assert prompts.count(doomed) == 3  # retried to its last attempt; the others were not abandoned


def test_retry_transient_retries_transient_faults_only() -> None:
    waits: list[tuple[int, float | None]] = []

    def delay(attempt: int, retry_after: float | None) -> float:
        waits.append((attempt, retry_after))
        return 0.0

    def failing(*errors: Exception) -> Callable[[], Any]:
        queue = list(errors)

        async def call() -> str:
            if queue:
                raise queue.pop(0)
            return "done"

        return call

    assert (
        asyncio.run(retry_transient(failing(TransientError("a", 2.0), TransientError("b")), 3, delay))
        == "done"
    )
    assert waits == [(1, 2.0), (2, None)]
    with pytest.raises(TransientError, match="c"):
        asyncio.run(retry_transient(failing(TransientError("b"), TransientError("c")), 2, delay))
    waits.clear()
    with pytest.raises(PermanentError):
        asyncio.run(retry_transient(failing(PermanentError("no")), 5, delay))
    assert waits == []


# -- cai judge and cai judge calibrate


@pytest.mark.parametrize(
    "fault",
    [fake.html_page(), fake.html_page(502), fake.json_body({"detail": "Not Found"})],
    ids=["HTML 200", "HTML 502", "JSON not a completion"],
)
def test_a_judge_that_answers_no_completion_fails_the_run_and_a_rerun_finishes_the_round(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI, fault: fake.Fault
) -> None:
    round_id = start_round(cli)
    generate(cli, round_id, server.base_url)
    server.fault_for = always(fault)
    result = judge(cli, round_id, server.base_url, expect=1)
    assert "JudgeUnreachable" in result.stderr and "answered none" in result.stderr
    counts = re.search(r"judged 0, failed (\d+) \(transient (\d+)\)", result.stderr)
    assert counts is not None and counts.group(1) == counts.group(2)
    with session_scope(engine) as session:
        llm = select(func.count()).where(JudgmentRow.template_sha256 != "0" * 64)  # not the rules'
        assert int(counts.group(1)) == session.scalar(llm.where(JudgmentRow.status == "failed")) >= 2
        assert session.scalar(llm.where(JudgmentRow.status != "failed")) == 0
    assert server.base_url in result.stderr
    assert "AttributeError" not in result.stderr
    assert round_state(cli, round_id) == ("failed", "judge")  # not `judged`: resumable

    server.fault_for = None
    summary = json.loads(judge(cli, round_id, server.base_url, "--json").stdout)
    assert summary["pairs"] > 0 and summary["labeled"] == summary["pairs"]
    assert summary["failed"] == summary["pending"] == 0
    assert round_state(cli, round_id) == ("judged", None)


def test_a_judge_whose_every_reply_fails_to_parse_fails_the_run_and_a_plain_rerun_retries_them(
    cli: Cli, server: fake.FakeOpenAI
) -> None:
    round_id = start_round(cli)
    generate(cli, round_id, server.base_url)
    server.fault_for = always(fake.garbage("<p>I cannot judge that.</p>"))
    result = judge(cli, round_id, server.base_url, expect=1)
    assert "JudgeFailed" in result.stderr
    assert re.search(r"judged 0, failed (\d+) \(parse \1\)", result.stderr), result.stderr
    assert round_state(cli, round_id) == ("failed", "judge")

    server.fault_for = None
    summary = json.loads(judge(cli, round_id, server.base_url, "--json").stdout)  # no --retry-failed
    assert summary["failed"] == summary["pending"] == 0
    assert summary["labeled"] == summary["pairs"] > 0
    assert round_state(cli, round_id) == ("judged", None)


def test_a_judge_run_with_some_failures_still_succeeds(cli: Cli, server: fake.FakeOpenAI) -> None:
    round_id = start_round(cli)
    generate(cli, round_id, server.base_url)
    server.inject(fake.html_page(), fake.garbage())
    result = judge(cli, round_id, server.base_url, "--max-attempts", 1, "--concurrency", 1, "--json")
    summary = json.loads(result.stdout)
    assert summary["failed"] == 2 and summary["run"]["errors"] == {"transient": 1, "parse": 1}
    assert "failures this run: parse 1, transient 1" in result.stderr
    assert round_state(cli, round_id) == ("judged", None)


def test_an_unreachable_judge_is_named_in_the_failure(cli: Cli, server: fake.FakeOpenAI) -> None:
    round_id = start_round(cli)
    generate(cli, round_id, server.base_url)
    url = closed_url()
    result = judge(cli, round_id, url, "--max-attempts", 1, expect=1)
    assert f"{url}: connection failed: ConnectError" in result.stderr
    assert round_state(cli, round_id) == ("failed", "judge")


def test_calibration_against_an_html_page_fails_and_stores_nothing(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI
) -> None:
    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    args = ["--judge-base-url", server.base_url, "--judge-model", "fake-judge", "--max-attempts", 1]
    server.fault_for = always(fake.html_page())
    result = cli("judge", "calibrate", "-c", "helpful-harmless@1", *args, expect=1)
    assert "answered none of" in result.stderr and "calibration requests" in result.stderr
    assert server.base_url in result.stderr and "502 Bad Gateway" in result.stderr
    assert count(engine, CalibrationRow) == 0  # no accuracy of 0 % from no answers at all

    server.fault_for = None
    report = json.loads(cli("judge", "calibrate", "-c", "helpful-harmless@1", *args, "--json").stdout)
    assert report["failed"] == 0 and report["pairs"] > 0
    assert count(engine, CalibrationRow) == 1


# -- cai generate


def test_generate_against_an_html_page_fails_naming_the_server_and_resumes(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI
) -> None:
    round_id = start_round(cli)
    server.fault_for = always(fake.html_page())
    result = generate(cli, round_id, server.base_url, expect=1)
    assert "GenerationIncomplete" in result.stderr and "AttributeError" not in result.stderr
    assert f"{server.base_url}: HTTP 200 (text/html) is not a chat completion" in result.stderr
    assert "502 Bad Gateway" in result.stderr
    assert "stopped: every sample of a batch failed" in result.stderr
    assert count(engine, ResponseRow) == 0
    # One batch (2 prompts: a request each), every request tried 4 times, then it stopped.
    assert server.count == 2 * openai_compat.SAMPLER_RETRY.max_attempts
    assert round_state(cli, round_id) == ("failed", "generate")

    server.fault_for = None
    stats = json.loads(generate(cli, round_id, server.base_url, "--json").stdout)
    assert (stats["sampled"], stats["already_stored"]) == (2 * LIMIT, 0)
    assert count(engine, ResponseRow) == 2 * LIMIT
    assert round_state(cli, round_id) == ("generated", None)


def test_generate_against_an_unreachable_server_names_it(cli: Cli, engine: Engine) -> None:
    round_id = start_round(cli)
    url = closed_url()
    result = generate(cli, round_id, url, expect=1)
    assert f"{url}: connection failed: ConnectError" in result.stderr
    assert count(engine, ResponseRow) == 0
    assert round_state(cli, round_id) == ("failed", "generate")


def test_generate_rides_out_faults_on_a_third_of_its_requests(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI
) -> None:
    faults = itertools.cycle(
        [
            fake.html_page(),
            fake.status(503),
            fake.json_body({"detail": "Not Found"}),
            fake.drop(),
            fake.html_page(502),
            fake.empty_choices(),
            fake.status(429, retry_after=0),
            fake.invalid_body(),
        ]
    )
    # Each prompt fails its first k tries, k by the order prompts arrive in: up to 3 of the 4
    # tries a request has, 7 faults in 19 requests. Keyed by prompt, so arrival order is moot.
    failures_first = iter([0, 0, 0, 1, 0, 3, 0, 0, 2, 0, 0, 1])
    left: dict[str, int] = {}
    lock = threading.Lock()

    def fault_for(request: dict[str, Any]) -> fake.Fault | None:
        with lock:
            prompt = fake.prompt_text(request)
            if prompt not in left:
                left[prompt] = next(failures_first)
            if left[prompt] == 0:
                return None
            left[prompt] -= 1
            return next(faults)

    round_id = start_round(cli)
    server.fault_for = fault_for
    stats = json.loads(generate(cli, round_id, server.base_url, "--limit", 12, "--json").stdout)
    assert stats["sampled"] == 24 and count(engine, ResponseRow) == 24
    assert server.count == 12 + 7
    assert stats["pairs_added"] > 0
    assert round_state(cli, round_id) == ("generated", None)


def test_a_request_that_keeps_failing_costs_only_its_own_samples(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI
) -> None:
    doomed: list[str] = []
    lock = threading.Lock()

    def fault_for(request: dict[str, Any]) -> fake.Fault | None:
        with lock:  # the first prompt to arrive fails every time
            prompt = fake.prompt_text(request)
            doomed[:] = doomed or [prompt]
            return fake.html_page(502) if prompt == doomed[0] else None

    round_id = start_round(cli)
    server.fault_for = fault_for
    result = generate(cli, round_id, server.base_url, expect=1)
    assert f"round {round_id}: 2 samples failed; 10 sampled by this run are stored" in result.stderr
    assert "2 are left to sample: rerun to resume" in result.stderr
    assert f"{server.base_url}: HTTP 502" in result.stderr
    assert count(engine, ResponseRow) == 2 * LIMIT - 2
    with session_scope(engine) as session:
        paired = session.scalar(select(func.count(func.distinct(PairRow.prompt_id))))
    assert paired == LIMIT - 1  # the complete prompts are paired already
    assert round_state(cli, round_id) == ("failed", "generate")

    server.fault_for = None
    server.reset_stats()
    stats = json.loads(generate(cli, round_id, server.base_url, "--json").stdout)
    assert (stats["sampled"], stats["already_stored"]) == (2, 2 * LIMIT - 2)
    assert server.count == 1 and fake.prompt_text(server.requests[0]) == doomed[0]
    assert count(engine, ResponseRow) == 2 * LIMIT
    assert round_state(cli, round_id) == ("generated", None)


def test_generate_rerun_never_moves_a_judged_round_back(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI
) -> None:
    round_id = start_round(cli)
    generate(cli, round_id, server.base_url)
    judge(cli, round_id, server.base_url)
    assert round_state(cli, round_id) == ("judged", None)
    generate(cli, round_id, server.base_url)  # nothing to sample
    assert round_state(cli, round_id) == ("judged", None)
    generate(cli, round_id, server.base_url, "--limit", LIMIT + 2)  # new prompts sampled
    assert count(engine, ResponseRow) == 2 * (LIMIT + 2)
    assert round_state(cli, round_id) == ("judged", None)
    server.fault_for = always(fake.html_page())
    generate(cli, round_id, server.base_url, "--limit", LIMIT + 4, expect=1)  # a failing rerun
    assert round_state(cli, round_id) == ("judged", None)
