"""Jobs and `cai worker`, with real worker processes on the test database: a loop job finishing on
another worker after its first one is SIGKILLed mid-judging, two workers sharing one generate job,
cancel and SIGTERM mid-generate, a stage that fails, and the job CLI's contract."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from cai.store import jobs
from cai.store.db import make_engine, session_scope
from cai.store.models import GenerationItemRow, JobRow, JudgmentRow, LabelRow, PairRow, ResponseRow, RoundRow
from cai.workspace import Workspace
from tests import fake_openai as fake
from tests.conftest import REPO, TEST_DATABASE_URL, Cli, table_counts
from tests.tiny_model import smollm2_tokenizer_dir, tiny_model_dir

__all__ = ["smollm2_tokenizer_dir", "tiny_model_dir"]  # session fixtures

GOOD = "GOOD"
PROMPTS, EVAL_PROMPTS = 12, 6
on_postgres = pytest.mark.skipif(
    TEST_DATABASE_URL == "sqlite", reason="several workers on one job need PostgreSQL (SKIP LOCKED)"
)


def deterministic(latency: float = 0.0) -> Callable[[dict[str, Any]], str]:
    """Policy answers that depend only on the request's seed and prompt (and which of its n
    choices this is), so two runs of the same round get the same samples; judges prefer GOOD."""
    calls: dict[tuple[int, str], int] = {}
    lock = threading.Lock()

    def respond(request: dict[str, Any]) -> str:
        time.sleep(latency)
        prompt = fake.prompt_text(request)
        if "<<<RESPONSE A " in prompt:
            return fake.prefer_marker(GOOD)(request)
        key = (int(request.get("seed") or 0), prompt)
        with lock:
            index = calls[key] = calls.get(key, -1) + 1
        draw = key[0] + index
        return f"{GOOD} answer #{draw}" if draw % 3 else f"plain answer #{draw}"

    return respond


def prepare(cli: Cli, policy: Path | str) -> int:
    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    return int(cli("round", "start", "-c", "helpful-harmless@1", "--policy", policy).stdout)


def worker(db_url: str, *args: object) -> subprocess.Popen[str]:
    """A `cai worker` process; quick heartbeats so that a dead one is noticed within seconds."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cai",
            "--db",
            db_url,
            "worker",
            "--poll",
            "0.2",
            "--heartbeat",
            "0.5",
            "--stale-after",
            "3",
            *map(str, args),
        ],
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


def job_row(engine: Engine, job_id: int) -> JobRow:
    with session_scope(engine) as session:
        return session.get_one(JobRow, job_id)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def count(engine: Engine, model: Any, *where: Any) -> int:
    with session_scope(engine) as session:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def labels_of(engine: Engine, round_id: int) -> list[tuple[Any, ...]]:
    """A round's labels in terms that do not depend on row ids."""
    chosen, rejected = ResponseRow.__table__.alias(), ResponseRow.__table__.alias()
    with session_scope(engine) as session:
        rows = session.execute(
            select(PairRow.prompt_id, LabelRow.verdict, chosen.c.text, rejected.c.text, LabelRow.inconsistent)
            .join(PairRow, PairRow.id == LabelRow.pair_id)
            .outerjoin(chosen, chosen.c.id == LabelRow.chosen_response_id)
            .outerjoin(rejected, rejected.c.id == LabelRow.rejected_response_id)
            .where(PairRow.round_id == round_id, PairRow.kind == "sample")
        ).all()
    return sorted(tuple(row) for row in rows)


def submit_generate(cli: Cli, server: fake.FakeOpenAI, round_id: int, prompts: int) -> int:
    """Queue a generate job sampling from the loopback server two prompts a batch; its id."""
    flags = ["generate", "-r", round_id, "--limit", prompts, "--batch-size", 2]
    return int(cli(*flags, "--backend", "openai", "--base-url", server.base_url, "--submit").stdout)


def loop_flags(server: fake.FakeOpenAI, artifacts: Path) -> list[object]:
    return [
        "loop",
        "--rounds",
        1,
        "--limit",
        PROMPTS,
        "--eval-limit",
        EVAL_PROMPTS,
        "--backend",
        "openai",
        "--base-url",
        server.base_url,
        "--judge-base-url",
        server.base_url,
        "--judge-model",
        "fake-judge",
        "--concurrency",
        1,
        "--max-steps",
        2,
        "--train-batch-size",
        2,
        "--max-length",
        128,
        "--artifacts",
        artifacts,
    ]


