"""`cai worker`: claims jobs from the database and runs them through the stage layer. A heartbeat
thread keeps the claim alive, writes progress and log lines, and watches for a cancel. SIGTERM
finishes the current batch, hands the job back and exits; a worker that dies (SIGKILL) stops
heartbeating, and another worker takes the job over once its heartbeat is stale, freeing the
dead worker's claimed items so the stage resumes from what is stored. On PostgreSQL an idle
worker also joins a running generate or judge job and claims its own share of the items."""

from __future__ import annotations

import json
import signal
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai.errors import BadInput
from cai.jobs import JobProgress, combine_results, run_job
from cai.stages.progress import Stopped
from cai.store import claims, jobs, queue
from cai.store.jobs import JobRecord
from cai.store.models import GenerationItemRow, JudgmentRow
from cai.workspace import Workspace

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

DEFAULT_KINDS = ("generate", "judge", "export", "eval", "calibrate", "revise")
"""What a worker takes unless told: everything but training (train, sft and loop jobs need a
machine meant for it: `--kinds train,sft,loop` on the GPU worker)."""


@dataclass(frozen=True)
class WorkerOptions:
    kinds: Sequence[str] = DEFAULT_KINDS
    once: bool = False
    """Run at most one job (as its owner), then exit."""
    poll_s: float = 2.0
    heartbeat_s: float = 5.0
    stale_after_s: float = 60.0
    """A running job whose heartbeat is older than this is taken over (its worker died)."""
    accelerate_config: Path | None = None
    """Train jobs run as `accelerate launch --config_file` this (several processes/devices)."""
    join: bool = True
    """Help with running generate/judge jobs when idle (PostgreSQL only: SQLite has one writer)."""


