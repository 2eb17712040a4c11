"""The job queue in the store: claims never hand one job to two workers, a dead worker's job is
taken over, and only its owner may finish or release a job; item leases renew without deadlock."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select, text, update
from sqlalchemy.orm import Session

from cai.errors import BadInput, NotFound
from cai.store import claims, jobs, samples
from cai.store.db import ensure_schema, session_scope
from cai.store.models import (
    ConstitutionRow,
    GenerationItemRow,
    JobRow,
    PolicyRow,
    PromptRow,
    RoundRow,
    utcnow,
)


@pytest.fixture
def store(engine: Engine) -> Engine:
    ensure_schema(engine)
    return engine


def _round(session: Session) -> int:
    constitution = ConstitutionRow(
        name="c", version=1, sha256="c" * 64, description="", body={}, source_text=""
    )
    policy = PolicyRow(name="p0", model_ref="/models/p0")
    session.add_all([constitution, policy])
    session.flush()
    round_ = RoundRow(constitution_id=constitution.id, policy_id=policy.id, config={})
    session.add(round_)
    session.flush()
    return round_.id


def _age_heartbeat(engine: Engine, job_id: int, seconds: float) -> None:
    """Pretend the owner's last heartbeat was `seconds` ago."""
    with session_scope(engine) as session:
        session.execute(
            update(JobRow)
            .where(JobRow.id == job_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )


def _claim(
    engine: Engine, worker: str, kinds: tuple[str, ...], stale_after_s: float = 60.0
) -> tuple[jobs.JobRecord, str | None] | None:
    with session_scope(engine) as session:
        return jobs.claim_job(session, worker, kinds, stale_after_s)


def test_submit_get_and_list(store: Engine) -> None:
    with session_scope(store) as session:
        round_id = _round(session)
        first = jobs.submit(session, "generate", round_id, {"n": 2}, requested_by="ann")
        jobs.submit(session, "judge", round_id, {})
        jobs.submit(session, "calibrate", None, {"gold": "g.jsonl"})
    assert first.status == "queued" and first.attempts == 0 and first.owner is None
    assert first.settings == {"n": 2} and first.progress == {} and first.log == ""
    assert first.requested_by == "ann" and not first.cancel_requested and not first.finished
    assert first.created_at.tzinfo is not None and first.updated_at.tzinfo is not None

    with session_scope(store) as session:
        assert jobs.get_job(session, first.id) == first
        with pytest.raises(NotFound, match=f"job {first.id + 99} does not exist"):
            jobs.get_job(session, first.id + 99)
        with pytest.raises(BadInput, match="unknown job kind"):
            jobs.submit(session, "bake", None, {})

        assert [j.kind for j in jobs.list_jobs(session)] == ["calibrate", "judge", "generate"]
        assert [j.kind for j in jobs.list_jobs(session, limit=2)] == ["calibrate", "judge"]
        assert [j.kind for j in jobs.list_jobs(session, round_id=round_id)] == ["judge", "generate"]
        assert [j.kind for j in jobs.list_jobs(session, kind="judge")] == ["judge"]
        assert [j.kind for j in jobs.list_jobs(session, status="queued", kind="calibrate")] == ["calibrate"]
        assert jobs.list_jobs(session, status="running") == []


def test_claim_takes_the_oldest_queued_job_of_the_requested_kinds(store: Engine) -> None:
    with session_scope(store) as session:
        train = jobs.submit(session, "train", None, {})
        judge = jobs.submit(session, "judge", None, {})
        generate = jobs.submit(session, "generate", None, {})

    claimed = _claim(store, "w1", ("generate", "judge"))
    assert claimed is not None
    job, previous = claimed
    assert (job.id, previous) == (judge.id, None)
    assert job.status == "running" and job.owner == "w1" and job.attempts == 1
    assert job.started_at is not None and job.heartbeat_at is not None
    assert job.heartbeat_at.tzinfo is not None

    claimed = _claim(store, "w1", ("generate", "judge"))
    assert claimed is not None and claimed[0].id == generate.id
    # A worker without "train" never gets the train job.
    assert _claim(store, "w1", ("generate", "judge")) is None
    claimed = _claim(store, "w2", ("train",))
    assert claimed is not None and claimed[0].id == train.id


def test_concurrent_claims_never_take_the_same_job(store: Engine) -> None:
    workers = 4
    with session_scope(store) as session:
        ids = {jobs.submit(session, "generate", None, {}).id for _ in range(workers - 1)}
    postgres = store.dialect.name == "postgresql"
    start = threading.Barrier(workers, timeout=10)
    # PostgreSQL: every worker holds its claim open until all have claimed, so each select runs
    # while the others' rows are locked (SKIP LOCKED, or this barrier times out). SQLite: the
    # write lock serialises the transactions, so they only start together.
    held = threading.Barrier(workers, timeout=10)
    results: dict[str, int | None] = {}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            start.wait()
            with session_scope(store) as session:
                claimed = jobs.claim_job(session, name, ["generate"], 60.0)
                if postgres:
                    held.wait()
            results[name] = None if claimed is None else claimed[0].id
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not errors, errors
    taken = [job_id for job_id in results.values() if job_id is not None]
    assert sorted(taken) == sorted(ids)  # every job once, none twice
    assert list(results.values()).count(None) == 1
    with session_scope(store) as session:
        owners = {job.id: job.owner for job in jobs.list_jobs(session)}
    assert owners == {job_id: name for name, job_id in results.items() if job_id is not None}


def test_a_dead_workers_job_is_taken_over(store: Engine) -> None:
    with session_scope(store) as session:
        job = jobs.submit(session, "judge", None, {})
        other = jobs.submit(session, "judge", None, {})
    first = _claim(store, "w1", ("judge",))
    assert first is not None and first[0].id == job.id
    second = _claim(store, "w1", ("judge",))
    assert second is not None and second[0].id == other.id

    # Both heartbeats are fresh: nothing to take.
    assert _claim(store, "w2", ("judge",)) is None

    _age_heartbeat(store, job.id, 120)
    taken = _claim(store, "w2", ("judge",), stale_after_s=60)
    assert taken is not None
    again, previous = taken
    assert (again.id, previous) == (job.id, "w1")
    assert again.owner == "w2" and again.attempts == 2 and again.status == "running"
    assert again.started_at == first[0].started_at

    # Real time, no backdating: the heartbeat stored a moment ago goes stale.
    time.sleep(0.3)
    taken = _claim(store, "w3", ("judge",), stale_after_s=0.2)
    assert taken is not None and taken[0].id == job.id and taken[1] == "w2"


def test_heartbeat_finish_and_release_need_ownership(store: Engine) -> None:
    with session_scope(store) as session:
        job = jobs.submit(session, "generate", None, {})
    _claim(store, "w1", ("generate",))

    with session_scope(store) as session:
        progress = {"stage": "generate", "phase": "sampling", "done": 3, "total": 10}
        assert jobs.heartbeat(session, job.id, "w1", progress) == jobs.Beat(
            owned=True, cancel_requested=False
        )
        assert jobs.get_job(session, job.id).progress == progress
        assert jobs.finish_job(session, job.id, "w2", "succeeded") is False
        assert jobs.release_job(session, job.id, "w2") is False
        with pytest.raises(ValueError, match="not 'running'"):
            jobs.finish_job(session, job.id, "w1", "running")

    _age_heartbeat(store, job.id, 120)
    assert _claim(store, "w2", ("generate",)) is not None
    with session_scope(store) as session:
        # w1 comes back from a long pause: the job is no longer its own.
        assert jobs.heartbeat(session, job.id, "w1").owned is False
        assert jobs.finish_job(session, job.id, "w1", "failed", error="boom") is False
        assert jobs.get_job(session, job.id).progress == progress  # untouched by w1's heartbeat

        assert jobs.finish_job(session, job.id, "w2", "succeeded", result={"responses": 20}) is True
        done = jobs.get_job(session, job.id)
    assert done.status == "succeeded" and done.finished and done.owner == "w2"
    assert done.result == {"responses": 20} and done.finished_at is not None
    with session_scope(store) as session:
        assert jobs.heartbeat(session, job.id, "w2").owned is False  # finished: nothing to hold
        assert jobs.finish_job(session, job.id, "w2", "failed") is False


def test_release_puts_the_job_back_in_the_queue(store: Engine) -> None:
    with session_scope(store) as session:
        job = jobs.submit(session, "export", None, {})
    _claim(store, "w1", ("export",))
    with session_scope(store) as session:
        assert jobs.release_job(session, job.id, "w1") is True
        released = jobs.get_job(session, job.id)
        assert jobs.release_job(session, job.id, "w1") is False
    assert released.status == "queued" and released.owner is None and released.heartbeat_at is None

    claimed = _claim(store, "w2", ("export",))
    assert claimed is not None
    assert (claimed[0].id, claimed[1], claimed[0].attempts) == (job.id, None, 2)


def test_request_cancel(store: Engine) -> None:
    with session_scope(store) as session:
        queued = jobs.submit(session, "train", None, {})
        running = jobs.submit(session, "judge", None, {})
    _claim(store, "w1", ("judge",))

    with session_scope(store) as session:
        cancelled = jobs.request_cancel(session, queued.id)
        assert cancelled.status == "cancelled" and cancelled.finished_at is not None

        flagged = jobs.request_cancel(session, running.id)
        assert flagged.status == "running" and flagged.cancel_requested and flagged.finished_at is None
        assert jobs.heartbeat(session, running.id, "w1") == jobs.Beat(owned=True, cancel_requested=True)
        assert jobs.finish_job(session, running.id, "w1", "cancelled") is True

        with pytest.raises(BadInput, match=f"job {queued.id} already cancelled"):
            jobs.request_cancel(session, queued.id)
        with pytest.raises(NotFound):
            jobs.request_cancel(session, running.id + 99)

    with session_scope(store) as session:
        ok = jobs.submit(session, "eval", None, {})
    _claim(store, "w1", ("eval",))
    with session_scope(store) as session:
        jobs.finish_job(session, ok.id, "w1", "succeeded")
    with pytest.raises(BadInput, match=f"job {ok.id} already succeeded"), session_scope(store) as session:
        jobs.request_cancel(session, ok.id)


def test_a_cancelled_job_whose_worker_died_is_not_handed_out(store: Engine) -> None:
    with session_scope(store) as session:
        doomed = jobs.submit(session, "judge", None, {})
        after = jobs.submit(session, "judge", None, {})
    _claim(store, "w1", ("judge",))
    with session_scope(store) as session:
        jobs.request_cancel(session, doomed.id)
    _age_heartbeat(store, doomed.id, 120)

    claimed = _claim(store, "w2", ("judge",))
    assert claimed is not None and claimed[0].id == after.id and claimed[1] is None
    with session_scope(store) as session:
        gone = jobs.get_job(session, doomed.id)
    assert gone.status == "cancelled" and gone.finished_at is not None and gone.attempts == 1


def test_append_log_keeps_a_bounded_tail(store: Engine) -> None:
    with session_scope(store) as session:
        job = jobs.submit(session, "train", None, {})
        jobs.append_log(session, job.id, ["step 1", "step 2"])
        jobs.append_log(session, job.id, [])
        jobs.append_log(session, job.id, ["step 3"])
        assert jobs.get_job(session, job.id).log == "step 1\nstep 2\nstep 3"
        with pytest.raises(NotFound):
            jobs.append_log(session, job.id + 99, ["x"])

    lines = [f"line {i:05d} " + "x" * 80 for i in range(400)]  # ~36,000 characters
    with session_scope(store) as session:
        for start in range(0, len(lines), 50):
            jobs.append_log(session, job.id, lines[start : start + 50])
        log = jobs.get_job(session, job.id).log
    full = "\n".join(["step 1", "step 2", "step 3", *lines])
    assert len(log) <= jobs.LOG_TAIL_CHARS
    assert len(log) > jobs.LOG_TAIL_CHARS - 100
    assert full.endswith(log) and full[-len(log) - 1] == "\n"  # cut at a line start
    assert log.startswith("line ") and log.endswith(lines[-1])

    with session_scope(store) as session:
        jobs.append_log(session, job.id, ["y" * (jobs.LOG_TAIL_CHARS + 10)])
        assert jobs.get_job(session, job.id).log == "y" * jobs.LOG_TAIL_CHARS


def test_joinable_job(store: Engine) -> None:
    with session_scope(store) as session:
        generate = jobs.submit(session, "generate", None, {})
        judge = jobs.submit(session, "judge", None, {})
        train = jobs.submit(session, "train", None, {})
        queued = jobs.submit(session, "generate", None, {})
    for kind in ("generate", "judge", "train"):
        _claim(store, "owner", (kind,))
    everything = ("generate", "judge", "train")

    with session_scope(store) as session:
        found = jobs.joinable_job(session, everything, (), 60)
        assert found is not None and found.id == generate.id and found.owner == "owner"
        found = jobs.joinable_job(session, everything, {generate.id}, 60)
        assert found is not None and found.id == judge.id
        # Train jobs are never shared; queued ones are claimed, not joined.
        assert jobs.joinable_job(session, everything, {generate.id, judge.id}, 60) is None
        assert jobs.joinable_job(session, ("train",), (), 60) is None
        assert queued.id not in {j.id for j in jobs.list_jobs(session, status="running")}

        jobs.request_cancel(session, generate.id)
        found = jobs.joinable_job(session, everything, (), 60)
        assert found is not None and found.id == judge.id
    _age_heartbeat(store, judge.id, 120)
    with session_scope(store) as session:
        assert jobs.joinable_job(session, everything, (), 60) is None  # its owner is gone
        assert jobs.get_job(session, judge.id).owner == "owner"
        assert jobs.get_job(session, train.id).status == "running"


def _claimed_generation_items(engine: Engine, worker: str, n: int) -> list[int]:
    with session_scope(engine) as session:
        round_id = _round(session)
        policy_id = session.get(RoundRow, round_id).policy_id  # type: ignore[union-attr]
        prompt = PromptRow(sha256="a" * 64, messages=[{"role": "user", "content": "hi"}], split="train")
        session.add(prompt)
        session.flush()
        samples.plan_samples(session, round_id, policy_id, [(prompt.id, i, i) for i in range(n)])
        return claims.claim_ids(session, GenerationItemRow, worker, n, 60.0)


def test_a_heartbeat_never_waits_on_rows_its_worker_is_recording(store: Engine) -> None:
    """The heartbeat renews leases while the stage thread records results. On PostgreSQL a
    heartbeat that waited on a row the recorder holds, while holding rows the recorder wants
    next, deadlocked and failed the job; it now skips rows locked by another transaction."""
    if store.dialect.name != "postgresql":
        pytest.skip("row locks: SQLite has one writer at a time")
    ids = _claimed_generation_items(store, "w1", 4)
    with Session(store) as recorder, Session(store) as heartbeat:
        # The recorder finishes the last item first, inside a transaction still open.
        assert samples.complete_samples(recorder, "w1", [ids[-1]]) == {ids[-1]}
        heartbeat.execute(text("SET LOCAL lock_timeout = '2s'"))
        assert claims.renew(heartbeat, GenerationItemRow, "w1", 120.0) == len(ids) - 1
        heartbeat.commit()
        # And the recorder is not blocked by the heartbeat in turn.
        recorder.execute(text("SET LOCAL lock_timeout = '2s'"))
        assert samples.complete_samples(recorder, "w1", ids[:-1]) == set(ids[:-1])
        recorder.commit()
    with session_scope(store) as session:
        pending = session.scalars(
            select(GenerationItemRow).where(GenerationItemRow.status == "pending")
        ).all()
        assert pending == []


def test_release_hands_back_only_the_workers_unfinished_items(store: Engine) -> None:
    ids = _claimed_generation_items(store, "w1", 3)
    with session_scope(store) as session:
        samples.complete_samples(session, "w1", [ids[0]])
        assert claims.release(session, GenerationItemRow, "w2") == 0
        assert claims.release(session, GenerationItemRow, "w1") == 2
    with session_scope(store) as session:
        rows = {r.id: r for r in session.scalars(select(GenerationItemRow))}
        assert rows[ids[0]].status == "done"
        assert all(rows[i].claimed_by is None and rows[i].status == "pending" for i in ids[1:])