def test_a_loop_job_finishes_on_another_worker_after_a_sigkill_mid_judging(
    db_url: str,
    cli: Cli,
    engine: Engine,
    tiny_model_dir: Path,
    tmp_path: Path,
    processes: list[subprocess.Popen[str]],
) -> None:
    round_id = prepare(cli, tiny_model_dir)
    with fake.FakeOpenAI(deterministic(latency=0.15)) as server:
        job_id = int(cli(*loop_flags(server, tmp_path / "jobs"), "--from-round", round_id, "--submit").stdout)
        processes += [worker(db_url, "--kinds", "loop"), worker(db_url, "--kinds", "loop")]

        def mid_judging() -> bool:
            done = count(engine, JudgmentRow, JudgmentRow.status == "ok")
            return done >= 2 and count(engine, JudgmentRow, JudgmentRow.status == "pending") > 4

        wait_for(mid_judging, "the loop job to be judging")
        owner = job_row(engine, job_id).owner
        assert owner is not None
        victim = next(p for p in processes if p.pid == int(owner.split(":")[1]))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        wait_for(lambda: job_row(engine, job_id).status not in ("queued", "running"), "the job to end", 300)
        job = job_row(engine, job_id)
        assert job.status == "succeeded", (job.error, job.log)
        assert job.attempts == 2 and job.owner != owner and "taken over from" in job.log
    assert job.result is not None and job.result["rounds"][0]["status"] == "done"
    with session_scope(engine) as session:
        assert session.get_one(RoundRow, round_id).status == "done"
        keys = session.execute(
            select(JudgmentRow.pair_id, JudgmentRow.order, JudgmentRow.principle_id, JudgmentRow.judge_id)
        ).all()
    assert len(keys) == len(set(keys))  # one row per judgment key: nothing judged twice
    assert count(engine, JudgmentRow, JudgmentRow.status != "ok") == 0

    # The same round and seed run by the CLI, on a database of its own, labels the same way.
    reference = Cli(f"sqlite:///{tmp_path / 'reference.db'}")
    reference_round = prepare(reference, tiny_model_dir)
    with fake.FakeOpenAI(deterministic()) as server:
        reference(*loop_flags(server, tmp_path / "cli"), "--json")
    other = make_engine(reference.db_url)
    try:
        assert labels_of(engine, round_id) == labels_of(other, reference_round) != []
    finally:
        other.dispose()


@on_postgres
def test_two_workers_share_one_generate_job_and_store_nothing_twice(
    db_url: str, cli: Cli, engine: Engine, processes: list[subprocess.Popen[str]]
) -> None:
    round_id = prepare(cli, "fake/policy")
    prompts = 32  # 16 batches of 0.5 s: time for the second worker to start and join
    with fake.FakeOpenAI(deterministic(latency=0.5)) as server:
        job_id = submit_generate(cli, server, round_id, prompts)
        processes += [worker(db_url, "--kinds", "generate"), worker(db_url, "--kinds", "generate")]
        wait_for(lambda: job_row(engine, job_id).status == "succeeded", "the generate job", 120)
    job = job_row(engine, job_id)
    helped = [int(n) for n in re.findall(r'helped: done: \{"prompts": \d+, "sampled": (\d+)', job.log)]
    assert job.result is not None and job.result["sampled"] > 0
    assert helped and sum(helped) > 0, job.log  # the second worker sampled a share
    assert job.result["sampled"] + sum(helped) == prompts * 2
    assert count(engine, ResponseRow) == prompts * 2
    with session_scope(engine) as session:
        keys = session.execute(select(ResponseRow.prompt_id, ResponseRow.sample_index)).all()
        status = session.get_one(RoundRow, round_id).status
    assert len(set(keys)) == prompts * 2 and status == "generated"
    assert count(engine, PairRow) > 0


@on_postgres
def test_a_helper_killed_mid_job_holds_its_items_only_until_its_lease_lapses(
    db_url: str, cli: Cli, engine: Engine, processes: list[subprocess.Popen[str]]
) -> None:
    round_id = prepare(cli, "fake/policy")
    prompts = 32
    with fake.FakeOpenAI(deterministic(latency=0.5)) as server:
        job_id = submit_generate(cli, server, round_id, prompts)
        processes += [worker(db_url, "--kinds", "generate"), worker(db_url, "--kinds", "generate")]
        owner = wait_for(lambda: job_row(engine, job_id).owner, "an owner")

        def helper_holding_items() -> str | None:
            with session_scope(engine) as session:
                return session.scalar(
                    select(GenerationItemRow.claimed_by).where(
                        GenerationItemRow.claimed_by.is_not(None), GenerationItemRow.claimed_by != owner
                    )
                )

        helper = wait_for(helper_holding_items, "the second worker to hold items")
        victim = next(p for p in processes if p.pid == int(helper.split(":")[1]))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        # Its leases (--stale-after, 3 s here) lapse; the owner takes the items up and finishes.
        wait_for(lambda: job_row(engine, job_id).status == "succeeded", "the job to finish", 60)
    assert count(engine, ResponseRow) == prompts * 2
    with session_scope(engine) as session:
        assert session.get_one(RoundRow, round_id).status == "generated"


