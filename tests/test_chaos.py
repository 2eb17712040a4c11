"""Chaos, bounded in time: three `cai worker` processes share one judge job on PostgreSQL while
the judge server fails 30 % of requests and the workers are SIGKILLed and restarted on a schedule.
At the end every pair is labeled or has a recorded failure, no judgment is stored twice, and no
comparison is exported twice."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from sqlalchemy import Engine, func, select

from cai.store.db import session_scope
from cai.store.models import JudgmentRow, LabelRow, PairRow
from tests import fake_openai as fake
from tests.conftest import Cli
from tests.test_worker import deterministic, job_row, on_postgres, prepare, processes, wait_for, worker

__all__ = ["processes"]  # a fixture

PROMPTS = 20
WORKERS = 3
CHAOS_S = 15.0
"""How long workers are killed and restarted; then the job is left to finish."""
FAULTS = [
    fake.status(500),
    fake.status(429, retry_after=0.1),
    fake.status(503),
    fake.garbage(),
    fake.invalid_body(),
    fake.html_page(502),
    fake.sleep(5.0, then="drop"),
]


@on_postgres
def test_judging_survives_faults_and_killed_workers(
    db_url: str, cli: Cli, engine: Engine, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    rng = random.Random(10)
    round_id = prepare(cli, "fake/policy")
    with fake.FakeOpenAI(deterministic()) as policy:
        backend = ["--backend", "openai", "--base-url", policy.base_url]
        cli("generate", "-r", round_id, "--limit", PROMPTS, "--samples", 3, *backend)
    with fake.FakeOpenAI(deterministic(latency=0.2)) as judge:
        faults = random.Random(11)
        judge.fault_for = lambda request: faults.choice(FAULTS) if faults.random() < 0.3 else None
        judge_flags = ["--judge-base-url", judge.base_url, "--judge-model", "fake-judge", "--timeout", 2]
        flags = [*judge_flags, "--concurrency", 2]
        job_id = int(cli("judge", "-r", round_id, *flags, "--submit").stdout)
        processes += [worker(db_url, "--kinds", "judge") for _ in range(WORKERS)]
        kills = owner_kills = 0
        chaos_ends = time.monotonic() + CHAOS_S
        while time.monotonic() < chaos_ends and job_row(engine, job_id).status in ("queued", "running"):
            time.sleep(rng.uniform(0.5, 1.5))
            alive = [p for p in processes if p.poll() is None]
            owner = job_row(engine, job_id).owner
            owners = [p for p in alive if owner and p.pid == int(owner.split(":")[1])]
            # The owner goes first, as soon as there is one, then every third kill: takeovers are
            # certain to happen too, however the random kills fall on a slow machine.
            take_owner = owners and (owner_kills == 0 or kills % 3 == 0)
            victim = owners[0] if take_owner else rng.choice(alive)
            owner_kills += bool(take_owner)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            kills += 1
            processes.append(worker(db_url, "--kinds", "judge"))
        wait_for(lambda: job_row(engine, job_id).status not in ("queued", "running"), "the judge job", 180)
        job = job_row(engine, job_id)
        assert job.status == "succeeded", (job.error, job.log)
        assert kills >= 5 and owner_kills >= 1 and job.attempts > 1  # its owner was among the killed

    with session_scope(engine) as session:
        pairs = set(session.scalars(select(PairRow.id).where(PairRow.round_id == round_id)))
        labeled = set(session.scalars(select(LabelRow.pair_id)))
        failed = set(session.scalars(select(JudgmentRow.pair_id).where(JudgmentRow.status == "failed")))
        pending = session.scalar(select(func.count()).where(JudgmentRow.status == "pending"))
        keys = session.execute(
            select(JudgmentRow.pair_id, JudgmentRow.judge_id, JudgmentRow.principle_id, JudgmentRow.order)
        ).all()
    assert pairs and pending == 0
    assert pairs <= labeled | failed, "a pair was left neither labeled nor failed"
    assert len(keys) == len(set(keys)), "a judgment was stored twice"

    out = tmp_path / "snapshot"
    cli("export", "-r", round_id, "--out", out)
    rows = [row for split in sorted(out.glob("data/*.parquet")) for row in pq.read_table(split).to_pylist()]
    comparisons = Counter(
        (json.dumps(row["prompt"]), frozenset((json.dumps(row["chosen"]), json.dumps(row["rejected"]))))
        for row in rows
    )
    assert rows and max(comparisons.values()) == 1, "a comparison was exported twice"
