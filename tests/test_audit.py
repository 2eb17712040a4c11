"""Auditing the judge: the agreement maths and the review queue as pure functions, then the
`cai audit` commands over a real database holding a round whose judgments and labels are
inserted row by row (so every flag and number is known), and once over a round judged by the
loopback OpenAI server. Overrides add rows and leave the judge's untouched; bad input changes
nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from cai.audit import (
    Pick,
    agreement,
    cohen_kappa,
    human_agreement,
    krippendorff_alpha,
    principle_stats,
    queue_size,
    review_queue,
    split_queues,
)
from cai.judge import Verdict, aggregate_pairwise
from cai.store import judges, queue
from cai.store.audit import PairFilters, list_pairs
from cai.store.db import session_scope
from cai.store.models import (
    AuditRow,
    CalibrationRow,
    JudgmentRow,
    LabelRow,
    PairRow,
    PromptRow,
    ResponseRow,
    RoundRow,
)
from tests import fake_openai as fake
from tests.conftest import REPO, Cli, table_counts
from tests.test_judging import fresh_policy_then_judge, judge_args, start_round

# --- pure: agreement and kappa -----------------------------------------------------------------


def test_kappa_matches_a_hand_computed_example() -> None:
    ratings = [("A", "A"), ("A", "B"), ("B", "B"), ("B", "B"), ("tie", "tie")]
    # p_o = 4/5; p_e = (2*1 + 2*3 + 1*1) / 25 = 9/25; kappa = (0.8 - 0.36) / 0.64
    assert cohen_kappa(ratings) == pytest.approx(0.6875)
    result = agreement(ratings)
    assert (result.pairs, result.agreed, result.rate) == (5, 4, 0.8)
    assert result.kappa == pytest.approx(0.6875)


def test_kappa_is_one_for_perfect_and_negative_for_systematic_disagreement() -> None:
    assert cohen_kappa([("A", "A"), ("B", "B"), ("tie", "tie")]) == pytest.approx(1.0)
    assert cohen_kappa([("A", "B"), ("B", "A")]) == pytest.approx(-1.0)
    assert cohen_kappa([("A", "B"), ("B", "B")]) == pytest.approx(0.0)  # no better than chance


def test_kappa_is_none_when_undefined() -> None:
    assert cohen_kappa([]) is None
    # Both raters only ever said A: chance agreement is 1 and kappa divides by zero.
    assert cohen_kappa([("A", "A")] * 4) is None
    degenerate = agreement([("tie", "tie")] * 3)
    assert degenerate.rate == 1.0 and degenerate.kappa is None
    empty = agreement([])
    assert (empty.pairs, empty.rate, empty.kappa) == (0, None, None)


def test_alpha_matches_hand_computed_examples() -> None:
    # Coincidences: AA 2, AB 1, BA 1, BB 2, tie-tie 2 (the single rating adds nothing);
    # n_A 3, n_B 3, n_tie 2, n 8; alpha = 1 - (8 - 1) * 2 / (2 * (3*3 + 3*2 + 3*2)) = 2/3.
    units = [("A", "A"), ("A", "B"), ("B", "B"), ("tie", "tie"), ("A",)]
    assert krippendorff_alpha(units) == pytest.approx(2 / 3)
    # Three raters on one pair weigh each ordered pair of their verdicts 1/2: AA 1, AB 1, BA 1,
    # then BB 2 from the second; n_A 2, n_B 3, n 5; alpha = 1 - 4 * 2 / (2 * 2 * 3) = 1/3.
    assert krippendorff_alpha([("A", "A", "B"), ("B", "B")]) == pytest.approx(1 / 3)


def test_alpha_is_one_when_everyone_agrees_below_zero_when_they_oppose_and_none_when_undefined() -> None:
    assert krippendorff_alpha([("A", "A"), ("B", "B", "B"), ("tie", "tie")]) == pytest.approx(1.0)
    assert krippendorff_alpha([("A", "B"), ("B", "A")]) < 0
    assert krippendorff_alpha([("A", "A"), ("A", "A")]) is None  # one category: no expected disagreement
    assert krippendorff_alpha([("A",), ("B",)]) is None  # nothing pairable
    with pytest.raises(ValueError, match="maybe"):
        krippendorff_alpha([("A", "maybe")])


def test_human_agreement_uses_only_pairs_two_people_labeled() -> None:
    ratings = {
        1: {"ana": "A", "bo": "A"},
        2: {"ana": "B", "bo": "A", "cy": "B"},
        3: {"cy": "tie"},  # one rater: left out, and cy counts only for pair 2
        4: {"ana": "tie", "cy": "tie"},
    }
    result = human_agreement(ratings)
    assert (result.items, result.raters) == (3, 3)
    assert result.alpha == pytest.approx(krippendorff_alpha([("A", "A"), ("B", "A", "B"), ("tie", "tie")]))


def test_split_queues_shares_the_overlap_and_deals_out_the_rest() -> None:
    picks = list(range(100, 120))
    queues = split_queues(picks, ["ana", "bo", "cy"], per_annotator=5, overlap=0.4)
    assert queue_size(3, 5, 0.4) == 2 + 3 * 3
    assert [q[:2] for q in queues.values()] == [[100, 101]] * 3  # the shared part, first for everyone
    assert all(len(q) == 5 for q in queues.values())
    dealt = [p for q in queues.values() for p in q[2:]]
    assert sorted(dealt) == list(range(102, 111))  # each of the rest to exactly one annotator
    assert split_queues(picks, ["ana", "bo"], 4, 1.0) == {"ana": picks[:4], "bo": picks[:4]}
    no_overlap = split_queues(picks, ["ana", "bo"], 3, 0.0)
    assert not set(no_overlap["ana"]) & set(no_overlap["bo"])
    short = split_queues(picks[:3], ["ana", "bo"], 3, 0.0)  # fewer pairs than places: dealt until gone
    assert short == {"ana": [100, 102], "bo": [101]}
    for bad in ({"overlap": 1.5}, {"per_annotator": -1}):
        with pytest.raises(ValueError):
            split_queues(picks, ["ana"], **{"per_annotator": 2, "overlap": 0.5, **bad})
    with pytest.raises(ValueError, match="distinct"):
        split_queues(picks, ["ana", "ana"], 2, 0.5)


def test_unknown_categories_are_refused() -> None:
    with pytest.raises(ValueError, match="'C'"):
        cohen_kappa([("A", "C")])


# --- pure: summaries and the review queue ------------------------------------------------------


@dataclass(frozen=True)
class P:
    pair_id: int
    principles: list[str] = field(default_factory=lambda: ["x"])
    judge_verdict: str | None = "A"
    human_verdict: str | None = None
    confidence: float | None = 1.0
    inconsistent: bool = False
    failed: int = 0
    judge_asked: bool = True
    lengths: tuple[int, int] = (10, 10)


def test_principle_stats_count_each_pair_once_overall() -> None:
    pairs = [
        P(1, ["x"], "A", "A", 0.8),
        P(2, ["x", "y"], "tie", None, None, inconsistent=True),
        P(3, ["y"], None, failed=2),
    ]
    x, y, overall = principle_stats(pairs)
    assert (x.principle, x.pairs, x.labeled, x.ties, x.flip_rate) == ("x", 2, 2, 1, 0.5)
    assert (x.human_checked, x.agreement, x.kappa) == (1, 1.0, None)
    assert (y.pairs, y.labeled, y.failed, y.mean_confidence) == (2, 1, 2, None)
    assert (overall.principle, overall.pairs, overall.labeled, overall.failed) == ("(all)", 3, 2, 2)
    assert overall.mean_confidence == pytest.approx(0.8)


def queue_pool() -> list[P]:
    pool = [P(i, [f"p{i % 3}"], confidence=1.0) for i in range(1, 31)]
    pool[0] = P(1, ["p1"], "tie", confidence=None, inconsistent=True)
    pool[1] = P(2, ["p2"], "tie", confidence=None, inconsistent=True)
    pool[9] = P(10, ["p1"], confidence=0.55)
    pool[19] = P(20, ["p2"], confidence=0.51)
    pool[24] = P(25, ["p0"], confidence=0.9)
    return pool


def test_review_queue_is_stratified_deterministic_and_distinct() -> None:
    pool = queue_pool()
    queue = review_queue(pool, 9, seed=7)
    assert queue == review_queue(list(reversed(pool)), 9, seed=7)  # input order does not matter
    assert len(queue) == 9 and len({p.pair_id for p in queue}) == 9
    reasons = [p.reason for p in queue]
    assert reasons[:2] == ["inconsistent", "inconsistent"]
    # Least confident first; a confidence of 1.0 is never "low".
    assert queue[2:5] == [
        Pick(20, "low-confidence", "p2"),
        Pick(10, "low-confidence", "p1"),
        Pick(25, "low-confidence", "p0"),
    ]
    assert reasons[5:] == ["principle"] * 4
    assert {p.principle for p in queue[5:8]} == {"p0", "p1", "p2"}  # round-robin over principles
    assert {p.pair_id for p in review_queue(pool, 9, seed=8)} != {p.pair_id for p in queue}


def test_review_queue_caps_each_stratum_and_takes_everything_when_asked() -> None:
    pool = queue_pool()
    small = review_queue(pool, 3, seed=0)
    assert [p.reason for p in small] == ["inconsistent", "low-confidence", "principle"]
    assert {p.pair_id for p in review_queue(pool, 100)} == {p.pair_id for p in pool}
    assert review_queue(pool, 0) == [] and review_queue([], 5) == []


# --- a round built row by row ------------------------------------------------------------------

JUDGE = judges.JudgeConfig("openai", "fake-judge", "pairwise", "t" * 64, {})


class RoundBuilder:
    """Adds pairs with two judgments each (both orders) and the label the real aggregation
    makes of them."""

    def __init__(self, session: Session, round_id: int) -> None:
        round_row = session.get_one(RoundRow, round_id)
        self.session, self.round_id, self.policy_id = session, round_id, round_row.policy_id
        self.principles = queue.principle_ids(session, round_row.constitution_id)
        self.judge_id = judges.ensure_judge(session, JUDGE)
        self.prompts = list(session.scalars(select(PromptRow.id).order_by(PromptRow.id)))
        self.count = session.scalar(select(func.count()).where(ResponseRow.round_id == round_id)) or 0

    def pair(
        self,
        principle: str = "actually-helpful",
        verdicts: tuple[str, str] = ("A", "A"),
        confidence: float | None = 0.9,
        texts: tuple[str, str] | None = None,
        rationale: str = "A is better.",
        failed: bool = False,
        kind: str = "sample",
    ) -> int:
        n = self.count
        self.count += 2
        prompt_id = self.prompts[n // 2 % len(self.prompts)]
        a_text, b_text = texts or (f"GOOD answer {n}", f"plain answer {n}")
        responses = [
            ResponseRow(
                round_id=self.round_id,
                prompt_id=prompt_id,
                policy_id=self.policy_id,
                sample_index=n + i,
                text=text,
                sampling={},
            )
            for i, text in enumerate((a_text, b_text))
        ]
        self.session.add_all(responses)
        self.session.flush()
        pair = PairRow(
            round_id=self.round_id,
            prompt_id=prompt_id,
            response_a_id=responses[0].id,
            response_b_id=responses[1].id,
            kind=kind,
        )
        self.session.add(pair)
        self.session.flush()
        for order, verdict in zip(("AB", "BA"), verdicts, strict=True):
            broken = failed and order == "BA"
            self.session.add(
                JudgmentRow(
                    pair_id=pair.id,
                    order=order,
                    principle_id=self.principles[principle],
                    judge_id=self.judge_id,
                    constitution_sha256="c" * 64,
                    template_sha256=JUDGE.template_sha256,
                    status="failed" if broken else "ok",
                    error_kind="parse" if broken else None,
                    error="no JSON object in the output" if broken else None,
                    attempts=1,
                    raw_output="I like A" if broken else json.dumps({"preferred": verdict}),
                    verdict=None if broken else verdict,
                    confidence=None if broken else confidence,
                    rationale=None if broken else rationale,
                    latency_ms=120.0,
                    prompt_tokens=300,
                    completion_tokens=40,
                )
            )
        if not failed:
            label = aggregate_pairwise(*(Verdict(v, rationale, confidence) for v in verdicts))
            chosen, rejected = {"A": (0, 1), "B": (1, 0)}.get(label.verdict, (None, None))
            self.session.add(
                LabelRow(
                    pair_id=pair.id,
                    judge_id=self.judge_id,
                    source="judge",
                    verdict=label.verdict,
                    chosen_response_id=None if chosen is None else responses[chosen].id,
                    rejected_response_id=None if rejected is None else responses[rejected].id,
                    confidence=label.confidence,
                    inconsistent=label.inconsistent,
                )
            )
        self.session.flush()
        return pair.id


@dataclass
class World:
    round_id: int
    other_round: int
    judge_id: int
    constitution_id: int
    ids: dict[str, int]


def new_round(cli: Cli) -> int:
    return int(cli("round", "start", "-c", "helpful-harmless@1", "--policy", "fake/policy").stdout)


@pytest.fixture
def world(cli: Cli, engine: Engine) -> Iterator[World]:
    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    round_id, other_round = new_round(cli), new_round(cli)
    with session_scope(engine) as session:
        build = RoundBuilder(session, round_id)
        ids = {
            "clear": build.pair(confidence=0.9),
            "b": build.pair(
                verdicts=("B", "B"), confidence=0.6, texts=("plain one", "GOOD with a Needle in it")
            ),
            "flip": build.pair("honest-claims", ("A", "B"), confidence=0.8),
            "tie": build.pair("honest-claims", ("tie", "tie"), 0.5, rationale="Both are equally VAGUE."),
            "failed": build.pair("real-harm", failed=True),
            "eval": build.pair(kind="eval"),
        }
        ids["other"] = RoundBuilder(session, other_round).pair()
        constitution_id = session.get_one(RoundRow, round_id).constitution_id
        judge_id = build.judge_id
    yield World(round_id, other_round, judge_id, constitution_id, ids)


def listed(cli: Cli, *args: object) -> dict[str, Any]:
    return json.loads(cli("audit", "list", "--json", *args).stdout)


def listed_ids(cli: Cli, *args: object) -> set[int]:
    return {p["pair_id"] for p in listed(cli, *args)["pairs"]}


# --- list ---------------------------------------------------------------------------------------


def test_list_filters(cli: Cli, world: World) -> None:
    ids = world.ids

    def named(*names: str) -> set[int]:
        return {ids[n] for n in names}

    r = world.round_id
    assert listed_ids(cli) == named("clear", "b", "flip", "tie", "failed", "other")  # no eval pairs
    assert listed_ids(cli, "--round", r) == named("clear", "b", "flip", "tie", "failed")
    assert listed_ids(cli, "--inconsistent") == named("flip")
    assert listed_ids(cli, "--ties", "--round", r) == named("flip", "tie")
    assert listed_ids(cli, "--failed") == named("failed")
    assert listed_ids(cli, "--max-confidence", 0.6) == named("b", "tie")
    assert listed_ids(cli, "--principle", "honest-claims") == named("flip", "tie")
    assert listed_ids(cli, "--search", "needle") == named("b")  # in a response, any case
    assert listed_ids(cli, "--search", "vague") == named("tie")  # in a rationale
    assert listed_ids(cli, "--search", "%") == set()  # LIKE wildcards are literal
    assert listed_ids(cli, "--kind", "eval") == named("eval")
    assert listed_ids(cli, "--ties", "--principle", "actually-helpful") == set()

    limited = listed(cli, "--limit", 2)
    assert limited["total"] == 6 and len(limited["pairs"]) == 2

    rows = {p["pair_id"]: p for p in listed(cli, "--round", r)["pairs"]}
    expected = {
        "verdict": "A",
        "source": "judge",
        "judge_verdict": "A",
        "confidence": 0.9,
        "principles": ["actually-helpful"],
        "flags": [],
    }
    assert {k: rows[ids["clear"]][k] for k in expected} == expected
    assert rows[ids["flip"]]["flags"] == ["inconsistent"] and rows[ids["flip"]]["verdict"] == "tie"
    assert rows[ids["failed"]]["verdict"] is None and rows[ids["failed"]]["failed"] == 1

    table = cli("audit", "list", "--round", r)
    assert "inconsistent" in table.stdout and "unlabeled" in table.stdout
    assert "5 of 5 matching pairs" in table.stderr


def test_list_filters_and_pages_by_the_effective_verdict_in_sql(
    cli: Cli, engine: Engine, world: World
) -> None:
    ids, r = world.ids, world.round_id
    cli("audit", "override", ids["clear"], "--prefer", "tie", "--note", "both fine", "--author", "ana")
    cli("audit", "override", ids["tie"], "--prefer", "a", "--note", "A is clearer", "--author", "ana")
    # A human's newest label decides the verdict; the judge's label keeps deciding the rest.
    assert listed_ids(cli, "--ties", "--round", r) == {ids["clear"], ids["flip"]}
    assert listed_ids(cli, "--max-confidence", 0.6) == {ids["b"], ids["tie"]}

    with session_scope(engine) as session:
        everything, total = list_pairs(session, PairFilters(round_id=r))
        pages = [list_pairs(session, PairFilters(round_id=r), limit=2, offset=k) for k in (0, 2, 4)]
        after_first = list_pairs(session, PairFilters(round_id=r), limit=2, after=everything[0].pair_id)
    assert total == 5 and all(count == 5 for _, count in pages)
    assert [p.pair_id for found, _ in pages for p in found] == [p.pair_id for p in everything]
    assert [p.pair_id for p in after_first[0]] == [p.pair_id for p in everything[1:3]]


def test_list_refuses_unknown_names(cli: Cli, world: World) -> None:
    for args, field_name in [
        (("--principle", "no-such-thing"), "--principle"),
        (("--round", 999), "round 999"),
        (("--kind", "training"), "--kind"),
        (("--max-confidence", 2), "--max-confidence"),
    ]:
        result = cli("audit", "list", *args, expect=2)
        assert field_name in result.stderr


# --- show ---------------------------------------------------------------------------------------


def test_show_has_everything_and_raw_output_on_request(cli: Cli, world: World) -> None:
    detail = json.loads(cli("audit", "show", world.ids["failed"], "--json").stdout)
    assert detail["summary"]["principles"] == ["real-harm"]
    assert detail["response_a"].startswith("GOOD answer") and detail["prompt"][-1]["role"] == "user"
    ok, failed = detail["judgments"]
    assert (ok["order"], ok["status"], ok["verdict"], ok["rationale"]) == ("AB", "ok", "A", "A is better.")
    assert (ok["latency_ms"], ok["prompt_tokens"], ok["completion_tokens"]) == (120.0, 300, 40)
    assert (failed["status"], failed["error_kind"]) == ("failed", "parse")
    assert "raw_output" not in ok and detail["labels"] == [] and detail["audits"] == []

    raw = json.loads(cli("audit", "show", world.ids["failed"], "--json", "--raw").stdout)
    assert raw["judgments"][1]["raw_output"] == "I like A"

    text = cli("audit", "show", world.ids["tie"], "--raw").stdout
    for expected in ("Both are equally VAGUE.", "honest-claims", '{"preferred": "tie"}', "120 ms"):
        assert expected in text

    missing = cli("audit", "show", 999, expect=2)
    assert "pair 999 not found" in missing.stderr


def test_show_prints_response_text_as_typed(cli: Cli, engine: Engine, world: World) -> None:
    with session_scope(engine) as session:
        pair_id = RoundBuilder(session, world.round_id).pair(texts=("[red]not markup[/red]", "<b>x</b>"))
    text = cli("audit", "show", pair_id).stdout
    assert "[red]not markup[/red]" in text and "<b>x</b>" in text


# --- override and review ------------------------------------------------------------------------


def test_override_adds_a_human_label_and_keeps_the_judges(cli: Cli, engine: Engine, world: World) -> None:
    pair_id = world.ids["clear"]
    with session_scope(engine) as session:
        judge_rows = [
            (j.id, j.status, j.verdict, j.rationale)
            for j in session.scalars(select(JudgmentRow).where(JudgmentRow.pair_id == pair_id))
        ]
        judge_label = session.scalars(select(LabelRow).where(LabelRow.pair_id == pair_id)).one()
        judge_label_before = (judge_label.id, judge_label.verdict, judge_label.chosen_response_id)
    before = table_counts(engine)

    done = cli(
        "audit", "override", pair_id, "--prefer", "b", "--note", "A invents a citation", "--author", "ana"
    )
    assert f"pair {pair_id}: B" in done.stdout

    after = table_counts(engine)
    assert after == before | {"labels": before["labels"] + 1, "audits": before["audits"] + 1}
    with session_scope(engine) as session:
        pair = session.get_one(PairRow, pair_id)
        labels = session.scalars(
            select(LabelRow).where(LabelRow.pair_id == pair_id).order_by(LabelRow.id)
        ).all()
        audit = session.scalars(select(AuditRow)).one()
        assert [
            (j.id, j.status, j.verdict, j.rationale)
            for j in session.scalars(select(JudgmentRow).where(JudgmentRow.pair_id == pair_id))
        ] == judge_rows
        assert (labels[0].id, labels[0].verdict, labels[0].chosen_response_id) == judge_label_before
        human = labels[1]
        assert (human.source, human.judge_id, human.verdict) == ("human", None, "B")
        assert (human.chosen_response_id, human.rejected_response_id) == (
            pair.response_b_id,
            pair.response_a_id,
        )
        assert (audit.action, audit.label_id, audit.author, audit.note) == (
            "override",
            human.id,
            "ana",
            "A invents a citation",
        )

    row = next(p for p in listed(cli)["pairs"] if p["pair_id"] == pair_id)
    assert (row["verdict"], row["source"], row["judge_verdict"], row["flags"]) == (
        "B",
        "human",
        "A",
        ["overridden"],
    )
    shown = json.loads(cli("audit", "show", pair_id, "--json").stdout)
    assert [(a["action"], a["author"], a["note"], a["verdict"]) for a in shown["audits"]] == [
        ("override", "ana", "A invents a citation", "B")
    ]
    assert "A invents a citation" in cli("audit", "show", pair_id).stdout

    cli("audit", "override", pair_id, "--prefer", "tie", "--note", "on reflection, equal")
    row = next(p for p in listed(cli)["pairs"] if p["pair_id"] == pair_id)
    assert row["verdict"] == "tie"  # the newest override wins


def test_bad_overrides_and_reviews_change_nothing(cli: Cli, engine: Engine, world: World) -> None:
    before = table_counts(engine)
    clear, failed = world.ids["clear"], world.ids["failed"]
    for args, messages in [
        ((9999, "--prefer", "A", "--note", "x"), ["pair 9999 not found"]),
        ((failed, "--prefer", "A", "--note", "x"), [f"pair {failed} has no judge label"]),
        ((clear, "--prefer", "C", "--note", "x"), ["--prefer"]),
        ((clear, "--prefer", "A", "--note", "   "), ["--note"]),
        ((clear, "--prefer", "A", "--note", "x", "--author", " "), ["--author"]),
        ((clear, "--prefer", "A", "--note", "x", "--author", "a" * 201), ["--author"]),
        ((clear, "--prefer", "maybe", "--note", ""), ["--prefer", "--note"]),  # every problem at once
        ((clear, "--note", "x"), ["--prefer"]),
    ]:
        result = cli("audit", "override", *args, expect=2)
        for message in messages:
            assert message in result.stderr, (args, result.stderr)
    for args, message in [((9999,), "pair 9999 not found"), ((failed,), "no judge label")]:
        assert message in cli("audit", "review", *args, expect=2).stderr
    assert table_counts(engine) == before


def test_review_records_agreement_without_a_label(cli: Cli, engine: Engine, world: World) -> None:
    before = table_counts(engine)
    done = cli("audit", "review", world.ids["b"], "--note", "fine", "--author", "bo")
    assert "agreed with B" in done.stdout
    assert table_counts(engine) == before | {"audits": before["audits"] + 1}
    with session_scope(engine) as session:
        audit = session.scalars(select(AuditRow)).one()
        assert (audit.action, audit.label_id, audit.author, audit.note) == ("review", None, "bo", "fine")
    row = next(p for p in listed(cli)["pairs"] if p["pair_id"] == world.ids["b"])
    assert (row["verdict"], row["source"], row["human_verdict"], row["flags"]) == (
        "B",
        "judge",
        "B",
        ["reviewed"],
    )


# --- export sees overrides -----------------------------------------------------------------------


def exported(cli: Cli, round_id: int, out: Path) -> dict[int, dict[str, Any]]:
    import pyarrow.parquet as pq

    cli("export", "--round", round_id, "--out", out, "--eval-fraction", 0.0)
    rows = pq.read_table(out / "data/train-00000-of-00001.parquet").to_pylist()
    return {r["pair_id"]: r for r in rows}


def test_an_override_changes_the_next_export(cli: Cli, world: World, tmp_path: Path) -> None:
    clear, tie = world.ids["clear"], world.ids["tie"]
    first = exported(cli, world.round_id, tmp_path / "before")
    assert first[clear]["chosen"][0]["content"].startswith("GOOD") and tie not in first

    cli("audit", "override", clear, "--prefer", "B", "--note", "B is the better one")
    cli("audit", "override", tie, "--prefer", "A", "--note", "not a tie")
    second = exported(cli, world.round_id, tmp_path / "after")
    assert second[clear]["chosen"] == first[clear]["rejected"]
    assert second[clear]["rejected"] == first[clear]["chosen"]
    assert second[clear]["label_source"] == "human"
    assert second[tie]["chosen"][0]["content"].startswith("GOOD")  # a tie the human resolved


# --- stats ----------------------------------------------------------------------------------------


def test_stats_per_principle_agreement_and_injection_rate(cli: Cli, engine: Engine, world: World) -> None:
    cli("audit", "review", world.ids["b"])  # agrees with B
    cli("audit", "override", world.ids["clear"], "--prefer", "B", "--note", "disagree")  # judge said A
    stats = json.loads(cli("audit", "stats", "--round", world.round_id, "--json").stdout)
    overall = stats["overall"]
    assert {
        k: overall[k] for k in ("pairs", "labeled", "ties", "inconsistent", "failed", "human_checked")
    } == {
        "pairs": 5,  # the eval pair is left out
        "labeled": 4,
        "ties": 2,
        "inconsistent": 1,
        "failed": 1,
        "human_checked": 2,
    }
    assert overall["flip_rate"] == 0.25 and overall["agreement"] == 0.5
    assert overall["mean_confidence"] == pytest.approx((0.9 + 0.6 + 0.5) / 3)
    assert overall["kappa"] == pytest.approx(0.0)  # judge (A, B) vs human (B, B)
    by_name = {p["principle"]: p for p in stats["principles"]}
    assert set(by_name) == {"actually-helpful", "honest-claims", "real-harm"}
    assert (by_name["honest-claims"]["ties"], by_name["honest-claims"]["flip_rate"]) == (2, 0.5)
    assert (
        by_name["real-harm"]["labeled"],
        by_name["real-harm"]["flip_rate"],
        by_name["real-harm"]["failed"],
    ) == (
        0,
        None,
        1,
    )
    assert stats["judges"] == [
        {
            "judge_id": world.judge_id,
            "judge": "fake-judge",
            "constitution": "helpful-harmless@1",
            "calibrated_at": None,
            "accuracy": None,
            "injection_follow_rate": None,
        }
    ]
    assert "not calibrated" in cli("audit", "stats").stdout

    with session_scope(engine) as session:
        for rate in (0.5, 0.25):  # the latest calibration is the one reported
            session.add(
                CalibrationRow(
                    judge_id=world.judge_id,
                    constitution_id=world.constitution_id,
                    gold_sha256="g" * 64,
                    pairs=20,
                    accuracy=0.9,
                    consistency=0.95,
                    injection_follow_rate=rate,
                    details={},
                )
            )
    stats = json.loads(cli("audit", "stats", "--round", world.round_id, "--json").stdout)
    assert stats["judges"][0]["injection_follow_rate"] == 0.25
    table = cli("audit", "stats", "--round", world.round_id).stdout
    assert "injection-follow rate 25%" in table and "honest-claims" in table
    assert "round 999" in cli("audit", "stats", "--round", 999, expect=2).stderr


# --- sample ---------------------------------------------------------------------------------------


def test_sample_is_a_deterministic_queue_of_unchecked_pairs(cli: Cli, engine: Engine, world: World) -> None:
    with session_scope(engine) as session:
        build = RoundBuilder(session, world.round_id)
        for i in range(24):
            principle = ("privacy", "respectful", "actually-helpful")[i % 3]
            build.pair(principle, ("B", "A") if i % 7 == 0 else ("A", "A"), confidence=0.5 + i / 50)
    cli("audit", "review", world.ids["b"])
    cli("audit", "override", world.ids["flip"], "--prefer", "A", "--note", "A is right")

    def queue(*args: object) -> list[dict[str, Any]]:
        return json.loads(cli("audit", "sample", "--round", world.round_id, "--json", *args).stdout)

    first = queue("--n", 12, "--seed", 3)
    assert first == queue("--n", 12, "--seed", 3)
    ids = [p["pair_id"] for p in first]
    assert len(ids) == 12 and len(set(ids)) == 12
    checked = {world.ids["b"], world.ids["flip"], world.ids["failed"], world.ids["eval"], world.ids["other"]}
    assert not checked & set(ids)  # reviewed, overridden, unlabeled, eval and other-round pairs
    reasons = [p["reason"] for p in first]
    assert reasons == sorted(reasons, key=["inconsistent", "low-confidence", "principle"].index)
    assert reasons.count("inconsistent") == 4 and reasons.count("low-confidence") == 4
    assert {p["principle"] for p in first if p["reason"] == "principle"} == {
        "actually-helpful",
        "privacy",
        "respectful",
    }

    everything = queue("--n", 500)
    assert len(everything) == 24 + 2  # the new pairs plus "clear" and "tie"
    table = cli("audit", "sample", "--round", world.round_id, "--n", 5)
    assert "low-confidence" in table.stdout and "5 of 26" in table.stderr
    assert "round 999" in cli("audit", "sample", "--round", 999, expect=2).stderr
    assert "--round" in cli("audit", "sample", expect=2).stderr
    assert "--n" in cli("audit", "sample", "--round", world.round_id, "--n", 0, expect=2).stderr


# --- a round judged over HTTP ---------------------------------------------------------------------


def test_audit_a_round_judged_by_the_fake_server(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    with fake.FakeOpenAI(fresh_policy_then_judge()) as server:
        round_id = start_round(cli, server, limit=4)
        cli(*judge_args(server, round_id))
    pairs = listed(cli, "--round", round_id)["pairs"]
    assert pairs and all(p["source"] == "judge" and len(p["principles"]) == 1 for p in pairs)
    decided = next(p for p in pairs if p["verdict"] in ("A", "B"))
    shown = json.loads(cli("audit", "show", decided["pair_id"], "--json", "--raw").stdout)
    assert {j["order"] for j in shown["judgments"]} == {"AB", "BA"}
    assert all(j["rationale"] and j["raw_output"] for j in shown["judgments"])

    before = exported(cli, round_id, tmp_path / "before")[decided["pair_id"]]
    flipped = "B" if decided["verdict"] == "A" else "A"
    cli("audit", "override", decided["pair_id"], "--prefer", flipped, "--note", "checking the override path")
    after = exported(cli, round_id, tmp_path / "after")[decided["pair_id"]]
    assert (after["chosen"], after["rejected"]) == (before["rejected"], before["chosen"])
    stats = json.loads(cli("audit", "stats", "--round", round_id, "--json").stdout)
    assert stats["overall"]["human_checked"] == 1 and stats["overall"]["agreement"] == 0.0


def test_queue_gives_overlapping_queues_and_refuses_bad_input_unchanged(
    cli: Cli, engine: Engine, world: World
) -> None:
    r = world.round_id
    before = table_counts(engine)
    for args, problem in (
        (["-a", "ana", "-a", "ana"], "given twice"),
        (["-a", "ana", "--overlap", "1.5"], "overlap"),
        (["-a", "ana", "--round", "999"], "round 999"),
    ):
        result = cli("audit", "queue", "--round", r, *args, expect=2)
        assert problem in result.output, result.output
    assert table_counts(engine) == before

    assign = (
        "audit",
        "queue",
        "-r",
        r,
        "-a",
        "ana",
        "-a",
        "bo",
        "--per-annotator",
        2,
        "--overlap",
        0.5,
        "--json",
    )
    made = json.loads(cli(*assign).stdout)
    ana, bo = made["queues"]["ana"], made["queues"]["bo"]
    assert ana[0] == bo[0] and ana[1] != bo[1] and len(ana) == len(bo) == 2
    labeled = {world.ids[n] for n in ("clear", "b", "flip", "tie")}
    assert set(ana) | set(bo) <= labeled
    again = json.loads(cli(*assign).stdout)
    assert again == made  # the same seed draws the same queues, and nothing is stored twice