def test_cancel_mid_generate_then_a_resubmitted_job_resumes(
    db_url: str, cli: Cli, engine: Engine, processes: list[subprocess.Popen[str]]
) -> None:
    round_id = prepare(cli, "fake/policy")
    prompts = 16
    with fake.FakeOpenAI(deterministic(latency=0.2)) as server:
        job_id = submit_generate(cli, server, round_id, prompts)
        processes.append(worker(db_url, "--kinds", "generate", "--no-join"))
        wait_for(lambda: count(engine, ResponseRow) >= 4, "some samples")
        assert "cancel requested" in cli("jobs", "cancel", job_id).stdout
        wait_for(lambda: job_row(engine, job_id).status == "cancelled", "the job to be cancelled", 60)
        stored = count(engine, ResponseRow)
        assert 4 <= stored < prompts * 2
        with session_scope(engine) as session:
            assert session.get_one(RoundRow, round_id).status == "generating"  # resumable
        again = submit_generate(cli, server, round_id, prompts)
        wait_for(lambda: job_row(engine, again).status == "succeeded", "the resubmitted job", 120)
    job = job_row(engine, again)
    assert job.result is not None and job.result["already_stored"] == stored
    assert job.result["sampled"] == prompts * 2 - stored
    assert count(engine, ResponseRow) == prompts * 2
    shown = json.loads(cli("jobs", "show", job_id, "--json").stdout)
    assert shown["status"] == "cancelled" and shown["cancel_requested"] is True


def test_sigterm_hands_the_job_back_and_another_worker_finishes_it(
    db_url: str, cli: Cli, engine: Engine, processes: list[subprocess.Popen[str]]
) -> None:
    round_id = prepare(cli, "fake/policy")
    prompts = 16
    with fake.FakeOpenAI(deterministic(latency=0.2)) as server:
        job_id = submit_generate(cli, server, round_id, prompts)
        first = worker(db_url, "--kinds", "generate", "--no-join")
        processes.append(first)
        wait_for(lambda: count(engine, ResponseRow) >= 4, "some samples")
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=60)
        assert first.returncode == 0, stderr
        job = job_row(engine, job_id)
        assert job.status == "queued" and job.owner is None, stderr
        assert count(engine, ResponseRow) < prompts * 2
        second = worker(db_url, "--kinds", "generate", "--once")
        processes.append(second)
        second.communicate(timeout=120)
    job = job_row(engine, job_id)
    assert job.status == "succeeded" and job.attempts == 2
    assert count(engine, ResponseRow) == prompts * 2


def test_a_failing_stage_fails_its_job_and_its_round_which_then_resumes(
    db_url: str, cli: Cli, engine: Engine
) -> None:
    from cai.config import load_settings
    from cai.worker import Worker, WorkerOptions

    round_id = prepare(cli, "fake/policy")
    with fake.FakeOpenAI(deterministic()) as server:
        cli("generate", "-r", round_id, "--limit", 4, "--backend", "openai", "--base-url", server.base_url)
        unreachable = [
            "--judge-base-url",
            "http://127.0.0.1:9/v1",
            "--judge-model",
            "gone",
            "--max-attempts",
            1,
        ]
        job_id = int(cli("judge", "-r", round_id, *unreachable, "--timeout", 2, "--submit").stdout)
        ws = Workspace(load_settings(database_url=db_url))
        try:
            lines: list[str] = []
            Worker(ws, WorkerOptions(kinds=("judge",), once=True), say=lines.append).run()
        finally:
            ws.close()
        job = job_row(engine, job_id)
        assert job.status == "failed" and job.error is not None
        assert "JudgeUnreachable" in job.error and "answered none" in job.error
        with session_scope(engine) as session:
            round_row = session.get_one(RoundRow, round_id)
            assert (round_row.status, round_row.failed_step) == ("failed", "judge")
            assert round_row.error is not None and "answered none" in round_row.error
        shown = json.loads(cli("round", "show", round_id, "--json").stdout)
        assert (shown["status"], shown["failed_step"]) == ("failed", "judge")
        assert "failed in judge: JudgeUnreachable" in cli("round", "show", round_id).stdout
        # A rerun against a judge that answers resumes the round at the failed stage.
        cli("judge", "-r", round_id, "--judge-base-url", server.base_url, "--judge-model", "fake-judge")
    with session_scope(engine) as session:
        round_row = session.get_one(RoundRow, round_id)
        assert (round_row.status, round_row.error, round_row.failed_step) == ("judged", None, None)


