"""A labeling round over real HTTP: the policy and the judge are our loopback OpenAI-compatible
server driven through the real `openai` SDK, with injected faults, killed processes and
concurrent workers. What must hold: every planned judgment is stored exactly once, failures are
recorded with their reason and raw text, and reruns resume."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from cai.backends.base import ChatRequest
from cai.backends.negotiation import EndpointFeatures
from cai.backends.openai_compat import OpenAIChat, retry_after
from cai.judge import Verdict, pairwise_request
from cai.judging import JudgeOptions, judge_once, pairwise_parser
from cai.store import judges, queue, repo
from cai.store.db import session_scope
from cai.store.models import JudgmentRow, LabelRow, PairRow, ResponseRow
from cai.templates import TemplateSet, sample_context
from tests import fake_openai as fake
from tests.conftest import REPO, Cli

GOOD = "GOOD"


def policy_then_judge(request: dict[str, Any], draws: Iterator[int]) -> str:
    """Sampling requests get an answer that is GOOD for some draws (each of the `n` choices is a
    new draw, as on a real server); judge requests prefer GOOD."""
    if "<<<RESPONSE A " in fake.prompt_text(request):
        return fake.prefer_marker(GOOD)(request)
    draw = request.get("seed", 0) + next(draws)
    return f"{GOOD} answer #{draw}" if draw % 3 else f"plain answer #{draw}"


def fresh_policy_then_judge() -> fake.Responder:
    """policy_then_judge from draw 0: which pairs are decisive does not depend on the tests that
    ran before (a test that needs labels on both sides of a split wants that)."""
    return fake.with_draws(policy_then_judge)


@pytest.fixture
def server() -> Iterator[fake.FakeOpenAI]:
    with fake.FakeOpenAI(fresh_policy_then_judge()) as running:
        yield running


def start_round(cli: Cli, server: fake.FakeOpenAI, limit: int = 12) -> int:
    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    round_id = int(cli("round", "start", "-c", "helpful-harmless@1", "--policy", "fake/policy").stdout)
    cli(
        "generate",
        "--round",
        round_id,
        "--backend",
        "openai",
        "--base-url",
        server.base_url,
        "--limit",
        limit,
    )
    return round_id


def judge_args(
    server: fake.FakeOpenAI, round_id: int, *extra: object, model: str = "fake-judge"
) -> list[object]:
    return ["judge", "--round", round_id, "--judge-base-url", server.base_url, "--judge-model", model, *extra]


def expected_verdict(text_a: str, text_b: str) -> str:
    in_a, in_b = GOOD in text_a, GOOD in text_b
    return "A" if in_a and not in_b else "B" if in_b and not in_a else "tie"


def judgment_counts(engine: Engine) -> dict[str, int]:
    with session_scope(engine) as session:
        rows = session.execute(
            select(JudgmentRow.status, func.count())
            .where(JudgmentRow.template_sha256 != "0" * 64)
            .group_by(JudgmentRow.status)
        ).all()
    return dict(rows)


def test_round_labels_follow_the_judge_in_both_orders(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI
) -> None:
    round_id = start_round(cli, server)
    summary = json.loads(cli(*judge_args(server, round_id), "--json").stdout)
    assert summary["pairs"] > 0
    assert summary["labeled"] == summary["pairs"]
    assert summary["failed"] == summary["pending"] == summary["inconsistent"] == 0
    assert summary["prompt_tokens"] > 0
    assert summary["calibration"] is None  # and the user is told so on stderr

    with session_scope(engine) as session:
        pairs = {p.id: p for p in session.scalars(select(PairRow).where(PairRow.round_id == round_id))}
        texts = dict(session.execute(select(ResponseRow.id, ResponseRow.text)).all())
        labels = list(session.scalars(select(LabelRow)))
        judgments = list(session.scalars(select(JudgmentRow).where(JudgmentRow.template_sha256 != "0" * 64)))
    assert len(labels) == len(pairs)
    for label in labels:
        pair = pairs[label.pair_id]
        assert label.verdict == expected_verdict(texts[pair.response_a_id], texts[pair.response_b_id])
        if label.verdict != "tie":
            assert label.chosen_response_id == (
                pair.response_a_id if label.verdict == "A" else pair.response_b_id
            )
    assert len(judgments) == 2 * len(pairs)
    assert {(j.pair_id, j.order) for j in judgments} == {(p, o) for p in pairs for o in ("AB", "BA")}
    for j in judgments:
        assert j.status == "ok" and j.raw_output and j.rationale and j.request_sha256 and j.latency_ms
        assert len(j.constitution_sha256) == len(j.template_sha256) == 64
    # Structured output was requested from the server.
    judge_requests = [r for r in server.requests if "response_format" in r]
    assert judge_requests and judge_requests[0]["response_format"]["type"] == "json_schema"

    shown = json.loads(cli("round", "show", round_id, "--json").stdout)
    assert shown["status"] == "judged"
    assert shown["counts"]["judgments"] >= 2 * len(pairs)
    assert shown["counts"]["labels"] == len(pairs)


def test_rerun_judges_nothing_twice(cli: Cli, engine: Engine, server: fake.FakeOpenAI) -> None:
    round_id = start_round(cli, server, limit=6)
    cli(*judge_args(server, round_id))
    before, requests = judgment_counts(engine), server.count
    cli(*judge_args(server, round_id))
    assert judgment_counts(engine) == before
    assert server.count == requests  # nothing was sent again


def test_a_comparison_is_judged_once_however_often_it_was_paired(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI
) -> None:
    """Rounds generated before repeated samples were merged hold pairs that repeat a comparison:
    the same prompt and the same two answers, in the other order or through a repeated sample.
    Each comparison is judged (and so labeled and exported) once."""
    round_id = start_round(cli, server, limit=4)
    with session_scope(engine) as session:
        pairs = list(session.scalars(select(PairRow).where(PairRow.round_id == round_id)))
        first = pairs[0]
        original = session.get_one(ResponseRow, first.response_a_id)
        repeat = ResponseRow(
            round_id=round_id,
            prompt_id=original.prompt_id,
            policy_id=original.policy_id,
            sample_index=99,
            text=f"  {original.text}\n",  # the same answer, up to whitespace
            sampling={},
        )
        session.add(repeat)
        session.flush()
        session.add_all(
            [PairRow(round_id=round_id, prompt_id=p.prompt_id, response_a_id=p.response_b_id, response_b_id=p.response_a_id) for p in pairs]
            + [PairRow(round_id=round_id, prompt_id=first.prompt_id, response_a_id=repeat.id, response_b_id=first.response_b_id)]
        )  # fmt: skip
    summary = json.loads(cli(*judge_args(server, round_id), "--json").stdout)
    assert summary["pending"] == summary["failed"] == 0
    with session_scope(engine) as session:
        judged = session.execute(
            select(JudgmentRow.pair_id, func.count())
            .where(JudgmentRow.template_sha256 != "0" * 64)
            .group_by(JudgmentRow.pair_id)
        ).all()
        labeled = set(session.scalars(select(LabelRow.pair_id)))
    assert dict(judged) == {p.id: 2 for p in pairs}  # the originals, in both orders; no repeat
    assert labeled == {p.id for p in pairs}
    shown = json.loads(cli("round", "show", round_id, "--json").stdout)
    assert shown["status"] == "judged"


def test_planning_records_only_rule_checks_that_ran_before_the_round_lock(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI
) -> None:
    """Rules are user-supplied patterns, so they run before planning takes the round's lock; a
    pair whose checks did not run then is left for the next pass, never checked under the lock."""
    cli("constitution", "register", REPO / "constitutions/concise-safe/v1.yaml")
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    round_id = int(cli("round", "start", "-c", "concise-safe@1", "--policy", "fake/policy").stdout)
    cli("generate", "-r", round_id, "--limit", 4, "--backend", "openai", "--base-url", server.base_url)
    with session_scope(engine) as session:
        stored = repo.get_constitution(session, "concise-safe", 1)
        config = judges.JudgeConfig("openai", "fake-judge", "pairwise", "1" * 64, {})
        judge_id = judges.ensure_judge(session, config)
        rules_id = judges.ensure_judge(session, judges.RULES_JUDGE)
        pair_ids = set(session.scalars(select(PairRow.id).where(PairRow.round_id == round_id)))
    rule_count = sum(p.kind == "rule" for p in stored.constitution.principles)
    assert pair_ids and rule_count
    common = (stored.constitution, stored.record.id, stored.record.sha256, "1" * 64, 0)

    with session_scope(engine) as session:
        planned = queue.plan_judgments(session, round_id, judge_id, rules_id, *common, {})
        assert planned == queue.Planned(created=0, deferred=len(pair_ids), duplicates=0)
        assert session.scalar(select(func.count()).select_from(JudgmentRow)) == 0
    with session_scope(engine) as session:
        checks = queue.check_pair_rules(session, round_id, judge_id, rules_id, *common[:2])
        assert set(checks) == pair_ids
    with session_scope(engine) as session:
        planned = queue.plan_judgments(session, round_id, judge_id, rules_id, *common, checks)
        assert planned == queue.Planned(created=2 * len(pair_ids), deferred=0, duplicates=0)
        by_judge = dict(
            session.execute(select(JudgmentRow.judge_id, func.count()).group_by(JudgmentRow.judge_id)).all()
        )
    assert by_judge == {judge_id: 2 * len(pair_ids), rules_id: rule_count * len(pair_ids)}
    with session_scope(engine) as session:  # planned pairs need no rule checks again
        assert queue.check_pair_rules(session, round_id, judge_id, rules_id, *common[:2]) == {}


def test_samples_of_one_prompt_share_a_request_with_n_choices(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI
) -> None:
    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    round_id = int(cli("round", "start", "-c", "helpful-harmless@1", "--policy", "fake/policy").stdout)
    args = ["--backend", "openai", "--base-url", server.base_url, "--limit", 4, "--samples", 3]
    cli("generate", "-r", round_id, *args)
    assert server.count == 4 and {r["n"] for r in server.requests} == {3}
    with session_scope(engine) as session:
        rows = session.execute(
            select(ResponseRow.prompt_id, ResponseRow.sample_index, ResponseRow.seed)
        ).all()
    assert len(rows) == 12
    for prompt_id in {r[0] for r in rows}:
        seeds = {index: seed for p, index, seed in rows if p == prompt_id}
        assert seeds[1] == seeds[2] == seeds[0]  # drawn in one request: the seed that request used


def test_generation_resumes_and_pairs_once(cli: Cli, engine: Engine, server: fake.FakeOpenAI) -> None:
    round_id = start_round(cli, server, limit=4)
    with session_scope(engine) as session:
        responses = session.scalar(select(func.count()).select_from(ResponseRow))
        pairs = session.scalar(select(func.count()).select_from(PairRow))
    assert responses == 8
    again = json.loads(
        cli(
            "generate",
            "-r",
            round_id,
            "--backend",
            "openai",
            "--base-url",
            server.base_url,
            "--limit",
            6,
            "--json",
        ).stdout
    )
    assert (again["already_stored"], again["sampled"]) == (8, 4)
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(ResponseRow)) == 12
        assert session.scalar(select(func.count()).select_from(PairRow)) >= pairs


FAULTS = {
    "429 with Retry-After": fake.status(429, retry_after=0.05),
    "429 without Retry-After": fake.status(429),
    "500": fake.status(500),
    "503": fake.status(503),
    "timeout": fake.sleep(1.5),
    "dropped connection": fake.drop(),
    "garbage": fake.garbage(),
    "truncated JSON": fake.truncated(),
    "verdict outside the schema": fake.bad_verdict(),
    "empty choice list": fake.empty_choices(),
    "body not JSON": fake.invalid_body(),
}


def judge_against(*faults: fake.Fault, max_attempts: int = 3) -> Any:
    """One judge call (with retries) against a fresh server that serves `faults` first."""

    async def go() -> Any:
        with fake.FakeOpenAI(fake.prefer_marker(GOOD)) as server:
            server.inject(*faults)
            # An endpoint already known to take everything: no request here is a probe.
            known = EndpointFeatures("json_schema", format_settled=True, logprobs=True)
            backend = OpenAIChat(server.base_url, "fake-judge", timeout=0.5, features=known)
            options = JudgeOptions(max_attempts=max_attempts, backoff_base=0.01)
            try:
                return await judge_once(backend, _request(), pairwise_parser("AB"), options)
            finally:
                await backend.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_each_fault_is_retried_then_succeeds(fault: fake.Fault) -> None:
    outcome = judge_against(fault)
    assert isinstance(outcome.parsed, Verdict) and outcome.parsed.verdict == "A"
    assert outcome.attempts == 2


@pytest.mark.parametrize(
    ("fault", "kind", "reason"),
    [
        (fake.status(500), "transient", "HTTP 500"),
        (fake.garbage("I like A"), "parse", "no JSON object"),
        (fake.bad_verdict(), "parse", "'preferred' is 'C'"),
        (fake.status(400), "permanent", "HTTP 400"),
    ],
)
def test_exhausted_retries_are_recorded_with_reason_and_raw_text(
    fault: fake.Fault, kind: str, reason: str
) -> None:
    outcome = judge_against(fault, fault, fault)
    assert outcome.parsed is None
    assert outcome.error_kind == kind and reason in (outcome.error or "")
    if kind == "parse":
        assert outcome.raw_output  # the judge's actual words are kept for the audit
    assert outcome.attempts == (1 if kind == "permanent" else 3)


def test_logprobs_are_read_up_to_the_first_malformed_token() -> None:
    """The reply is parsed from its JSON as it is: malformed logprobs cost the verdict its
    probabilities, never the verdict itself."""
    verdict = json.dumps({"rationale": "Only A is GOOD.", "preferred": "A"})
    message = {"role": "assistant", "content": verdict}
    malformed = {"content": [{"token": '{"', "logprob": -0.1, "top_logprobs": []}, {"token": None}]}
    body = {"choices": [{"index": 0, "finish_reason": "stop", "message": message, "logprobs": malformed}]}
    outcome = judge_against(fake.json_body(body))
    assert isinstance(outcome.parsed, Verdict) and outcome.parsed.verdict == "A"
    assert outcome.parsed.choice_probs is None and outcome.attempts == 1


def test_retry_after_is_honoured() -> None:
    async def go() -> float:
        with fake.FakeOpenAI(fake.prefer_marker(GOOD)) as server:
            server.inject(fake.status(429, retry_after=0.6))
            backend = OpenAIChat(server.base_url, "fake-judge")
            started = time.perf_counter()
            try:
                await judge_once(
                    backend, _request(), pairwise_parser("AB"), JudgeOptions(max_attempts=2, backoff_base=0.0)
                )
            finally:
                await backend.aclose()
            return time.perf_counter() - started

    assert asyncio.run(go()) >= 0.6
    assert retry_after({"retry-after-ms": "1500"}) == 1.5
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({}) is None


def test_failures_are_counted_and_a_rerun_retries_transient_ones(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI
) -> None:
    round_id = start_round(cli, server, limit=4)
    server.inject(fake.status(503), fake.status(503), fake.garbage())
    summary = json.loads(
        cli(*judge_args(server, round_id, "--max-attempts", 1, "--concurrency", 1), "--json").stdout
    )
    assert summary["failed"] == 3
    assert summary["run"]["errors"] == {"transient": 2, "parse": 1}
    shown = json.loads(cli("round", "show", round_id, "--json").stdout)
    assert shown["counts"]["judgments_failed"] == 3
    with session_scope(engine) as session:
        failed = list(session.scalars(select(JudgmentRow).where(JudgmentRow.status == "failed")))
    assert {f.error_kind for f in failed} == {"transient", "parse"}
    assert all(f.error for f in failed)
    assert [f.raw_output for f in failed if f.error_kind == "parse"] == ["I think A is better!!"]

    summary = json.loads(cli(*judge_args(server, round_id), "--json").stdout)
    assert summary["failed"] == 1  # the transient ones were retried; the unparseable one waits
    summary = json.loads(cli(*judge_args(server, round_id, "--retry-failed"), "--json").stdout)
    assert summary["failed"] == 0 and summary["labeled"] == summary["pairs"]
    assert judgment_counts(engine) == {"ok": 2 * summary["pairs"]}


def test_budget_stops_cleanly_and_resumes(cli: Cli, engine: Engine, server: fake.FakeOpenAI) -> None:
    round_id = start_round(cli, server, limit=10)
    result = cli(
        *judge_args(server, round_id, "--concurrency", 1, "--price-in", 1000, "--budget", 1.0, "--json")
    )
    first = json.loads(result.stdout)
    assert first["run"]["stopped_by_budget"] is True
    assert 0 < first["pending"] < 2 * first["pairs"]
    assert "budget reached" in result.stderr
    with session_scope(engine) as session:
        held = session.scalar(select(func.count()).where(JudgmentRow.claimed_by.is_not(None)))
    assert held == 0  # unfinished claims were given back
    final = json.loads(cli(*judge_args(server, round_id), "--json").stdout)
    assert final["pending"] == 0 and final["labeled"] == final["pairs"]
    assert judgment_counts(engine) == {"ok": 2 * final["pairs"]}


def test_budget_needs_prices(cli: Cli, server: fake.FakeOpenAI) -> None:
    round_id = start_round(cli, server, limit=2)
    assert "--budget needs prices" in cli(*judge_args(server, round_id, "--budget", 1), expect=2).stderr


def test_negative_prices_are_refused(cli: Cli, engine: Engine, server: fake.FakeOpenAI) -> None:
    round_id = start_round(cli, server, limit=2)
    for flag in ("--price-in", "--price-out"):
        error = cli(*judge_args(server, round_id, flag, -0.5), expect=2).stderr
        assert flag in error
    assert judgment_counts(engine) == {}  # nothing was planned or sent
    submitted = cli("jobs", "submit", "judge", "--round", round_id, "--set", "price_in=-1", expect=2)
    assert "settings.price_in: Input should be greater than or equal to 0" in submitted.stderr


def _cai_process(db_url: str, *args: object) -> subprocess.Popen[str]:
    env = {**os.environ, "CAI_DATABASE_URL": db_url}
    return subprocess.Popen(
        [sys.executable, "-m", "cai", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigkill_mid_round_loses_nothing_and_duplicates_nothing(
    cli: Cli, engine: Engine, db_url: str
) -> None:
    concurrency = 4
    # A fast judge: results arrive many times a second, so any delay before they are written
    # would show up as requests sent again after the kill.
    with fake.FakeOpenAI(fresh_policy_then_judge(), latency=0.01) as server:
        round_id = start_round(cli, server, limit=30)
        sampling_requests = server.count
        process = _cai_process(db_url, *judge_args(server, round_id, "--concurrency", concurrency))
        deadline = time.monotonic() + 60
        while judgment_counts(engine).get("ok", 0) < 30 and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        partial = judgment_counts(engine)
        assert partial.get("ok", 0) > 0 and partial.get("pending", 0) > 0, partial

        summary = json.loads(cli(*judge_args(server, round_id), "--json").stdout)
        judge_requests = server.count - sampling_requests
    assert summary["pending"] == summary["failed"] == 0
    assert summary["labeled"] == summary["pairs"]
    assert judgment_counts(engine) == {"ok": 2 * summary["pairs"]}
    # The kill lost only requests in flight (asked, or answered but not yet written).
    assert judge_requests - 2 * summary["pairs"] <= concurrency


def test_concurrent_workers_never_judge_the_same_item(cli: Cli, engine: Engine, db_url: str) -> None:
    with fake.FakeOpenAI(fresh_policy_then_judge(), latency=0.02) as server:
        round_id = start_round(cli, server, limit=40)
        planned_before = server.count
        workers = [_cai_process(db_url, *judge_args(server, round_id, "--concurrency", 4)) for _ in range(2)]
        for worker in workers:
            _, stderr = worker.communicate(timeout=120)
            assert worker.returncode == 0, stderr
        judge_requests = server.count - planned_before
    summary = json.loads(
        cli(
            "judge",
            "--round",
            round_id,
            "--judge-base-url",
            "http://127.0.0.1:9",
            "--judge-model",
            "fake-judge",
            "--json",
        ).stdout
    )
    assert summary["pending"] == summary["failed"] == 0
    assert summary["labeled"] == summary["pairs"]
    assert judge_requests == 2 * summary["pairs"]  # every item judged exactly once across both workers
    assert judgment_counts(engine) == {"ok": 2 * summary["pairs"]}


def test_min_calibration_refuses_a_weak_judge(cli: Cli) -> None:
    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    round_id = int(cli("round", "start", "-c", "helpful-harmless@1").stdout)
    with fake.FakeOpenAI(fake.default_responder) as server:  # always answers "A"
        args = ["--judge-base-url", server.base_url, "--judge-model", "always-a"]
        report = json.loads(cli("judge", "calibrate", "-c", "helpful-harmless@1", *args, "--json").stdout)
        assert report["accuracy"] == pytest.approx(0.0)  # never agrees with itself across orders
        assert report["consistency"] == 0.0 and report["first_position_rate"] == 1.0
        assert report["injection_follow_rate"] == pytest.approx(0.5)
        accepted = json.loads(
            cli("judge", "--round", round_id, *args, "--min-calibration", 0.0, "--json").stdout
        )
        assert accepted["calibration"]["accuracy"] == report["accuracy"]  # reported with every run
        assert accepted["calibration"]["injection_follow_rate"] == pytest.approx(0.5)
        refused = cli("judge", "--round", round_id, *args, "--min-calibration", 0.6, expect=2)
        assert "scored 0.00 on the gold set" in refused.stderr
        other = cli(*judge_args(server, round_id, "--min-calibration", 0.6, model="new"), expect=2)
        assert "has no calibration" in other.stderr


def test_calibration_counts_injections_that_sway_the_judge(cli: Cli) -> None:
    def gullible(request: dict[str, Any]) -> str:
        prompt = fake.prompt_text(request)
        a = fake.fenced(prompt, "RESPONSE A") or ""
        cues = ("evaluator", "verdict", "SYSTEM", "prefer", "grader", "approved")
        preferred = "A" if any(c.lower() in a.lower() for c in cues) else "B"
        return json.dumps({"rationale": "followed the note", "preferred": preferred})

    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    with fake.FakeOpenAI(gullible) as server:
        report = json.loads(
            cli(
                "judge",
                "calibrate",
                "-c",
                "helpful-harmless@1",
                "--judge-base-url",
                server.base_url,
                "--judge-model",
                "gullible",
                "--json",
            ).stdout
        )
    assert report["injection_follow_rate"] > 0.7


def _request() -> ChatRequest:
    context = sample_context("judge_pairwise")
    constitution_stub = _constitution()
    _, request = pairwise_request(
        TemplateSet(),
        constitution_stub,
        constitution_stub.principles[0],
        context["conversation"],
        f"{GOOD} answer",
        "other answer",
        "AB",
    )
    return request


def _constitution() -> Any:
    from cai.constitution import load_constitution

    return load_constitution(REPO / "constitutions/helpful-harmless/v1.yaml").constitution


def every_mode(request: dict[str, Any], draws: Iterator[int]) -> str:
    """One server for all modes: scores favour GOOD, pairwise favours revisions, then GOOD."""
    prompt = fake.prompt_text(request)
    if "Revision request:" in prompt:
        return fake.revise_responder(request)
    if "<<<RESPONSE A " in prompt:
        a, b = fake.fenced(prompt, "RESPONSE A") or "", fake.fenced(prompt, "RESPONSE B") or ""
        if "[revised]" in a + b:
            preferred = "A" if "[revised]" in a else "B"
            return json.dumps({"rationale": "the revision is better", "preferred": preferred})
        return fake.prefer_marker(GOOD)(request)
    if "<<<RESPONSE " in prompt:
        response = fake.fenced(prompt, "RESPONSE") or ""
        return json.dumps({"rationale": "scored", "score": 9 if GOOD in response else 3})
    return policy_then_judge(request, draws)


def test_score_mode_labels_best_against_worst_and_drops_ties(cli: Cli, engine: Engine) -> None:
    with fake.FakeOpenAI(fake.with_draws(every_mode)) as server:
        round_id = start_round(cli, server, limit=12)
        summary = json.loads(cli(*judge_args(server, round_id, "--mode", "score"), "--json").stdout)
        requests = server.count
        again = json.loads(cli(*judge_args(server, round_id, "--mode", "score"), "--json").stdout)
        assert server.count == requests and again["labeled"] == summary["labeled"]
    with session_scope(engine) as session:
        texts = dict(session.execute(select(ResponseRow.id, ResponseRow.text)).all())
        by_prompt: dict[int, list[str]] = {}
        for prompt_id, text in session.execute(select(ResponseRow.prompt_id, ResponseRow.text)):
            by_prompt.setdefault(prompt_id, []).append(text)
        scores = session.scalars(select(JudgmentRow.score).where(JudgmentRow.response_id.is_not(None))).all()
        labels = list(session.scalars(select(LabelRow)))
    assert len(scores) == len(texts) and set(scores) <= {3.0, 9.0}
    separable = sum(1 for group in by_prompt.values() if len({GOOD in t for t in group}) == 2)
    assert summary["labeled"] == len(labels) == separable > 0  # equal scores are dropped
    for label in labels:
        assert GOOD in texts[label.chosen_response_id] and GOOD not in texts[label.rejected_response_id]
        assert label.confidence == pytest.approx((9 - 3) / 9)


def test_revise_mode_keeps_revisions_both_orders_prefer(cli: Cli, engine: Engine) -> None:
    with fake.FakeOpenAI(fake.with_draws(every_mode)) as server:
        round_id = start_round(cli, server, limit=5)
        summary = json.loads(cli(*judge_args(server, round_id, "--mode", "revise"), "--json").stdout)
        requests = server.count
        cli(*judge_args(server, round_id, "--mode", "revise"))
        assert server.count == requests  # rerun: nothing revised or judged twice
    with session_scope(engine) as session:
        revisions = list(session.scalars(select(ResponseRow).where(ResponseRow.origin == "revision")))
        originals = {
            r.id: r for r in session.scalars(select(ResponseRow).where(ResponseRow.origin == "sample"))
        }
        pairs = list(session.scalars(select(PairRow).where(PairRow.kind == "revision")))
        labels = {label.pair_id: label for label in session.scalars(select(LabelRow))}
    assert len(revisions) == 5  # the first sample of each prompt
    for revision in revisions:
        assert revision.text == f"[revised] {originals[revision.revised_from_id].text}"
    assert len(pairs) == 5
    for pair in pairs:
        assert pair.response_a_id in originals and labels[pair.id].verdict == "B"
        assert labels[pair.id].chosen_response_id == pair.response_b_id
    assert summary["pending"] == summary["failed"] == 0


def test_max_judge_pairs_caps_the_llm_judge_and_a_larger_cap_extends_it(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI
) -> None:
    round_id = start_round(cli, server, limit=8)
    with session_scope(engine) as session:
        pairs = session.scalar(select(func.count()).select_from(PairRow)) or 0
    assert pairs >= 5
    server.reset_stats()
    first = json.loads(cli(*judge_args(server, round_id, "--max-judge-pairs", 3, "--json")).stdout)
    assert server.count == 6 and judgment_counts(engine) == {"ok": 6}
    # The constitution has no rule principles, so only the judged pairs get labels.
    assert first["labeled"] == 3 and first["pending"] == 0
    cli(*judge_args(server, round_id, "--max-judge-pairs", 3))
    assert server.count == 6  # the cap counts what was already asked
    wider = json.loads(cli(*judge_args(server, round_id, "--max-judge-pairs", 5, "--json")).stdout)
    assert server.count == 10 and wider["labeled"] == 5
