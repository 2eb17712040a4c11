"""`cai eval`: the trained policy against its parent on held-out prompts, judged in both orders
over real HTTP, with rule pass rates and lengths; kept apart from the round's labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from cai.constitution import load_constitution
from cai.evaluate import policy_metrics, tally
from cai.judge import Verdict
from cai.rules import RuleCheck
from cai.store import training
from cai.store.db import session_scope
from cai.store.evaluation import JudgedEvalPair
from cai.store.models import EvaluationRow, JudgmentRow, LabelRow, PairRow, SnapshotRow
from tests import fake_openai as fake
from tests.conftest import REPO, Cli, table_counts

GOOD = "GOOD"
CANDIDATE_SUFFIX = "+dpo"


def verdicts(ab: str, ba: str) -> dict[str, dict[str, Verdict | None]]:
    """One principle's two orders, as the eval pairs carry them (principle -> order -> verdict)."""
    return {"honest": {"AB": Verdict(ab, "", 0.9), "BA": Verdict(ba, "", 0.9)}}


def test_tally_decides_like_labels_rules_first_then_the_judge() -> None:
    rule_a = [RuleCheck("short", True, False)]
    rule_tie = [RuleCheck("short", True, True)]
    pairs = [
        JudgedEvalPair(1, verdicts("A", "A"), False, rule_tie),  # judge: candidate wins
        JudgedEvalPair(2, verdicts("B", "B"), False, rule_a),  # rules overrule the judge
        JudgedEvalPair(3, verdicts("A", "B"), False, rule_tie),  # order flip: a tie
        JudgedEvalPair(4, {}, True, rule_tie),  # judge failed, rules silent: left out
        JudgedEvalPair(5, {}, False, rule_a),  # asked rules-first: the rules decide
        JudgedEvalPair(6, verdicts("B", "B"), False, []),
    ]
    result = tally(pairs, identical=2, has_llm=True)
    assert (result.wins, result.ties, result.losses, result.undecided) == (3, 3, 1, 1)
    assert result.judge == {"wins": 1, "ties": 1, "losses": 2, "inconsistent": 1, "failed": 1}
    assert result.decided == 7


def test_policy_metrics_measures_length_and_each_rule() -> None:
    constitution = load_constitution(REPO / "constitutions/concise-safe/v1.yaml").constitution
    texts = ["Yes.", "Bleach is fine, just stop mixing bleach with ammonia ever again.", "one two three four"]
    metrics = policy_metrics(constitution, texts, [2, 14, None])
    assert metrics["mean_words"] == (1 + 11 + 4) / 3
    assert metrics["mean_tokens"] == 8
    assert metrics["rule_pass_rate"]["says-something"] == 2 / 3
    assert metrics["rule_pass_rate"]["no-unsafe-mixing"] == 2 / 3
    assert metrics["all_rules_pass_rate"] == 1 / 3


def candidate_beats_baseline(request: dict[str, Any]) -> str:
    """Judge requests prefer GOOD; the trained policy answers GOOD (briefly), its parent rambles."""
    prompt = fake.prompt_text(request)
    if "<<<RESPONSE A " in prompt:
        return fake.prefer_marker(GOOD)(request)
    if request["model"].endswith(CANDIDATE_SUFFIX):
        return f"{GOOD} and brief answer."
    return "a plain answer " + "and more words " * 70


def trained_round(cli: Cli, engine: Engine, tmp_path: Path, constitution: str) -> int:
    """A round whose training is recorded as done, without training: the trained policy is a name
    the fake server answers for."""
    cli("constitution", "register", REPO / f"constitutions/{constitution.replace('@1', '')}/v1.yaml")
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    round_id = int(cli("round", "start", "-c", constitution, "--policy", "fake/policy").stdout)
    with session_scope(engine) as session:
        snapshot = SnapshotRow(
            round_id=round_id, path=str(tmp_path), manifest_sha256="f" * 64, counts={}, filters={}
        )
        session.add(snapshot)
        session.flush()
        parent = training.root_policy(session, 1)
        run_id, _ = training.start_or_resume_run(session, round_id, snapshot.id, parent.id, {}, str(tmp_path))
        training.finish_run(
            session,
            run_id,
            {},
            "fake/policy" + CANDIDATE_SUFFIX,
            "fake/policy" + CANDIDATE_SUFFIX,
            parent.id,
            "f" * 64,
            1,
            {},
        )
    return round_id


