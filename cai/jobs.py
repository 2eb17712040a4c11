"""Jobs: a stage (or a loop) asked for now and run later by `cai worker`. Submitting validates
the settings against the stage's settings class, so a job that is queued can run; running a job
calls the same stage function the CLI calls, with progress written to the job's row."""

from __future__ import annotations

import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cai.errors import BadInput
from cai.stages.progress import Progress
from cai.stages.settings import STAGE_SETTINGS, Settings, validation_problems
from cai.store import jobs, repo
from cai.store.jobs import JobRecord
from cai.workspace import Workspace

ROUNDLESS_KINDS = ("calibrate",)
"""Job kinds that are not about a round; a loop's round is where its chain starts (optional)."""


def validate_settings(kind: str, settings: dict[str, Any]) -> Settings:
    """The job kind's settings class applied to `settings`; BadInput names every bad field."""
    if kind not in STAGE_SETTINGS:
        raise BadInput(f"kind: {kind!r} is not one of {', '.join(STAGE_SETTINGS)}")
    try:
        return STAGE_SETTINGS[kind].model_validate(settings)
    except ValidationError as exc:
        problems = [f"settings.{line}" for line in validation_problems(exc)]
        raise BadInput("; ".join(problems), problems) from None


def submit_job(
    ws: Workspace,
    kind: str,
    round_id: int | None,
    settings: dict[str, Any] | Settings,
    requested_by: str | None = None,
) -> JobRecord:
    """Queue a job after checking its settings and its round; nothing is stored when either is bad."""
    data = settings.model_dump(mode="json") if isinstance(settings, Settings) else settings
    validated = validate_settings(kind, data)
    if round_id is None and kind not in (*ROUNDLESS_KINDS, "loop"):
        raise BadInput(f"round: a {kind} job needs a round")
    with ws.session() as session:
        if round_id is not None:
            repo.get_round(session, round_id)
        job = jobs.submit(session, kind, round_id, validated.model_dump(mode="json"), requested_by)
        if requested_by is not None:
            from cai.store.actions import record

            record(session, requested_by, "job.submit", f"job {job.id}", kind=kind, round_id=round_id)
        return job


def run_job(
    ws: Workspace, job: JobRecord, progress: Progress, accelerate_config: Path | None = None
) -> dict[str, Any]:
    """Run the job's stage through the stage layer; returns what goes in the job's `result`.
    `accelerate_config`: train (also inside a loop) as a multi-process `accelerate launch`."""
    from cai.stages.train import run_train, run_train_launched

    settings: Any = validate_settings(job.kind, job.settings)
    round_id = job.round_id

    def train(ws_: Workspace, round_: int, train_settings: Any, progress_: Progress) -> dict[str, Any]:
        if accelerate_config is not None:
            return run_train_launched(ws_, round_, train_settings, accelerate_config, progress_)
        return run_train(ws_, round_, train_settings, progress_)

    if job.kind == "generate":
        from cai.stages.generate import run_generate

        assert round_id is not None
        return asdict(run_generate(ws, round_id, settings, progress))
    if job.kind == "judge":
        from cai.stages.judge import run_judge

        assert round_id is not None
        outcome = run_judge(ws, round_id, settings, progress)
        return {"summary": asdict(outcome.summary), "run": asdict(outcome.stats), "planned": outcome.planned}
    if job.kind == "export":
        from cai.stages.export import run_export

        assert round_id is not None
        result = run_export(ws, round_id, settings, progress)
        return {
            "snapshot": result.snapshot_id,
            "path": str(result.path),
            "manifest_sha256": result.manifest_sha256,
            **({"hub": asdict(result.hub)} if result.hub else {}),
        }
    if job.kind == "train":
        assert round_id is not None
        return train(ws, round_id, settings, progress)
    if job.kind == "revise":
        from cai.stages.revise import run_revise

        assert round_id is not None
        return asdict(run_revise(ws, round_id, settings, progress))
    if job.kind == "sft":
        from cai.stages.sft import run_sft

        assert round_id is not None
        return run_sft(ws, round_id, settings, progress)
    if job.kind == "eval":
        from cai.stages.evaluate import run_eval

        assert round_id is not None
        record = run_eval(ws, round_id, settings, progress).record
        return asdict(record) | {"win_rate": record.win_rate}
    if job.kind == "calibrate":
        from cai.stages.judge import run_calibrate

        calibration = run_calibrate(ws, settings, progress)
        return {
            "judge": calibration.judge,
            "constitution": calibration.constitution,
        } | calibration.report.as_dict()
    from cai.stages.loop import run_loop

    summaries = run_loop(ws, settings.rounds, round_id, settings.loop, progress, train=train)
    return {"rounds": [asdict(s) | {"flip_rate": s.flip_rate} for s in summaries]}


def combine_results(kind: str, first: dict[str, Any], again: dict[str, Any]) -> dict[str, Any]:
    """One result for a shared job's owner that ran its stage again after its helpers: what it
    did in both runs (counts add up), and the round's state after the last (the judge summary)."""
    if kind == "generate":
        added = ("sampled", "pairs_added", "identical_skipped")
        return first | {key: first[key] + again[key] for key in added}
    run = {key: first["run"][key] + again["run"][key] for key in ("judged", "failed", "spent_usd", "wall_s")}
    return again | {"planned": first["planned"] + again["planned"], "run": first["run"] | run}


class JobProgress:
    """Stage progress for a job: kept in memory and written with the worker's heartbeats (so a
    fast stage costs no extra writes); notes go to the job's log tail. A stop is requested when
    the job is cancelled, when the worker shuts down, or when the job was taken over."""

    def __init__(self, job_id: int, shutdown: threading.Event) -> None:
        self.job_id = job_id
        self.shutdown = shutdown
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self.state: dict[str, Any] = {}
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def task(self, label: str, total: int | None = None) -> None:
        with self._lock:
            self.state = {"phase": label, "done": 0, "total": total}
            self.lines.append(label)

    def update(self, done: int, total: int | None = None, info: str = "") -> None:
        with self._lock:
            self.state = self.state | {
                "done": done,
                "total": total if total is not None else self.state.get("total"),
            }
            if info:
                self.state["info"] = info

    def note(self, message: str) -> None:
        with self._lock:
            self.lines.append(message)

    def stop_requested(self) -> bool:
        return self.shutdown.is_set() or self.cancelled.is_set() or self.lost.is_set()

    def take(self) -> tuple[dict[str, Any], list[str]]:
        """What to write now: the current progress and the log lines since the last write."""
        with self._lock:
            lines, self.lines = self.lines, []
            return dict(self.state), lines


def job_summary(job: JobRecord) -> dict[str, Any]:
    """A job as plain JSON (for `--json` and the API)."""
    record = asdict(job)
    record["log_lines"] = len(job.log.splitlines())
    record.pop("log")
    return record
