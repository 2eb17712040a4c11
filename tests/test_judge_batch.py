"""`cai judge --batch`: each phase's pending judgments go out as one Batch API job, against the
loopback server's Files and Batch API (tests/fake_batches.py): validating -> in_progress ->
completed, with errors for some lines, expired, cancelled, and a kill between the submission and
the ingest. Every pair is labelled exactly once, and nothing is submitted twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from cai.store.db import session_scope
from cai.store.models import JudgeBatchRow, JudgmentRow, LabelRow, PairRow
from tests import fake_openai as fake
from tests.conftest import REPO, Cli, table_counts
from tests.test_judging import fresh_policy_then_judge, judge_args, start_round

BATCH = ("--batch", "--batch-poll", 0.01)


@pytest.fixture
def server() -> Iterator[fake.FakeOpenAI]:
    with fake.FakeOpenAI(fresh_policy_then_judge()) as running:
        yield running


def llm_judgments(engine: Engine, round_id: int) -> dict[str, int]:
    with session_scope(engine) as session:
        rows = session.execute(
            select(JudgmentRow.status, func.count())
            .join(PairRow, PairRow.id == JudgmentRow.pair_id)
            .where(PairRow.round_id == round_id, JudgmentRow.template_sha256 != "0" * 64)
            .group_by(JudgmentRow.status)
        ).all()
    return {status: count for status, count in rows}


def assert_labelled_once(engine: Engine, round_id: int) -> None:
    with session_scope(engine) as session:
        pairs = session.scalar(select(func.count()).select_from(PairRow).where(PairRow.round_id == round_id))
        per_pair = session.execute(select(LabelRow.pair_id, func.count()).group_by(LabelRow.pair_id)).all()
    assert pairs and len(per_pair) == pairs and {n for _, n in per_pair} == {1}


def batch_lines(server: fake.FakeOpenAI, batch_id: str) -> list[dict[str, Any]]:
    input_file = server.batch_api.batches[batch_id].input_file_id
    return [json.loads(line) for line in server.batch_api.files[input_file][1].decode().splitlines()]


def test_a_batch_is_submitted_polled_and_ingested_exactly_once(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI
) -> None:
    round_id = start_round(cli, server)
    server.reset_stats()
    summary = json.loads(cli(*judge_args(server, round_id, *BATCH), "--json").stdout)
    assert summary["labeled"] == summary["pairs"] > 0 and summary["pending"] == 0
    assert server.count == 2 * summary["pairs"]  # every judgment asked once, inside the batch
    (batch_id,) = server.batch_api.created
    lines = batch_lines(server, batch_id)
    # One line per judgment, keyed by it, each the request an online run would send.
    assert len(lines) == 2 * summary["pairs"]
    assert all(
        line["url"] == "/v1/chat/completions" and line["custom_id"].startswith("judgment-") for line in lines
    )
    assert all(line["body"]["response_format"]["type"] == "json_schema" for line in lines)
    assert server.batch_api.polls >= 3  # validating, in_progress, completed: each status seen
    assert_labelled_once(engine, round_id)
    with session_scope(engine) as session:
        row = session.scalars(select(JudgeBatchRow)).one()
        labels = session.execute(select(LabelRow.pair_id, LabelRow.verdict)).all()
        texts = dict(session.execute(select(PairRow.id, PairRow.response_a_id)).all())
        assert (row.status, row.remote_status, row.remote_id) == ("ingested", "completed", batch_id)
        assert (row.requests, row.answered, row.failed, row.released) == (len(lines), len(lines), 0, 0)
    assert texts and all(verdict in ("A", "B", "tie") for _, verdict in labels)
    assert json.loads(cli("round", "show", round_id, "--json").stdout)["status"] == "judged"

    # A rerun finds nothing pending: no second batch, no second label.
    again = json.loads(cli(*judge_args(server, round_id, *BATCH), "--json").stdout)
    assert again["labeled"] == summary["labeled"] and server.batch_api.created == [batch_id]


def test_a_phase_larger_than_a_batch_goes_out_in_several_in_one_run(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI
) -> None:
    round_id = start_round(cli, server)
    summary = json.loads(
        cli(*judge_args(server, round_id, *BATCH, "--batch-max-requests", 10), "--json").stdout
    )
    sizes = [len(batch_lines(server, batch)) for batch in server.batch_api.created]
    assert summary["labeled"] == summary["pairs"] and sum(sizes) == 2 * summary["pairs"] > 20
    assert max(sizes) == 10 and len(sizes) == -(-sum(sizes) // 10)
    assert_labelled_once(engine, round_id)


def test_lines_that_fail_are_recorded_failed_and_retried_in_the_next_batch(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI
) -> None:
    round_id = start_round(cli, server)
    server.inject(fake.status(500), fake.garbage(), fake.status(400, message="bad request line"))
    summary = json.loads(cli(*judge_args(server, round_id, *BATCH), "--json").stdout)
    counts = llm_judgments(engine, round_id)
    assert counts.get("failed") == 3 and summary["pending"] == 0
    with session_scope(engine) as session:
        errors = session.scalars(select(JudgmentRow.error_kind).where(JudgmentRow.status == "failed")).all()
        row = session.scalars(select(JudgeBatchRow)).one()
    assert sorted(errors) == ["parse", "permanent", "transient"] and row.failed == 3

    again = json.loads(cli(*judge_args(server, round_id, *BATCH, "--retry-failed"), "--json").stdout)
    second = server.batch_api.created[-1]
    assert len(server.batch_api.created) == 2 and len(batch_lines(server, second)) == 3
    assert llm_judgments(engine, round_id) == {"ok": counts["ok"] + 3}
    assert again["labeled"] == again["pairs"]
    assert_labelled_once(engine, round_id)


@pytest.mark.parametrize("ending", ["expired", "cancelled"])
def test_what_an_ended_batch_did_not_answer_is_given_back_and_sent_again(
    cli: Cli, engine: Engine, server: fake.FakeOpenAI, ending: str
) -> None:
    round_id = start_round(cli, server)
    server.batch_api.partial = 5  # lines answered before the batch ended
    if ending == "expired":
        server.batch_api.outcome = "expired"
    else:
        # In progress until someone cancels it (as on the provider's dashboard).
        server.batch_api.hold.set()

        def cancel_once_submitted() -> None:
            while not server.batch_api.created:
                time.sleep(0.01)
            server.client().batches.cancel(server.batch_api.created[0])

        threading.Thread(target=cancel_once_submitted, daemon=True).start()
    cli(*judge_args(server, round_id, *BATCH), "--json")
    total = len(batch_lines(server, server.batch_api.created[0]))
    with session_scope(engine) as session:
        row = session.scalars(select(JudgeBatchRow)).one()
        assert (row.remote_status, row.answered, row.released) == (ending, 5, total - 5)
    assert llm_judgments(engine, round_id) == {"ok": 5, "pending": total - 5}
    assert json.loads(cli("round", "show", round_id, "--json").stdout)["status"] != "judged"

    server.batch_api.outcome = "completed"
    server.batch_api.hold.clear()
    done = json.loads(cli(*judge_args(server, round_id, *BATCH), "--json").stdout)
    assert len(batch_lines(server, server.batch_api.created[1])) == total - 5  # only what was left
    assert done["labeled"] == done["pairs"] and llm_judgments(engine, round_id) == {"ok": total}
    assert_labelled_once(engine, round_id)


def run_and_kill(db_url: str, args: list[str], killed_when: Callable[[], bool]) -> None:
    """`cai ARGS` in a child process, SIGKILLed once `killed_when()` holds."""
    child = subprocess.Popen(
        [sys.executable, "-m", "cai", "--db", db_url, *args],
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not killed_when() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert child.poll() is None, child.stderr.read() if child.stderr else "timed out"
        os.killpg(child.pid, signal.SIGKILL)
    finally:
        child.wait()


def test_a_kill_between_submission_and_ingest_resumes_the_same_batch(
    cli: Cli, engine: Engine, db_url: str, server: fake.FakeOpenAI
) -> None:
    round_id = start_round(cli, server)
    server.batch_api.hold.set()  # the batch stays in_progress while its client is killed
    args = [str(a) for a in judge_args(server, round_id, *BATCH)]
    run_and_kill(db_url, args, lambda: server.batch_api.polls >= 3)
    (batch_id,) = server.batch_api.created
    with session_scope(engine) as session:
        row = session.scalars(select(JudgeBatchRow)).one()
        assert (row.status, row.remote_id) == ("submitted", batch_id)
    assert table_counts(engine)["labels"] == 0

    server.batch_api.hold.clear()
    summary = json.loads(cli(*judge_args(server, round_id, *BATCH), "--json").stdout)
    assert server.batch_api.created == [batch_id] and len(server.batch_api.files) == 2  # input + output
    assert summary["labeled"] == summary["pairs"]
    assert_labelled_once(engine, round_id)


def test_a_kill_after_the_batch_was_created_but_before_its_id_was_stored_finds_it(
    cli: Cli, engine: Engine, db_url: str, server: fake.FakeOpenAI
) -> None:
    round_id = start_round(cli, server)
    server.batch_api.stall_create = threading.Event()
    args = [str(a) for a in judge_args(server, round_id, *BATCH)]
    run_and_kill(db_url, args, lambda: bool(server.batch_api.created))
    with session_scope(engine) as session:
        row = session.scalars(select(JudgeBatchRow)).one()
        assert (row.status, row.remote_id) == ("submitting", None)
    server.batch_api.stall_create.set()

    summary = json.loads(cli(*judge_args(server, round_id, *BATCH), "--json").stdout)
    assert len(server.batch_api.created) == 1  # found by its metadata, not submitted again
    assert summary["labeled"] == summary["pairs"]
    assert_labelled_once(engine, round_id)


def test_batch_needs_one_endpoint_and_no_budget(cli: Cli, server: fake.FakeOpenAI, engine: Engine) -> None:
    round_id = start_round(cli, server)
    before = table_counts(engine)
    no_url = cli("judge", "--round", round_id, "--batch", expect=2)
    assert "--batch needs --judge-base-url" in no_url.stderr
    budget = cli(
        *judge_args(server, round_id, "--batch", "--budget", 1, "--price-in", 1, "--price-out", 1), expect=2
    )
    assert "--budget cannot stop a batch midway" in budget.stderr
    assert table_counts(engine) == before
