"""Prices and estimates: `--estimate` on `cai judge` and `cai generate` against what a loopback run
then sends (requests, prompt tokens as the server counts them, cost), without sending or writing
anything itself; the price table as the default price and the flags over it; the budget on
generation, stopping cleanly and resuming without duplicates."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import genai_prices
import pytest
from sqlalchemy import Engine, func, select

from cai.store.db import session_scope
from cai.store.models import GenerationItemRow, ResponseRow, RoundRow
from cai.token_count import counter_for
from tests import fake_openai as fake
from tests import test_judging as judging
from tests.conftest import REPO, Cli, table_counts
from tests.tiny_model import smollm2_tokenizer_dir, tiny_model_dir

__all__ = ["smollm2_tokenizer_dir", "tiny_model_dir"]  # session fixtures

GOOD = "GOOD"
JUDGE_MODEL = "gpt-4o-mini"
"""A model the price table knows (the fake server answers to any name)."""
POLICY = "fake/policy"
"""A model it does not know."""


def responder() -> fake.Responder:
    """Judge requests prefer the answer marked GOOD; sampling requests get a new answer at each
    draw (each of the `n` choices too), some of them GOOD."""
    draws = itertools.count()

    def respond(request: dict[str, Any]) -> str:
        if "<<<RESPONSE A " in fake.prompt_text(request):
            return fake.prefer_marker(GOOD)(request)
        draw = next(draws)
        return f"{GOOD} answer number {draw}" if draw % 3 else f"plain answer number {draw}"

    return respond


@pytest.fixture
def server() -> Iterator[fake.FakeOpenAI]:
    # The server counts tokens as the estimate does for this model here (tiktoken, or its
    # labelled approximation where tiktoken cannot download its encoding): if the estimate
    # rendered other messages than the run sends, the counts would differ.
    with fake.FakeOpenAI(responder(), tokenizer=counter_for(JUDGE_MODEL)) as running:
        yield running


def start_round(cli: Cli, policy: str | Path = POLICY) -> int:
    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    return int(cli("round", "start", "-c", "helpful-harmless@1", "--policy", policy).stdout)


def generate_args(server: fake.FakeOpenAI, round_id: int, *extra: object) -> list[object]:
    return ["generate", "--round", round_id, "--backend", "openai", "--base-url", server.base_url, *extra]


def judge_args(server: fake.FakeOpenAI, round_id: int, *extra: object) -> list[object]:
    """A judge the price table knows (JUDGE_MODEL) behind the loopback server."""
    return judging.judge_args(server, round_id, *extra, model=JUDGE_MODEL)


def estimate_of(cli: Cli, *args: object) -> dict[str, Any]:
    estimate: dict[str, Any] = json.loads(cli(*args, "--estimate", "--json").stdout)["estimate"]
    return estimate


def table(model: str) -> tuple[float, float]:
    """The price table's USD per million input and output tokens, read from the package itself."""
    one = genai_prices.Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    price = genai_prices.calc_price(one, model)
    return float(price.input_price), float(price.output_price)


def test_judge_estimate_matches_the_run_and_sends_nothing(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI
) -> None:
    first = start_round(cli)
    cli(*generate_args(server, first, "--limit", 4))
    before, sent = table_counts(engine), server.count
    estimate = estimate_of(cli, *judge_args(server, first))
    assert table_counts(engine) == before  # nothing planned, claimed or registered was kept
    assert server.count == sent  # and not one request went out

    server.reset_stats()
    summary = json.loads(cli(*judge_args(server, first), "--json").stdout)
    assert summary["pending"] == summary["failed"] == 0
    assert estimate["requests"] == server.usage.requests == 2 * summary["pairs"] > 0
    # Every rendered prompt, token for token, as the server counted what it received.
    assert estimate["input_tokens"] == server.usage.prompt_tokens == summary["prompt_tokens"]
    # No history yet: the reply limit bounds the output from above.
    assert estimate["output_tokens"] == 384 * estimate["requests"]
    assert "no history" in estimate["output_source"]
    assert estimate["cost_usd"] >= summary["cost_usd"] > 0
    print(f"\nno history: estimated / actual cost = {estimate['cost_usd'] / summary['cost_usd']:.3f}")

    # A second round of the same judge: the reply length now comes from the first round's.
    second = int(cli("round", "start", "-c", "helpful-harmless@1", "--policy", POLICY).stdout)
    cli(*generate_args(server, second, "--limit", 6))
    before = table_counts(engine)
    estimate = estimate_of(cli, *judge_args(server, second))
    assert table_counts(engine) == before
    assert "history" in estimate["output_source"] and "this judge" in estimate["output_source"]
    server.reset_stats()
    summary = json.loads(cli(*judge_args(server, second), "--json").stdout)
    assert estimate["requests"] == server.usage.requests
    assert estimate["input_tokens"] == server.usage.prompt_tokens
    ratio = estimate["cost_usd"] / summary["cost_usd"]
    print(f"with history: estimated / actual cost = {ratio:.3f}")
    assert 0.9 < ratio < 1.1