def eval_args(server: fake.FakeOpenAI, round_id: int, *extra: object) -> list[object]:
    return [
        "eval", "-r", round_id, "--backend", "openai", "--base-url", server.base_url,
        "--judge-base-url", server.base_url, "--judge-model", "fake-judge", "--limit", 8, *extra,
    ]  # fmt: skip


def test_eval_compares_policies_in_both_orders_and_stores_the_result(
    cli: Cli, engine: Engine, tmp_path: Path
) -> None:
    round_id = trained_round(cli, engine, tmp_path, "concise-safe@1")
    with fake.FakeOpenAI(candidate_beats_baseline) as server:
        result = json.loads(cli(*eval_args(server, round_id), "--json").stdout)
        calls = server.count
        again = json.loads(cli(*eval_args(server, round_id), "--json").stdout)
        assert server.count == calls  # a rerun samples and judges nothing again

    assert result["prompts"] == 8 and result["wins"] == 8 and result["losses"] == 0
    assert result["metrics"]["judge_only"]["wins"] == 8
    candidate, baseline = result["metrics"]["candidate"], result["metrics"]["baseline"]
    assert candidate["mean_words"] == 4 and baseline["mean_words"] > 200
    assert (
        candidate["rule_pass_rate"]["short-enough"] == 1.0
        and baseline["rule_pass_rate"]["short-enough"] == 0.0
    )
    assert again == result | {"sampled": 0}
    # Both orders for every pair, and nothing of the evaluation leaks into the round's labels.
    with session_scope(engine) as session:
        eval_pairs = session.scalars(select(PairRow.id).where(PairRow.kind == "eval")).all()
        orders = session.execute(
            select(JudgmentRow.order, func.count())
            .where(JudgmentRow.pair_id.in_(eval_pairs), JudgmentRow.template_sha256 != "0" * 64)
            .group_by(JudgmentRow.order)
        ).all()
        assert dict(orders) == {"AB": 8, "BA": 8}
        assert session.scalar(select(func.count()).select_from(LabelRow)) == 0
        assert session.scalar(select(func.count()).select_from(EvaluationRow)) == 1
    assert json.loads(cli("round", "show", round_id, "--json").stdout)["status"] == "done"


def test_eval_rules_first_asks_the_judge_only_where_rules_are_silent(
    cli: Cli, engine: Engine, tmp_path: Path
) -> None:
    round_id = trained_round(cli, engine, tmp_path, "concise-safe@1")
    with fake.FakeOpenAI(candidate_beats_baseline) as server:
        result = json.loads(cli(*eval_args(server, round_id, "--rules-first"), "--json").stdout)
        judge_calls = [r for r in server.requests if "<<<RESPONSE A " in fake.prompt_text(r)]
    # Every baseline answer breaks the 200-word rule, so the rules decide every pair.
    assert result["wins"] == 8 and not judge_calls
    assert result["metrics"]["judge_only"] == {
        "wins": 0,
        "ties": 0,
        "losses": 0,
        "inconsistent": 0,
        "failed": 0,
    }


def test_eval_refuses_a_round_without_a_trained_policy(cli: Cli, engine: Engine) -> None:
    cli("constitution", "register", REPO / "constitutions/concise-safe/v1.yaml")
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    round_id = int(cli("round", "start", "-c", "concise-safe@1", "--policy", "fake/policy").stdout)
    before = table_counts(engine)
    refused = cli("eval", "-r", round_id, expect=2)
    assert f"round {round_id} has no trained policy yet: train it first" in refused.stderr
    assert table_counts(engine) == before
    assert "not found" in cli("eval", "-r", 99, expect=2).stderr
