"""Labelling decisions (pure) and the one flip rate: the judge summary, the loop's round summary,
`cai audit stats` and the report all divide order flips by the pairs the LLM judge was asked
about, so pairs the rules decided alone never dilute it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import Engine

from cai.judge import PairLabel, Verdict
from cai.labelling import best_and_worst, chosen_and_rejected, flip_rate, pair_label
from cai.rules import RuleCheck
from cai.store.db import session_scope
from cai.store.progress import round_summary
from cai.store.reporting import gather_report
from tests import fake_openai as fake
from tests.conftest import REPO, Cli


def verdict(choice: str, confidence: float | None = 0.9) -> Verdict:
    return Verdict(choice, "because", confidence)


def test_pair_label_waits_for_both_orders_then_aggregates() -> None:
    assert pair_label([], {"p": {"AB": verdict("A")}}, has_llm=True) is None  # BA not planned yet
    assert pair_label([], {"p": {"AB": verdict("A"), "BA": None}}, has_llm=True) is None  # BA not done
    agreed = pair_label([], {"p": {"AB": verdict("A"), "BA": verdict("A")}}, has_llm=True)
    assert agreed is not None and (agreed.verdict, agreed.inconsistent) == ("A", False)
    flipped = pair_label([], {"p": {"AB": verdict("A"), "BA": verdict("B")}}, has_llm=True)
    assert flipped is not None and (flipped.verdict, flipped.inconsistent) == ("tie", True)


def test_pair_label_rules_decide_first_and_alone_without_llm_principles() -> None:
    separates = [RuleCheck("short", a_passes=True, b_passes=False)]
    both_pass = [RuleCheck("short", a_passes=True, b_passes=True)]
    asked_not = pair_label(separates, {}, has_llm=True)  # rules-first: the judge was never asked
    assert asked_not is not None and asked_not.verdict == "A"
    assert pair_label(both_pass, {}, has_llm=True) is None  # the judge must still answer
    overruled = pair_label(separates, {"p": {"AB": verdict("B"), "BA": verdict("B")}}, has_llm=True)
    assert overruled is not None and overruled.verdict == "A"
    assert pair_label(both_pass, {}, has_llm=False) == PairLabel("tie", None, False)


def test_best_and_worst_and_chosen_and_rejected() -> None:
    assert best_and_worst([(1, 7.0), (2, 3.0), (3, 7.0)]) == (1, 2, pytest.approx(4 / 9))
    assert best_and_worst([(1, 5.0), (2, 5.0)]) is None
    assert best_and_worst([(1, 5.0)]) is None
    assert chosen_and_rejected("A", 10, 20) == (10, 20)
    assert chosen_and_rejected("B", 10, 20) == (20, 10)
    assert chosen_and_rejected("tie", 10, 20) == (None, None)


def test_flip_rate_is_over_the_pairs_the_judge_saw() -> None:
    assert flip_rate(1, 4) == 0.25
    assert flip_rate(0, 0) is None


def short_or_long(request: dict[str, Any]) -> str:
    """Policy: a one-word answer (fails concise-safe's says-something rule) for every third
    seed, a full sentence otherwise. Judge: always 'A', so it flips on every pair it sees."""
    prompt = fake.prompt_text(request)
    if "<<<RESPONSE A " in prompt:
        return fake.default_responder(request)
    short_or_long.draws += 1  # type: ignore[attr-defined]
    draw = short_or_long.draws  # type: ignore[attr-defined]
    return "ok" if draw % 3 == 0 else f"A complete answer, number {draw}."


def test_every_flip_rate_divides_by_the_pairs_the_llm_judge_was_asked_about(cli: Cli, engine: Engine) -> None:
    short_or_long.draws = 0  # type: ignore[attr-defined]
    cli("constitution", "register", REPO / "constitutions/concise-safe/v1.yaml")
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    round_id = int(cli("round", "start", "-c", "concise-safe@1", "--policy", "fake/policy").stdout)
    with fake.FakeOpenAI(short_or_long) as server:
        backend = ["--backend", "openai", "--base-url", server.base_url]
        cli("generate", "-r", round_id, "--limit", 12, "--samples", 3, *backend)
        judge = ["--judge-base-url", server.base_url, "--judge-model", "always-a", "--rules-first"]
        summary = json.loads(cli("judge", "-r", round_id, *judge, "--json").stdout)
    assert summary["judge_labeled"] < summary["labeled"]  # some pairs were decided by rules alone
    assert summary["inconsistent"] == summary["judge_labeled"] > 0
    assert summary["flip_rate"] == 1.0
    stats = json.loads(cli("audit", "stats", "--round", round_id, "--json").stdout)
    assert stats["overall"]["flip_rate"] == 1.0
    with session_scope(engine) as session:
        assert round_summary(session, round_id).flip_rate == 1.0
        report = gather_report(session, round_id)
    judged = [s for s in report.principle_totals if s.asked]
    assert judged and all(s.flip_rate == 1.0 for s in judged)
    assert all(s.flip_rate is None for s in report.principle_totals if not s.asked)