def test_price_table_is_the_default_and_flags_override_it(
    cli: Cli, server: fake.FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    round_id = start_round(cli)
    cli(*generate_args(server, round_id, "--limit", 2))
    table_in, table_out = table(JUDGE_MODEL)

    default = estimate_of(cli, *judge_args(server, round_id))
    prices = default["prices"]
    assert (prices["input_per_mtok"], prices["output_per_mtok"]) == pytest.approx((table_in, table_out))
    assert prices["source"].startswith("genai-prices")
    assert default["cost_usd"] == pytest.approx(
        (default["input_tokens"] * table_in + default["output_tokens"] * table_out) / 1e6
    )
    given = estimate_of(cli, *judge_args(server, round_id, "--price-in", 1, "--price-out", 2))["prices"]
    assert (given["input_per_mtok"], given["output_per_mtok"], given["source"]) == (
        1,
        2,
        "--price-in/--price-out",
    )
    half = estimate_of(cli, *judge_args(server, round_id, "--price-in", 1))["prices"]
    assert (half["input_per_mtok"], half["output_per_mtok"]) == pytest.approx((1, table_out))
    monkeypatch.setenv("CAI_JUDGE_PRICE_OUT", "7")
    from_env = estimate_of(cli, *judge_args(server, round_id))["prices"]
    assert (from_env["input_per_mtok"], from_env["output_per_mtok"]) == pytest.approx((table_in, 7))
    monkeypatch.delenv("CAI_JUDGE_PRICE_OUT")

    # A model the table does not know: tokens are still counted, the cost is unknown...
    unknown = judging.judge_args(server, round_id, model="fake-judge")
    plain = cli(*unknown, "--estimate").stdout
    assert "unknown" in plain and "no price known" in " ".join(plain.split())
    assert estimate_of(cli, *unknown)["input_tokens"] > 0
    # ... and a budget needs prices, as before.
    refused = cli(*unknown, "--budget", 1, expect=2).stderr
    assert "--budget needs prices" in refused and "fake-judge" in refused
    assert server.count == 2  # generate's, one request a prompt: no estimate sent one


def test_generate_estimate_matches_the_run_and_writes_nothing(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI
) -> None:
    round_id = start_round(cli)
    prices = ("--price-in", 2, "--price-out", 8)
    before = table_counts(engine)
    estimate = estimate_of(cli, *generate_args(server, round_id, "--limit", 5, "--samples", 3, *prices))
    assert table_counts(engine) == before  # no generation item was kept
    assert server.count == 0
    assert estimate["output_tokens"] == 192 * 5 * 3  # --max-new-tokens a sample, no history yet

    run = json.loads(
        cli(*generate_args(server, round_id, "--limit", 5, "--samples", 3, *prices), "--json").stdout
    )
    assert run["sampled"] == 15
    usage = server.usage
    assert estimate["requests"] == usage.requests == 5  # one request with n = 3 a prompt
    assert estimate["input_tokens"] == usage.prompt_tokens
    assert run["spent_usd"] == pytest.approx((2 * usage.prompt_tokens + 8 * usage.completion_tokens) / 1e6)
    print(f"\ngenerate, no history: estimated / actual cost = {estimate['cost_usd'] / run['spent_usd']:.3f}")

    # The next round of the same policy: answers stored, the reply length comes from them.
    second = int(cli("round", "start", "-c", "helpful-harmless@1", "--policy", POLICY).stdout)
    estimate = estimate_of(cli, *generate_args(server, second, "--limit", 5, "--samples", 3, *prices))
    assert "history" in estimate["output_source"]
    server.reset_stats()
    run = json.loads(
        cli(*generate_args(server, second, "--limit", 5, "--samples", 3, *prices), "--json").stdout
    )
    assert estimate["input_tokens"] == server.usage.prompt_tokens
    ratio = estimate["cost_usd"] / run["spent_usd"]
    print(f"generate, with history: estimated / actual cost = {ratio:.3f}")
    assert 0.8 < ratio < 1.25


def test_generation_budget_stops_cleanly_and_resumes(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI
) -> None:
    round_id = start_round(cli)
    sampling = ("--limit", 8, "--samples", 2, "--batch-size", 4)
    refused = cli(*generate_args(server, round_id, *sampling, "--budget", 1), expect=2).stderr
    assert "--budget needs prices" in refused and POLICY in refused
    assert server.count == 0

    # $1 a completion token: a reply costs about $4-5, so $20 buys a few of the 16 samples.
    priced = (*sampling, "--price-in", 0, "--price-out", 1_000_000, "--budget", 20)
    result = cli(*generate_args(server, round_id, *priced), "--json")
    first = json.loads(result.stdout)
    assert first["stopped_by_budget"] is True and "budget reached" in result.stderr
    assert 0 < first["sampled"] < 16
    # Batches shrink near the budget: it is passed by at most one request's cost.
    assert 20 <= first["spent_usd"] < 20 + 10
    with session_scope(engine) as session:
        assert session.get_one(RoundRow, round_id).status == "generating"
        held = session.scalar(select(func.count()).where(GenerationItemRow.claimed_by.is_not(None)))
        assert held == 0  # what was claimed and not sampled was given back

    final = json.loads(cli(*generate_args(server, round_id, *sampling), "--json").stdout)
    assert final["sampled"] == 16 - first["sampled"] and not final["stopped_by_budget"]
    with session_scope(engine) as session:
        keys = session.execute(
            select(ResponseRow.prompt_id, ResponseRow.sample_index).where(ResponseRow.round_id == round_id)
        ).all()
        assert session.get_one(RoundRow, round_id).status == "generated"
    assert len(keys) == len(set(keys)) == 16  # every sample once


def test_an_approximation_says_so_when_tiktoken_cannot_download(
    cli: Cli, server: fake.FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    round_id = start_round(cli)
    cli(*generate_args(server, round_id, "--limit", 2))
    # An empty encoding cache and a proxy that refuses: tiktoken's download fails, as it does
    # on any machine that cannot reach the internet.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    estimate = estimate_of(cli, *judge_args(server, round_id))
    assert estimate["tokenizer"].startswith("APPROXIMATION: 4 characters a token")
    assert "tiktoken could not load" in estimate["tokenizer"] and not estimate["exact_tokens"]
    assert "APPROXIMATION" in cli(*judge_args(server, round_id), "--estimate").stdout


def test_local_policy_is_counted_with_its_own_tokenizer(
    cli: Cli, engine: Engine, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process sampling: the estimate's prompt tokens are the ones the model is then given
    (stored per sample), and its reply length comes from the stored history next time."""
    round_id = start_round(cli, tiny_model_dir)
    sampling = ("--backend", "hf", "--limit", 3, "--samples", 2, "--max-new-tokens", 6)
    estimate = estimate_of(cli, "generate", "--round", round_id, *sampling)
    assert estimate["exact_tokens"] and "tokenizer and chat template" in estimate["tokenizer"]
    assert estimate["requests"] == 6 and estimate["cost_usd"] is None  # in-process: no price
    cli("generate", "--round", round_id, *sampling)
    with session_scope(engine) as session:
        stored = session.execute(
            select(func.sum(ResponseRow.prompt_tokens), func.avg(ResponseRow.completion_tokens)).where(
                ResponseRow.round_id == round_id
            )
        ).one()
    assert estimate["input_tokens"] == stored[0]

    second = int(cli("round", "start", "-c", "helpful-harmless@1", "--policy", tiny_model_dir).stdout)
    again = estimate_of(cli, "generate", "--round", second, *sampling, "--price-in", 1, "--price-out", 1)
    assert again["output_per_reply"] == pytest.approx(float(stored[1]))
    assert "this policy" in again["output_source"] and again["cost_usd"] > 0