@dataclass
class Worker:
    ws: Workspace
    options: WorkerOptions = field(default_factory=WorkerOptions)
    say: Callable[[str], None] = print
    shutdown: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.helped: set[int] = set()
        # Claims held as long as a job's heartbeat may lapse: renewed with every heartbeat, so a
        # worker that dies anywhere (owner or helper) frees its items within stale_after_s.
        self.ws.claim_lease_s = self.options.stale_after_s

    def run(self) -> int:
        """Work until told to stop (or, with `once`, after one job); returns the jobs finished."""
        finished = 0
        self.say(f"worker {self.ws.worker_id}: taking {', '.join(self.options.kinds)}")
        while not self.shutdown.is_set():
            with self.ws.session() as session:
                claimed = jobs.claim_job(
                    session, self.ws.worker_id, self.options.kinds, self.options.stale_after_s
                )
            if claimed is not None:
                job, previous = claimed
                finished += self.work(job, previous)
                if self.options.once:
                    break
                continue
            if self.options.once:
                break
            shared = self._joinable()
            if shared is not None:
                self.help(shared)
                continue
            self.shutdown.wait(self.options.poll_s)
        return finished

    def work(self, job: JobRecord, previous_owner: str | None) -> int:
        """Run a job this worker owns to its end; 1 when it finished (in any state), 0 when it
        was handed back (shutdown) or lost to another worker."""
        progress = JobProgress(job.id, self.shutdown)
        if previous_owner:
            with self.ws.session() as session:
                freed = sum(
                    claims.release(session, row, previous_owner) for row in (JudgmentRow, GenerationItemRow)
                )
            progress.note(
                f"taken over from {previous_owner} (attempt {job.attempts}); freed {freed} of its claims"
            )
        if job.cancel_requested:
            progress.cancelled.set()
        progress.note(f"{self.ws.worker_id}: running {job.kind} job {job.id}")
        self.say(f"job {job.id}: {job.kind}" + (f" (round {job.round_id})" if job.round_id else ""))
        beating = _Heartbeat(self.ws, job.id, progress, self.options.heartbeat_s)
        beating.start()
        status, error, result = "succeeded", None, None
        try:
            result = run_job(self.ws, job, progress, self.options.accelerate_config)
            # Helpers may still hold items of a shared job: the owner ends it only after them, and
            # then runs the stage once more, which takes up what a helper that died left (once
            # its leases lapse) and pairs or aggregates what they stored.
            waited = False
            while not progress.stop_requested():
                live, lapsed = self._helpers_claims(job)
                if live:
                    waited = True
                    self.shutdown.wait(self.options.poll_s)
                    continue
                if not (lapsed or waited):
                    break
                waited = False
                again = run_job(self.ws, job, progress, self.options.accelerate_config)
                result = combine_results(job.kind, result, again)
        except Stopped as exc:
            status = "cancelled" if progress.cancelled.is_set() else "released"
            progress.note(str(exc))
        except BadInput as exc:
            status, error = "failed", "; ".join(exc.problems)
        except Exception as exc:
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            progress.note(traceback.format_exc(limit=8))
        finally:
            beating.stop()
        if error:
            progress.note(f"failed: {error}")
        with self.ws.session() as session:
            _, lines = progress.take()
            jobs.append_log(session, job.id, [*lines, f"{job.kind} job {job.id}: {status}"])
            if progress.lost.is_set():
                self.say(f"job {job.id}: taken over by another worker; leaving it")
                return 0
            if status == "released":
                jobs.release_job(session, job.id, self.ws.worker_id)
            else:
                jobs.finish_job(session, job.id, self.ws.worker_id, status, error, _jsonable(result))
        self.say(f"job {job.id}: {status}" + (f": {error}" if error else ""))
        return 0 if status == "released" else 1

    def help(self, job: JobRecord) -> None:
        """Work on a running generate or judge job owned by another worker: claim and do a share
        of its items. The owner finishes the job; a helper's failure is only logged."""
        self.helped.add(job.id)
        progress = JobProgress(job.id, self.shutdown)
        watcher = _CancelWatch(self.ws, job.id, progress, self.options.heartbeat_s)
        watcher.start()
        self.say(f"job {job.id}: helping with {job.kind}")
        try:
            result = run_job(self.ws, job, progress, self.options.accelerate_config)
            outcome = "done: " + json.dumps(_jsonable(result))[:400]
        except Stopped:
            outcome = "stopped"
        except Exception as exc:
            outcome = f"failed ({type(exc).__name__}: {exc})"
        finally:
            watcher.stop()
        with self.ws.session() as session:
            jobs.append_log(session, job.id, [f"{self.ws.worker_id} helped: {outcome}"])

    def _helpers_claims(self, job: JobRecord) -> tuple[int, int]:
        """Items of a shared job that other workers claimed: (live leases, lapsed leases)."""
        if job.kind not in jobs.SHAREABLE_KINDS or job.round_id is None:
            return 0, 0
        with self.ws.session() as session:
            if job.kind == "generate":
                where = GenerationItemRow.round_id == job.round_id
                return claims.held_by_others(session, GenerationItemRow, self.ws.worker_id, where)
            where = queue.in_round(job.round_id)
            return claims.held_by_others(session, JudgmentRow, self.ws.worker_id, where)

    def _joinable(self) -> JobRecord | None:
        if not self.options.join or self.ws.engine.dialect.name != "postgresql":
            return None
        with self.ws.session() as session:
            return jobs.joinable_job(session, self.options.kinds, self.helped, self.options.stale_after_s)

    def handle_signals(self) -> None:
        """SIGTERM and SIGINT stop the worker gracefully (for the process that is the worker)."""

        def stop(signum: int, _frame: Any) -> None:
            self.say(
                f"worker: {signal.Signals(signum).name}: finishing the current batch, then handing the job back"
            )
            self.shutdown.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


class _Heartbeat:
    """Every `interval` seconds: keep the job's claim fresh, write its progress and log lines,
    and pass on a cancel request or the loss of the job to the stage (through `progress`)."""

    def __init__(self, ws: Workspace, job_id: int, progress: JobProgress, interval: float) -> None:
        self.ws, self.job_id, self.progress, self.interval = ws, job_id, progress, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.beat()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # a database hiccup must not kill the job; the next beat retries
                self.progress.note(f"heartbeat failed: {type(exc).__name__}: {exc}")

    def beat(self) -> None:
        state, lines = self.progress.take()
        with self.ws.session() as session:
            beat = jobs.heartbeat(session, self.job_id, self.ws.worker_id, state or None)
            if lines and beat.owned:
                jobs.append_log(session, self.job_id, lines)
            renew_claims(self.ws, session)
        if beat.cancel_requested:
            self.progress.cancelled.set()
        if not beat.owned:
            self.progress.lost.set()


class _CancelWatch(_Heartbeat):
    """A helper's watch on a job it does not own: stop when the job is cancelled or has ended."""

    def beat(self) -> None:
        with self.ws.session() as session:
            job = jobs.get_job(session, self.job_id)
            renew_claims(self.ws, session)
        if job.cancel_requested:
            self.progress.cancelled.set()
        if job.status != "running":
            self.progress.lost.set()


def renew_claims(ws: Workspace, session: Session) -> None:
    assert ws.claim_lease_s is not None
    for row in (JudgmentRow, GenerationItemRow):
        claims.renew(session, row, ws.worker_id, ws.claim_lease_s)


def _jsonable(result: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if result is None else json.loads(json.dumps(result, default=str))
