"""How a label is made, end to end against the loopback judge: soft probabilities read from its
logprobs and combined over both orders, principle ensembles (mean probability; without
probabilities, a majority of the order-consistent verdicts), the chain-of-thought clamp, the
judge's length bias in audit and report, a length-balanced export, and calibration by ensemble
size. The pure rules (ensemble_label, pair_prob_a, length_controlled) are tested beside them."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine, select

from cai.constitution import load_constitution
from cai.evaluate import length_controlled
from cai.judge import PairLabel, Verdict, aggregate_pairwise, pair_prob_a
from cai.labelling import ensemble_label, sampled_principle, sampled_principles
from cai.store.db import session_scope
from cai.store.models import JudgeRow, JudgmentRow, LabelRow, PrincipleRow
from cai.store.reporting import gather_report
from tests import fake_openai as fake
from tests.conftest import REPO, Cli

HH = REPO / "constitutions/helpful-harmless/v1.yaml"


# --- the rules, pure ---------------------------------------------------------------------------


def soft(choice: str, p_a: float) -> Verdict:
    return Verdict(choice, "", None, {"A": p_a, "B": 1 - p_a, "tie": 0.0})


def test_a_pairs_probability_is_the_mean_of_its_orders_clamped_to_the_band() -> None:
    assert pair_prob_a(soft("A", 0.9), soft("A", 0.7)) == pytest.approx(0.8)
    assert pair_prob_a(soft("A", 0.9), soft("A", 0.7), band=(0.4, 0.6)) == 0.6
    assert pair_prob_a(soft("A", 0.9), Verdict("A", "")) is None  # one order without probabilities
    label = aggregate_pairwise(soft("B", 0.2), soft("B", 0.4))
    assert (label.verdict, label.confidence, label.prob_a) == ("B", pytest.approx(0.7), pytest.approx(0.3))
    # The tie's own mass is set aside: A's share of A and B.
    assert pair_prob_a(Verdict("A", "", None, {"A": 0.3, "B": 0.1, "tie": 0.6}), soft("A", 0.75)) == 0.75


def test_an_ensemble_takes_the_mean_probability_or_else_a_majority_of_consistent_verdicts() -> None:
    one = PairLabel("A", 0.9, False, 0.9)
    assert ensemble_label([one]) is one  # K = 1 is that principle's label
    mean = ensemble_label([PairLabel("A", 0.9, False, 0.9), PairLabel("tie", None, True, 0.4)])
    assert (mean.verdict, mean.confidence, mean.prob_a) == ("A", pytest.approx(0.65), pytest.approx(0.65))
    hard = [PairLabel("A", 1.0, False), PairLabel("A", 1.0, False), PairLabel("tie", None, True)]
    assert ensemble_label(hard) == PairLabel("A", pytest.approx(2 / 3), False)
    split = [PairLabel("A", 1.0, False), PairLabel("B", 1.0, False), PairLabel("tie", None, True)]
    assert ensemble_label(split) == PairLabel("tie", None, False)
    flipped = [PairLabel("tie", None, True), PairLabel("tie", None, True)]
    assert ensemble_label(flipped) == PairLabel("tie", None, True)


def test_principles_are_distinct_drawn_by_weight_and_a_larger_k_only_adds() -> None:
    constitution = load_constitution(HH).constitution
    judged = [p.id for p in constitution.principles if p.kind == "llm"]
    for subject in ("pair:1", "pair:2", "pair:3"):
        five = sampled_principles(constitution, 0, subject, 5)
        assert len(set(five)) == 5 and set(five) <= set(judged)
        assert five[0] == sampled_principle(constitution, 0, subject)
        assert sampled_principles(constitution, 0, subject, 3) == five[:3]
    assert sorted(sampled_principles(constitution, 0, "pair:1", 99)) == sorted(judged)
    weights = {p.id: p.weight for p in constitution.principles}
    heaviest = max(weights, key=weights.__getitem__)
    firsts = Counter(sampled_principles(constitution, 7, f"pair:{i}", 2)[0] for i in range(3000))
    assert firsts[heaviest] / 3000 == pytest.approx(weights[heaviest] / sum(weights.values()), abs=0.03)


def test_a_policy_that_only_got_longer_wins_raw_but_not_length_controlled() -> None:
    rng = random.Random(0)
    longer = []
    for _ in range(1000):
        difference = rng.gauss(30, 40)  # the candidate is usually longer...
        won = rng.random() < 1 / (1 + pow(2.718281828, -difference / 20))  # ...and length alone decides
        longer.append((1.0 if won else 0.0, round(difference)))
    result = length_controlled(longer)
    assert result is not None and result.raw_win_rate > 0.65 and result.length_coef > 1
    assert abs(result.win_rate - 0.5) < 0.08, result
    better = [(1.0 if rng.random() < 0.7 else 0.0, rng.randint(-30, 30)) for _ in range(1000)]
    result = length_controlled(better)
    assert result is not None and result.win_rate == pytest.approx(result.raw_win_rate, abs=0.03)
    assert result.win_rate > 0.65
    assert length_controlled([]) is None


# --- against the loopback judge ----------------------------------------------------------------


def varied_answers(request: dict[str, Any]) -> str:
    """Policy: answers of 3 to 14 words, different for each draw."""
    varied_answers.draws += 1  # type: ignore[attr-defined]
    draw = varied_answers.draws  # type: ignore[attr-defined]
    return " ".join(["Here", "is", "answer", str(draw)] + ["more"] * (draw * 7 % 11)) + "."


def principle_of(prompt: str) -> str:
    found = re.search(r"The principle to apply \(([a-z0-9_-]+)\)", prompt)
    assert found, "no principle in the judge prompt"
    return found.group(1)


def belief_in_longer(principle: str) -> float:
    """How sure the judge is that the longer response is better, fixed per principle."""
    return 0.55 + 0.4 * (int(hashlib.sha256(principle.encode()).hexdigest(), 16) % 100) / 100


def prefers_longer(request: dict[str, Any]) -> fake.Reply:
    """Judge: the longer response, with a probability that depends on the principle; except on
    prompts whose hash is 0 mod 4, where it prefers the shorter one (so not every label is longer)."""
    prompt = fake.prompt_text(request)
    a, b = fake.fenced(prompt, "RESPONSE A"), fake.fenced(prompt, "RESPONSE B")
    assert a is not None and b is not None
    conversation = fake.fenced(prompt, "USER TURN") or ""
    contrary = int(hashlib.sha256(conversation.encode()).hexdigest(), 16) % 4 == 0
    a_longer = len(a) > len(b)
    pick, other = ("A", "B") if a_longer != contrary else ("B", "A")
    p = belief_in_longer(principle_of(prompt))
    return fake.Reply(json.dumps({"rationale": "Length.", "preferred": pick}), {pick: p, other: 1 - p})


def judged_round(cli: Cli, server: fake.FakeOpenAI, *judge_flags: str | int) -> int:
    varied_answers.draws = 0  # type: ignore[attr-defined]
    cli("constitution", "register", HH)
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    round_id = int(cli("round", "start", "-c", "helpful-harmless@1", "--policy", "fake/policy").stdout)
    with fake.FakeOpenAI(varied_answers) as policy:
        cli(
            "generate",
            "-r",
            round_id,
            "--limit",
            8,
            "--samples",
            2,
            "--backend",
            "openai",
            "--base-url",
            policy.base_url,
        )
    cli(
        "judge",
        "-r",
        round_id,
        "--judge-base-url",
        server.base_url,
        "--judge-model",
        "fake-judge",
        *judge_flags,
    )
    return round_id


def labels_and_judgments(
    engine: Engine, round_id: int
) -> list[tuple[LabelRow, list[tuple[str, JudgmentRow]]]]:
    with session_scope(engine) as session:
        labels = list(
            session.scalars(select(LabelRow).where(LabelRow.source == "judge").order_by(LabelRow.id))
        )
        out = []
        for label in labels:
            rows = session.execute(
                select(PrincipleRow.key, JudgmentRow)
                .join(PrincipleRow, PrincipleRow.id == JudgmentRow.principle_id)
                .where(JudgmentRow.pair_id == label.pair_id, JudgmentRow.judge_id == label.judge_id)
            ).all()
            out.append((label, [(key, row) for key, row in rows]))
        session.expunge_all()
    return out


def test_an_ensemble_of_three_principles_labels_by_their_mean_probability(
    cli: Cli, engine: Engine, tmp_path: Path
) -> None:
    with fake.FakeOpenAI(prefers_longer) as judge:
        round_id = judged_round(cli, judge, "--principles-per-pair", 3)
    labelled = labels_and_judgments(engine, round_id)
    assert labelled
    for label, judgments in labelled:
        principles = Counter(key for key, _ in judgments)
        assert len(principles) == 3 and set(principles.values()) == {2}  # 3 principles x 2 orders
        p_a = (
            sum(
                row.choice_probs["A"] / (row.choice_probs["A"] + row.choice_probs["B"])
                for _, row in judgments
            )
            / 6
        )
        assert label.verdict == ("A" if p_a > 0.5 else "B")
        assert label.confidence == pytest.approx(max(p_a, 1 - p_a))
    with session_scope(engine) as session:
        judge = session.scalars(select(JudgeRow).where(JudgeRow.backend != "rule")).one()
        assert judge.params["principles_per_pair"] == 3
    # The per-principle verdicts stay visible: in the pair's audit view and in the export.
    pair_id = labelled[0][0].pair_id
    shown = json.loads(cli("audit", "show", pair_id, "--json").stdout)
    assert len({j["principle"] for j in shown["judgments"] if j["principle"] != "rule"}) >= 3
    out = (
        Path(cli.db_url.removeprefix("sqlite:///")).parent / "snap"
        if cli.db_url.startswith("sqlite")
        else None
    )
    snapshot = out or Path(f"/tmp/snap-{round_id}-{id(cli)}")
    cli("export", "-r", round_id, "--out", snapshot, "--eval-fraction", 0, "--overwrite")
    rows = pq.read_table(next((snapshot / "data").glob("train-*.parquet"))).to_pylist()
    for row in rows:
        assert len(row["principle_verdicts"]) == 6
        assert {v["preferred"] for v in row["principle_verdicts"]} <= {"chosen", "rejected", "tie"}
        mean = sum(v["p_chosen"] for v in row["principle_verdicts"]) / 6
        assert row["confidence"] == pytest.approx(mean)


def test_chain_of_thought_asks_for_reasoning_first_and_clamps_the_probability(
    cli: Cli, engine: Engine
) -> None:
    with fake.FakeOpenAI(prefers_longer) as judge:
        round_id = judged_round(cli, judge, "--reasoning", "cot", "--cot-band", "0.45-0.55")
        prompts = [fake.prompt_text(r) for r in judge.requests]
    assert prompts and all("Think step by step" in p for p in prompts)
    labelled = labels_and_judgments(engine, round_id)
    assert labelled and all(0.5 <= (label.confidence or 0) <= 0.55 for label, _ in labelled)
    with session_scope(engine) as session:
        judge_row = session.scalars(select(JudgeRow).where(JudgeRow.backend != "rule")).one()
        assert (judge_row.params["reasoning"], judge_row.params["cot_band"]) == ("cot", [0.45, 0.55])
    cli("judge", "-r", round_id, "--cot-band", "0.6-0.9", "--reasoning", "cot", expect=2)


def test_without_logprobs_an_ensemble_takes_the_majority_of_consistent_verdicts(
    cli: Cli, engine: Engine
) -> None:
    def moody(request: dict[str, Any]) -> str:
        """Prefers the longer answer, except under two principles, where it always says 'A'
        (so its two orders disagree there)."""
        prompt = fake.prompt_text(request)
        if principle_of(prompt) in moody.fickle:  # type: ignore[attr-defined]
            return json.dumps({"rationale": "First.", "preferred": "A"})
        return prefers_longer(request).content

    moody.fickle = {p.id for p in load_constitution(HH).constitution.principles[:2]}  # type: ignore[attr-defined]
    with fake.FakeOpenAI(moody, logprobs="refuse") as judge:
        round_id = judged_round(cli, judge, "--principles-per-pair", 3)
    labelled = labels_and_judgments(engine, round_id)
    votes_seen = set()
    for label, judgments in labelled:
        by_principle: dict[str, dict[str, str]] = {}
        for key, row in judgments:
            assert row.choice_probs is None
            by_principle.setdefault(key, {})[row.order] = row.verdict
        consistent = [v["AB"] for v in by_principle.values() if v["AB"] == v["BA"]]
        winner, votes = Counter(consistent).most_common(1)[0] if consistent else ("tie", 0)
        if consistent and 2 * votes > len(consistent) and winner != "tie":
            assert (label.verdict, label.confidence) == (winner, pytest.approx(votes / 3))
            votes_seen.add(votes)
        else:
            assert label.verdict == "tie" and label.inconsistent == (not consistent)
    assert votes_seen == {2, 3}  # some pairs drew a fickle principle, some did not


def test_the_judges_length_bias_shows_in_audit_and_report_and_export_can_balance_it(
    cli: Cli, engine: Engine, tmp_path: Path
) -> None:
    with fake.FakeOpenAI(prefers_longer) as judge:
        round_id = judged_round(cli, judge)
    labelled = labels_and_judgments(engine, round_id)
    stats = json.loads(cli("audit", "stats", "--round", round_id, "--json").stdout)
    overall = stats["overall"]
    assert overall["length_decided"] > 0
    # The pairs where the judge went for the shorter answer are exactly the contrary prompts.
    assert 0.5 < overall["longer_won"] < 1.0
    with session_scope(engine) as session:
        report = gather_report(session, round_id)
    pooled = sum(s.longer for s in report.principle_totals) / sum(
        s.length_decided for s in report.principle_totals
    )
    assert pooled == pytest.approx(overall["longer_won"])
    plain, balanced = tmp_path / "plain", tmp_path / "balanced"
    cli("export", "-r", round_id, "--out", plain, "--eval-fraction", 0)
    cli("export", "-r", round_id, "--out", balanced, "--eval-fraction", 0, "--length-balance")

    def sides(snapshot: Path) -> Counter[str]:
        rows = pq.read_table(next((snapshot / "data").glob("train-*.parquet"))).to_pylist()
        return Counter(
            "longer" if len(r["chosen"][0]["content"].split()) > len(r["rejected"][0]["content"].split()) else
            "shorter" if len(r["chosen"][0]["content"].split()) < len(r["rejected"][0]["content"].split()) else
            "same"
            for r in rows
        )  # fmt: skip

    before, after = sides(plain), sides(balanced)
    assert before["longer"] > before["shorter"] > 0
    assert after["longer"] == after["shorter"] == before["shorter"]
    manifest = json.loads((balanced / "manifest.json").read_text())
    assert manifest["filters"]["length_balance"] is True
    assert len(labelled) >= sum(before.values())


def test_calibration_reports_accuracy_and_flips_by_ensemble_size(cli: Cli) -> None:
    cli("constitution", "register", HH)
    gold = [
        json.loads(line)
        for line in (REPO / "prompt_sets/gold/helpful-harmless-gold.jsonl").read_text().splitlines()
    ]
    canaries = [
        json.loads(line)
        for line in (REPO / "prompt_sets/gold/injection-canaries.jsonl").read_text().splitlines()
    ]
    better = {row["better"] for row in gold} | {row["clean"] for row in canaries}
    with fake.FakeOpenAI(fake.knows_better(better, accuracy=0.7)) as judge:
        flags = ["--judge-base-url", judge.base_url, "--judge-model", "fake-judge", "--json"]
        report = json.loads(
            cli("judge", "calibrate", "-c", "helpful-harmless@1", "--principles-per-pair", 3, *flags).stdout
        )
    rows = report["by_principles"]
    assert [r["k"] for r in rows] == [1, 2, 3]
    assert report["accuracy"] == rows[-1]["accuracy"]  # the judge's own K
    # One principle: opposite orders are a tie; several: their mean probability decides.
    assert rows[0]["flip_rate"] > rows[2]["flip_rate"]
    assert rows[2]["accuracy"] > rows[0]["accuracy"]
    assert all(r["brier_soft"] is not None for r in rows)