def test_job_commands_validate_settings_and_change_nothing_on_bad_input(
    cli: Cli, engine: Engine, tmp_path: Path
) -> None:
    round_id = prepare(cli, "fake/policy")
    before = table_counts(engine)
    refused = cli("jobs", "submit", "judge", "-r", round_id, "--set", "mode=sideways", expect=2)
    assert "settings.mode: 'sideways' is not one of pairwise, score, revise" in refused.stderr
    refused = cli(
        "jobs", "submit", "generate", "-r", round_id, "--set", "samples=1", "--set", "nope=3", expect=2
    )
    assert "settings.samples" in refused.stderr and "settings.nope" in refused.stderr
    assert "round 99 not found" in cli("jobs", "submit", "export", "-r", 99, expect=2).stderr
    assert "needs a round" in cli("jobs", "submit", "train", expect=2).stderr
    assert "kind: 'bake'" in cli("jobs", "submit", "bake", "-r", round_id, expect=2).stderr
    bad = tmp_path / "settings.yaml"
    bad.write_text("- a list\n")
    assert (
        "settings.yaml: expected a mapping"
        in cli("jobs", "submit", "export", "-r", round_id, "--settings", f"@{bad}", expect=2).stderr
    )
    # The stage commands' own flags are checked the same way before anything is queued.
    assert (
        "--mode: 'sideways'"
        in cli("judge", "-r", round_id, "--mode", "sideways", "--submit", expect=2).stderr
    )
    assert table_counts(engine) == before

    job_id = int(cli("jobs", "submit", "export", "-r", round_id, "--set", "eval_fraction=0.2").stdout)
    listed = json.loads(cli("jobs", "list", "--json").stdout)
    assert [(j["id"], j["kind"], j["status"], j["settings"]["eval_fraction"]) for j in listed] == [
        (job_id, "export", "queued", 0.2)
    ]
    assert "export" in cli("jobs", "list").stdout
    assert "cancelled" in cli("jobs", "cancel", job_id).stdout
    assert "already cancelled" in cli("jobs", "cancel", job_id, expect=2).stderr
    assert "job 12345 does not exist" in cli("jobs", "show", 12345, expect=2).stderr
    with session_scope(engine) as session:
        assert jobs.get_job(session, job_id).status == "cancelled"


def test_nothing_below_the_cli_imports_typer_or_rich() -> None:
    offenders = []
    for path in sorted((REPO / "cai").rglob("*.py")):
        if path.is_relative_to(REPO / "cai" / "cli"):
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if re.match(r"\s*(from|import)\s+(typer|rich|click)\b", line):
                offenders.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert offenders == []


def test_an_owner_that_ran_its_stage_again_reports_both_runs() -> None:
    from cai.jobs import combine_results

    first = {"prompts": 8, "sampled": 5, "already_stored": 0, "pairs_added": 2, "identical_skipped": 1}
    again = {"prompts": 8, "sampled": 3, "already_stored": 5, "pairs_added": 4, "identical_skipped": 0}
    assert combine_results("generate", first, again) == {
        "prompts": 8, "sampled": 8, "already_stored": 0, "pairs_added": 6, "identical_skipped": 1,
    }  # fmt: skip
    run = {"judged": 6, "failed": 1, "spent_usd": 0.5, "wall_s": 2.0, "stopped_by_budget": False}
    judged = combine_results(
        "judge",
        {"summary": {"pending": 4}, "planned": 10, "run": run},
        {"summary": {"pending": 0}, "planned": 0, "run": run | {"judged": 3, "failed": 0}},
    )
    assert judged["summary"] == {"pending": 0} and judged["planned"] == 10  # the round as it ends
    assert (judged["run"]["judged"], judged["run"]["failed"], judged["run"]["wall_s"]) == (9, 1, 4.0)
