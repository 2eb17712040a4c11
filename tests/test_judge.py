"""Pure judging logic: lenient parsing, un-swapping the second order, aggregation that never
turns position bias into a winner, and rules that override the judge when they separate a pair."""

from __future__ import annotations

import pytest

from cai.constitution import Constitution
from cai.generate import pairs_for, sample_seed
from cai.judge import PairLabel, ParseError, Verdict, aggregate_pairwise, extract_json, parse_pairwise
from cai.rules import check_rules, combine, rule_winner


@pytest.mark.parametrize(
    "text",
    [
        '{"rationale": "B is wrong", "preferred": "A"}',
        '```json\n{"rationale": "B is wrong", "preferred": "A"}\n```',
        'Sure! Here is my verdict: {"rationale": "B is wrong", "preferred": "A"} Hope that helps.',
        '{"rationale": "B says {nested} braces", "preferred": "a"}',
    ],
)
def test_lenient_parsing(text: str) -> None:
    verdict = parse_pairwise(text, "AB")
    assert verdict.verdict == "A"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty reply"),
        ("I prefer A!!", "no JSON object"),
        ('{"rationale": "cut off", "prefer', "truncated"),
        ('{"rationale": "x", "preferred": "C"}', "'preferred' is 'C'"),
        ('{"rationale": "x"}', "'preferred' is missing"),
        ('{"rationale": 3, "preferred": "A"}', "'rationale' is not a string"),
    ],
)
def test_parse_errors_say_why(text: str, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_pairwise(text, "AB")


def test_second_order_is_unswapped_with_its_confidence() -> None:
    verdict = parse_pairwise('{"rationale": "r", "preferred": "A"}', "BA", {"A": 0.8, "B": 0.15, "tie": 0.05})
    # Shown first in BA is the pair's B; the probabilities are stored in the pair's own terms.
    assert verdict == Verdict("B", "r", 0.8, {"B": 0.8, "A": 0.15, "tie": 0.05})
    assert parse_pairwise('{"rationale": "r", "preferred": "tie"}', "BA").verdict == "tie"


def test_extract_json_prefers_the_first_object() -> None:
    assert extract_json('{"a": 1} then {"b": 2}') == {"a": 1}


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("A", "A", PairLabel("A", 0.7, False)),
        ("B", "B", PairLabel("B", 0.7, False)),
        ("A", "B", PairLabel("tie", None, True)),  # position bias: never a silent winner
        ("A", "tie", PairLabel("tie", None, False)),
        ("tie", "tie", PairLabel("tie", 0.7, False)),
    ],
)
def test_aggregation(first: str, second: str, expected: PairLabel) -> None:
    label = aggregate_pairwise(Verdict(first, "", 0.6), Verdict(second, "", 0.8))
    assert label.verdict == expected.verdict and label.inconsistent == expected.inconsistent
    if expected.confidence is None:
        assert label.confidence is None
    else:
        assert label.confidence == pytest.approx(expected.confidence)


def test_agreement_without_probabilities_is_full_confidence() -> None:
    assert aggregate_pairwise(Verdict("A", ""), Verdict("A", "")).confidence == 1.0


RULES = Constitution.model_validate(
    {
        "name": "r",
        "version": 1,
        "description": "d",
        "principles": [
            {"id": "short", "kind": "rule", "critique": "c", "rule": {"check": "max_words", "max": 5}},
            {
                "id": "no-bang",
                "kind": "rule",
                "critique": "c",
                "rule": {"check": "must_not_match", "pattern": "!"},
            },
            {"id": "judged", "critique": "c"},
        ],
    }
)


def test_rules_override_the_judge_when_they_separate_the_pair() -> None:
    checks = check_rules(RULES, "Fine answer.", "This answer is far too long to pass!")
    assert [(c.principle_id, c.verdict) for c in checks] == [("short", "A"), ("no-bang", "A")]
    assert rule_winner(checks) == "A"
    assert combine(checks, PairLabel("B", 0.9, False)) == PairLabel("A", 1.0, False)


def test_rules_defer_to_the_judge_when_tied() -> None:
    checks = check_rules(RULES, "Hi!", "Yo!")  # both break no-bang, both short
    assert rule_winner(checks) is None
    judged = PairLabel("B", 0.9, False)
    assert combine(checks, judged) is judged


def test_identical_responses_are_not_paired_and_each_comparison_is_made_once() -> None:
    samples = [(1, "Paris."), (2, " Paris. "), (3, "It is Paris."), (4, "Lyon.")]
    # 2 repeats 1 (up to whitespace): pairing it too would ask (Paris., It is Paris.) twice.
    assert pairs_for(samples) == [(1, 3), (1, 4), (3, 4)]
    assert pairs_for([(5, "Same."), (6, "Same."), (7, "Same.")]) == []


def test_sample_seeds_are_stable_and_distinct() -> None:
    assert sample_seed(0, 5, 1) == sample_seed(0, 5, 1)
    seeds = {sample_seed(s, p, i) for s in range(2) for p in range(50) for i in range(4)}
    assert len(seeds) == 400
