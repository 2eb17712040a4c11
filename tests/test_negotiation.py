"""Feature negotiation with OpenAI-compatible servers that differ: the loopback server plays a
llama.cpp-like endpoint (no JSON schema, refused with HTTP 500), one that takes only text, one
that refuses or ignores logprobs, and one that refuses or ignores `n`. What must hold: a refusal
costs one extra request per endpoint (never a work item's attempt), the outcome is stored with
the judge and reused by the next run, verdict probabilities arrive from logprobs and are stored,
and sampling falls back to one request per sample when `n` is not honoured."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest
from sqlalchemy import Engine, select

from cai.backends.base import SampleRequest, SamplingParams
from cai.backends.negotiation import (
    EndpointFeatures,
    choice_probs_from_logprobs,
    is_refusal,
    schema_instruction,
)
from cai.backends.openai_compat import OpenAIChat, OpenAISampler
from cai.judge import PAIRWISE_SCHEMA
from cai.judging import JudgeOptions, judge_once, pairwise_parser
from cai.store.db import session_scope
from cai.store.models import JudgeRow, JudgmentRow
from tests import fake_openai as fake
from tests.conftest import REPO, Cli
from tests.test_judging import GOOD, _request, fresh_policy_then_judge

ABT = ("A", "B", "tie")


# --- reading verdict probabilities from logprobs ------------------------------------------------


def test_choice_probs_are_read_where_the_verdict_value_starts() -> None:
    text = '{"rationale": "x", "preferred": "A"}'
    tokens = [
        ('{"', [('{"', -0.1)]),
        ("rationale", [("rationale", -0.1)]),
        ('": "', [('": "', -0.1)]),
        ("x", [("x", -0.1)]),
        ('", "', [('", "', -0.1)]),
        ("preferred", [("preferred", -0.1)]),
        ('": "', [('": "', -0.1)]),
        ("A", [("A", math.log(0.6)), ("B", math.log(0.2)), ("t", math.log(0.1)), ("Both", math.log(0.1))]),
        ('"}', [('"}', -0.1)]),
    ]
    probs = choice_probs_from_logprobs(text, tokens, "preferred", ABT)
    assert probs is not None
    assert probs == pytest.approx({"A": 0.6 / 0.9, "B": 0.2 / 0.9, "tie": 0.1 / 0.9})


def test_a_token_that_carries_the_opening_quote_with_the_value_is_read_past_the_quote() -> None:
    text = '{"preferred":"tie"}'
    tokens = [
        ('{"preferred', [('{"preferred', -0.1)]),
        ('":', [('":', -0.1)]),
        ('"tie', [('"tie', math.log(0.5)), ('"A', math.log(0.3)), ('"B', math.log(0.2)), ("{", -3.0)]),
        ('"}', [('"}', -0.1)]),
    ]
    assert choice_probs_from_logprobs(text, tokens, "preferred", ABT) == pytest.approx(
        {"A": 0.3, "B": 0.2, "tie": 0.5}
    )


def test_no_probabilities_without_the_field_or_a_choice_among_the_alternatives() -> None:
    assert choice_probs_from_logprobs('{"score": 3}', [('{"score": 3}', [])], "preferred", ABT) is None
    text = '{"preferred": "London"}'
    tokens = [('{"preferred": "', []), ("London", [("London", -0.1), ("Paris", -2.0)]), ('"}', [])]
    assert choice_probs_from_logprobs(text, tokens, "preferred", ABT) is None


# --- what counts as a refusal, and stepping down ------------------------------------------------


def test_refusals_are_client_errors_or_server_errors_that_name_the_feature() -> None:
    assert is_refusal(400, "anything") and is_refusal(422, "unprocessable")
    assert not is_refusal(429, "slow down") and not is_refusal(408, "timeout")
    assert is_refusal(500, "Input should be 'text' or 'json_object' (response_format.type)")
    assert is_refusal(500, "logprobs are not supported")
    assert not is_refusal(500, "out of memory") and not is_refusal(503, "overloaded")


def test_stepping_down_gives_up_what_the_refusal_names_else_the_richest_format() -> None:
    features = EndpointFeatures()
    assert features.step_down("logprobs are not supported", asked_logprobs=True)
    assert features.logprobs is False and features.response_format == "json_schema"
    formats = []
    while features.step_down("HTTP 400", asked_logprobs=False):
        formats.append(features.response_format)
    assert formats == ["json_object_schema", "json_object", "text"]
    assert EndpointFeatures.from_json(json.loads(json.dumps(features.as_json()))) == features
    assert EndpointFeatures.from_json({"response_format": "yaml"}) == EndpointFeatures()


def test_the_schema_stated_in_words_names_every_key() -> None:
    words = schema_instruction(PAIRWISE_SCHEMA)
    assert '"rationale" (a string)' in words and '"preferred" (one of "A", "B", "tie")' in words


# --- one backend against servers that differ ----------------------------------------------------


def _judge_many(server: fake.FakeOpenAI, items: int, features: EndpointFeatures | None = None) -> Any:
    """`items` concurrent judge calls through one backend; (outcomes, backend)."""

    async def go() -> Any:
        backend = OpenAIChat(server.base_url, "fake-judge", features=features)
        try:
            outcomes = await asyncio.gather(
                *(
                    judge_once(backend, _request(), pairwise_parser("AB"), JudgeOptions())
                    for _ in range(items)
                )
            )
        finally:
            await backend.aclose()
        return outcomes, backend

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("accepted", "refusal", "settles_on", "extra"),
    [
        (("json_schema", "json_object", "text"), 500, "json_schema", 0),
        (("json_object", "text"), 500, "json_object_schema", 1),  # llama.cpp's server
        (("text",), 400, "text", 3),
    ],
)
def test_concurrent_items_pay_for_a_refused_format_once(
    accepted: tuple[str, ...], refusal: int, settles_on: str, extra: int
) -> None:
    with fake.FakeOpenAI(
        fake.prefer_marker(GOOD), latency=0.02, response_formats=accepted, format_refusal=refusal
    ) as server:
        outcomes, backend = _judge_many(server, 12)
        requests = server.requests
    assert all(o.parsed is not None and o.attempts == 1 for o in outcomes)
    assert len(requests) == 12 + extra and backend.refusals == extra
    assert backend.features.response_format == settles_on and backend.features.format_settled
    settled = requests[extra:]
    if settles_on != "json_schema":  # the schema travels in the prompt instead
        assert all(
            "Reply with one JSON object whose keys are" in r["messages"][-1]["content"] for r in settled
        )
    kinds = {(r.get("response_format") or {}).get("type") for r in settled}
    assert kinds == {{"json_schema": "json_schema", "text": None}.get(settles_on, "json_object")}


@pytest.mark.parametrize(
    ("support", "extra", "known"), [("yes", 0, True), ("refuse", 1, False), ("ignore", 0, False)]
)
def test_logprobs_are_asked_for_and_given_up_when_refused_or_ignored(
    support: str, extra: int, known: bool
) -> None:
    with fake.FakeOpenAI(fake.prefer_marker(GOOD), logprobs=support) as server:  # type: ignore[arg-type]
        outcomes, backend = _judge_many(server, 6)
        requests = server.requests
    assert len(requests) == 6 + extra and all(o.attempts == 1 for o in outcomes)
    assert backend.features.logprobs is known
    verdicts = [o.parsed for o in outcomes]
    if known:  # the fake gives the chosen token p=0.8 and the other letter p=0.15
        assert all(
            v.choice_probs == pytest.approx({"A": 0.8 / 0.95, "B": 0.15 / 0.95, "tie": 0.0}) for v in verdicts
        )
        assert all(v.confidence == pytest.approx(0.8 / 0.95) for v in verdicts)
    else:
        assert all(v.choice_probs is None and v.confidence is None for v in verdicts)
        assert not any(r.get("logprobs") for r in requests[extra + 1 :])  # asked no more


def test_a_bad_request_about_the_item_itself_fails_only_that_item() -> None:
    """While probing, a 400 refused at every step was about the request, not the features:
    they are put back, and the other items settle on what the endpoint does support."""
    poisoned = "POISON"

    def reject_poison(request: dict[str, Any]) -> fake.Fault | None:
        return fake.status(400, message="prompt too long") if poisoned in fake.prompt_text(request) else None

    async def go() -> Any:
        with fake.FakeOpenAI(fake.prefer_marker(GOOD), fault_for=reject_poison) as server:
            backend = OpenAIChat(server.base_url, "fake-judge")
            bad = _request()
            bad = type(bad)(**{**bad.__dict__, "messages": [{"role": "user", "content": poisoned}]})
            try:
                first = await judge_once(backend, bad, pairwise_parser("AB"), JudgeOptions())
                rest = await asyncio.gather(
                    *(
                        judge_once(backend, _request(), pairwise_parser("AB"), JudgeOptions())
                        for _ in range(4)
                    )
                )
            finally:
                await backend.aclose()
            return first, rest, backend, server.requests

    first, rest, backend, requests = asyncio.run(go())
    assert first.parsed is None and first.error_kind == "permanent" and first.attempts == 1
    assert all(o.parsed is not None for o in rest)
    assert backend.features.response_format == "json_schema" and backend.features.logprobs is True
    # The poisoned item tried each step once (4 formats, then text without logprobs); the rest
    # went straight to what the endpoint supports.
    assert len(requests) == 5 + 4


# --- a judge round: stored with the judge, reused by the next run --------------------------------


def _round(cli: Cli, policy: fake.FakeOpenAI, limit: int) -> int:
    round_id = int(cli("round", "start", "-c", "helpful-harmless@1", "--policy", "fake/policy").stdout)
    cli("generate", "-r", round_id, "--limit", limit, "--backend", "openai", "--base-url", policy.base_url)
    return round_id


def test_a_round_against_a_llama_cpp_like_server_stores_what_it_learned(cli: Cli, engine: Engine) -> None:
    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    with fake.FakeOpenAI(fresh_policy_then_judge()) as policy:
        first, second = _round(cli, policy, 10), _round(cli, policy, 20)
    with fake.FakeOpenAI(fake.prefer_marker(GOOD), response_formats=("json_object", "text")) as judge:
        flags = [
            "--judge-base-url",
            judge.base_url,
            "--judge-model",
            "fake-judge",
            "--concurrency",
            8,
            "--json",
        ]
        summary = json.loads(cli("judge", "-r", first, *flags).stdout)
        assert judge.count == 2 * summary["pairs"] + 1  # one refused probe for the whole round
        with session_scope(engine) as session:
            row = session.scalars(select(JudgeRow).where(JudgeRow.backend == "openai")).one()
            assert row.endpoint_features == {
                judge.base_url: {
                    "response_format": "json_object_schema",
                    "format_settled": True,
                    "logprobs": True,
                }
            }
        before = judge.count
        again = json.loads(cli("judge", "-r", second, *flags).stdout)
        asked = judge.requests[before:]
    assert summary["failed"] == again["failed"] == 0
    assert len(asked) == 2 * again["pairs"]  # no probe: the stored outcome was reused
    assert all(
        r["response_format"] == {"type": "json_object", "schema": PAIRWISE_SCHEMA["schema"]} for r in asked
    )
    with session_scope(engine) as session:
        judgments = session.scalars(select(JudgmentRow).where(JudgmentRow.status == "ok")).all()
    llm = [j for j in judgments if j.template_sha256 != "0" * 64]
    assert llm and all(j.attempts == 1 for j in llm)
    for j in llm:  # probabilities in the pair's own terms: the verdict's is the confidence
        assert j.choice_probs is not None and j.confidence == pytest.approx(j.choice_probs[j.verdict])


# --- sampling: n > 1, or one request per sample --------------------------------------------------


@pytest.mark.parametrize(
    ("support", "requests_sent", "n_supported"),
    [("yes", 3, True), ("refuse", 7, False), ("ignore", 6, False)],
)
def test_sampling_falls_back_to_one_request_per_sample_when_n_is_not_honoured(
    support: str, requests_sent: int, n_supported: bool
) -> None:
    """Three prompts, two samples each: one request per prompt with n = 2, or, after the first
    answer shows n is refused (then asked again) or ignored (one choice came back), one request
    per sample with its own seed."""
    requests = [
        SampleRequest([{"role": "user", "content": f"prompt {p}"}], seed=10 * p + i)
        for p in range(3)
        for i in range(2)
    ]
    with fake.FakeOpenAI(fresh_policy_then_judge(), n=support) as server:  # type: ignore[arg-type]
        sampler = OpenAISampler(server.base_url, "fake/policy", concurrency=4)
        samples = sampler.sample(requests, SamplingParams())
        sent = server.requests
    assert len(samples) == 6 and all(s.text for s in samples)
    assert len(sent) == requests_sent and sampler.n_supported is n_supported
    if not n_supported:
        assert sum(int(r.get("n") or 1) > 1 for r in sent) == 1  # only the first prompt tried n
        assert {r["seed"] for r in sent} == {r.seed for r in requests}
        assert all(s.seed is None for s in samples)  # each sample drawn with its own seed


def test_calibration_negotiates_once_and_shares_the_outcome_with_judging(cli: Cli) -> None:
    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    args = ["--judge-base-url", "", "--judge-model", "fake-judge"]
    with fake.FakeOpenAI(fake.prefer_marker(GOOD), response_formats=("json_object", "text")) as judge:
        args[1] = judge.base_url
        report = json.loads(cli("judge", "calibrate", "-c", "helpful-harmless@1", *args, "--json").stdout)
        first = judge.requests
        assert report["pairs"] > 0
        assert sum((r.get("response_format") or {}).get("type") == "json_schema" for r in first) == 1
        before = judge.count
        cli("judge", "calibrate", "-c", "helpful-harmless@1", *args, "--json")
        again = judge.requests[before:]
    assert len(again) == len(first) - 1  # the stored outcome spared the probe
    assert not any((r.get("response_format") or {}).get("type") == "json_schema" for r in again)
