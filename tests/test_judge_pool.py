"""A judge served by a pool of endpoints (`--judge-pool FILE`): requests spread over them, an
endpoint that keeps failing is set aside and its work moves to the others, and the endpoints
are one judge. Real loopback servers throughout; one is shut down in the middle of a round."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from cai.backends.base import ChatRequest, TransientError
from cai.backends.openai_compat import OpenAIChat
from cai.backends.pool import FAILURES_TO_SET_ASIDE, SET_ASIDE_S, PooledChat, load_pool
from cai.errors import BadInput
from cai.store.db import session_scope
from cai.store.models import JudgeRow, JudgmentRow, LabelRow, PairRow
from tests import fake_openai as fake
from tests.conftest import REPO, Cli, table_counts
from tests.test_judging import GOOD, fresh_policy_then_judge, start_round

REQUEST = ChatRequest(messages=[{"role": "user", "content": "Which is better?"}], max_tokens=32)


def write_pool(path: Path, *servers: fake.FakeOpenAI, concurrency: int = 2) -> Path:
    endpoints = [{"url": s.base_url, "concurrency": concurrency} for s in servers]
    path.write_text(json.dumps({"endpoints": endpoints}))  # JSON is YAML
    return path


def test_bad_pool_files_are_refused_naming_file_and_field(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text("endpoints:\n  - url: http://a/v1\n    concurrency: 0\n")
    with pytest.raises(BadInput, match=rf"{pool}: endpoints.0.concurrency: Input should be greater"):
        load_pool(pool)
    pool.write_text("endpoints:\n  - url: http://a/v1\n  - url: http://a/v1/\n")
    with pytest.raises(BadInput, match="listed more than once: http://a/v1"):
        load_pool(pool)
    pool.write_text("endpoints: []\n")
    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    before = table_counts(engine)
    refused = cli("judge", "--round", 1, "--judge-pool", pool, "--judge-model", "m", expect=2)
    assert f"{pool}: endpoints: List should have at least 1 item" in refused.stderr
    both = ["--judge-pool", pool, "--judge-base-url", "http://a/v1", "--judge-model", "m"]
    assert "--judge-base-url or --judge-pool, not both" in cli("judge", "--round", 1, *both, expect=2).stderr
    assert table_counts(engine) == before


def test_an_endpoint_that_keeps_failing_is_set_aside_then_tried_again() -> None:
    now = [1000.0]
    with (
        fake.FakeOpenAI() as first,
        fake.FakeOpenAI() as second,
    ):
        first.inject(*[fake.status(503)] * FAILURES_TO_SET_ASIDE)
        members = [(s.base_url, OpenAIChat(s.base_url, "fake-judge"), 1) for s in (first, second)]
        pool = PooledChat(members, "fake-judge", clock=lambda: now[0])

        async def ask(times: int) -> None:
            for _ in range(times):
                await pool.complete(REQUEST)  # one at a time: the first endpoint is always free

        async def scenario() -> None:
            await ask(6)
            # Each failure was asked again of the second endpoint at once; after the third in a
            # row the first was set aside, so the rest went to the second without trying it.
            assert first.count == FAILURES_TO_SET_ASIDE and second.count == 6
            assert [h["set_aside_s"] for h in pool.health()] == [SET_ASIDE_S, 0.0]

            now[0] += SET_ASIDE_S + 1  # its time is up: it is tried again, and serves
            await ask(2)
            assert first.count == FAILURES_TO_SET_ASIDE + 2 and second.count == 6
            health = pool.health()[0]
            assert (health["served"], health["failed"], health["set_aside_s"]) == (2, 3, 0.0)
            await pool.aclose()

        asyncio.run(scenario())


def test_a_pool_with_every_endpoint_set_aside_says_when_one_returns() -> None:
    now = [0.0]
    with fake.FakeOpenAI() as only:
        only.inject(*[fake.status(500)] * FAILURES_TO_SET_ASIDE)
        pool = PooledChat(
            [(only.base_url, OpenAIChat(only.base_url, "fake-judge"), 1)], "fake-judge", clock=lambda: now[0]
        )

        async def fail_until_set_aside() -> TransientError:
            for _ in range(FAILURES_TO_SET_ASIDE):
                with pytest.raises(TransientError):
                    await pool.complete(REQUEST)
            with pytest.raises(
                TransientError, match="every endpoint of the judge pool is set aside"
            ) as aside:
                await pool.complete(REQUEST)
            return aside.value

        async def scenario() -> TransientError:
            try:
                return await fail_until_set_aside()
            finally:
                await pool.aclose()

        refused = asyncio.run(scenario())
        assert refused.retry_after == SET_ASIDE_S and only.count == FAILURES_TO_SET_ASIDE


def test_a_round_judged_by_three_endpoints_survives_one_shut_down_midway(
    cli: Cli, engine: Engine, tmp_path: Path
) -> None:
    with fake.FakeOpenAI(fresh_policy_then_judge()) as policy:
        round_id = start_round(cli, policy, limit=24)
    judge = fake.prefer_marker(GOOD)
    servers = [fake.FakeOpenAI(judge, latency=0.02).start() for _ in range(3)]
    doomed, first_url = servers[0], servers[0].base_url

    def shut_down_midway() -> None:
        while doomed.count < 6:
            time.sleep(0.005)
        doomed.close()  # a server gone: refused connections from here on

    killer = threading.Thread(target=shut_down_midway, daemon=True)
    killer.start()
    try:
        pool = write_pool(tmp_path / "pool.yaml", *servers)
        args = ["judge", "--round", round_id, "--judge-pool", pool, "--judge-model", "fake-judge"]
        summary = json.loads(cli(*args, "--concurrency", 6, "--json").stdout)
        killer.join(timeout=5)
    finally:
        for server in servers:
            server.close()
    assert not killer.is_alive(), "the round finished before the first endpoint served 6 requests"
    assert summary["labeled"] == summary["pairs"] > 0 and summary["failed"] == summary["pending"] == 0

    with session_scope(engine) as session:
        pairs = session.scalar(select(func.count()).select_from(PairRow).where(PairRow.round_id == round_id))
        judgments = session.scalar(
            select(func.count())
            .select_from(JudgmentRow)
            .where(JudgmentRow.status == "ok", JudgmentRow.template_sha256 != "0" * 64)
        )
        labels_per_pair = session.execute(
            select(LabelRow.pair_id, func.count()).group_by(LabelRow.pair_id)
        ).all()
        llm_judges = session.scalars(select(JudgeRow).where(JudgeRow.backend == "openai")).all()
    assert len(labels_per_pair) == pairs and {count for _, count in labels_per_pair} == {1}
    served = [s.count for s in servers]
    # Every judgment stored once; the shut-down endpoint's share moved to the other two. Only
    # the requests it had in flight when it went (its concurrency, 2) were asked twice.
    assert judgments == 2 * pairs and judgments <= sum(served) <= judgments + 2
    assert served[0] >= 6 and served[1] > 0 and served[2] > 0 and served[0] < judgments // 3
    # Three addresses, one judge: the identity is the model, mode, templates and parameters.
    assert len(llm_judges) == 1 and llm_judges[0].base_url == first_url

    # The same model behind one of those addresses alone is that same judge.
    with fake.FakeOpenAI(judge) as single:
        cli("judge", "--round", round_id, "--judge-base-url", single.base_url, "--judge-model", "fake-judge")
    with session_scope(engine) as session:
        assert (
            session.scalar(select(func.count()).select_from(JudgeRow).where(JudgeRow.backend == "openai"))
            == 1
        )
