"""`cai jobs` (submit, list, show, cancel, logs) and `cai worker`: the job queue from a terminal.
Every stage command also takes `--submit` to queue itself, with the same flags, instead of running."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cai.cli.app import JSON_OPTION, err, new_app, out, print_json, workspace

if TYPE_CHECKING:
    from cai.stages.settings import Settings

app = new_app("Queue stage and loop jobs for `cai worker` processes, and follow them.")

SUBMIT_OPTION = typer.Option(
    False, "--submit", help="Queue this as a job for `cai worker` (prints the job id) instead of running it."
)


def submit(ctx: typer.Context, kind: str, round_id: int | None, settings: Settings) -> None:
    """Queue a stage command as a job (its `--submit`), printing the id on stdout."""
    from cai.jobs import submit_job

    job = submit_job(workspace(ctx), kind, round_id, settings, requested_by=_who())
    err.print(f"queued {kind} job {job.id}" + (f" for round {round_id}" if round_id else ""), highlight=False)
    out.print(job.id)


def _who() -> str:
    import getpass
    import socket

    return f"{getpass.getuser()}@{socket.gethostname()}"


@app.command("submit")
def submit_command(
    ctx: typer.Context,
    kind: str = typer.Argument(
        ..., help="generate, judge, export, train, eval, calibrate, loop, revise or sft."
    ),
    round_id: int = typer.Option(
        None, "--round", "-r", metavar="ID", help="The round (a loop's first round; none for calibrate)."
    ),
    settings_text: str = typer.Option(
        "{}",
        "--settings",
        help="The stage's settings as JSON, or @FILE (JSON or YAML); defaults fill the rest.",
    ),
    assignments: list[str] = typer.Option(
        None,
        "--set",
        metavar="KEY=VALUE",
        help="One setting (dots for nested ones: judge.mode=score); repeatable.",
    ),
) -> None:
    """Queue a job. The settings are checked against the stage's settings class now (exit 2
    naming every bad field), so what is queued can run. Prints the job id on stdout."""
    from cai.errors import BadInput
    from cai.jobs import submit_job

    settings = _load_settings(settings_text)
    for assignment in assignments or []:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise BadInput(f"--set: {assignment!r} is not KEY=VALUE")
        _assign(settings, key.split("."), _scalar(value))
    job = submit_job(workspace(ctx), kind, round_id, settings, requested_by=_who())
    err.print(f"queued {kind} job {job.id}", highlight=False)
    out.print(job.id)


def _load_settings(text: str) -> dict[str, Any]:
    import yaml

    from cai.errors import BadInput

    where = "--settings"
    if text.startswith("@"):
        path = Path(text[1:])
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise BadInput(f"{path}: cannot read: {exc.strerror}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadInput(f"{where}: not valid JSON or YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise BadInput(f"{where}: expected a mapping of settings, got {type(loaded).__name__}")
    return loaded


def _scalar(value: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _assign(settings: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        settings = settings.setdefault(key, {})
    settings[path[-1]] = value


@app.command("list")
def list_command(
    ctx: typer.Context,
    status: str = typer.Option(None, "--status", help="queued, running, succeeded, failed or cancelled."),
    kind: str = typer.Option(None, "--kind"),
    round_id: int = typer.Option(None, "--round", "-r", metavar="ID"),
    limit: int = typer.Option(50, "--limit", min=1, help="Newest first, at most this many."),
    as_json: bool = JSON_OPTION,
) -> None:
    """The newest jobs, with their progress."""
    from rich.table import Table

    from cai.jobs import job_summary
    from cai.store import jobs

    with workspace(ctx).session() as session:
        found = jobs.list_jobs(session, status, kind, round_id, limit)
    if as_json:
        print_json([job_summary(job) for job in found])
        return
    table = Table("id", "kind", "round", "status", "progress", "owner", "error")
    for job in found:
        table.add_row(
            str(job.id),
            job.kind,
            str(job.round_id or "-"),
            job.status + (" (cancel requested)" if job.cancel_requested and not job.finished else ""),
            _progress_text(job.progress),
            job.owner or "-",
            (job.error or "")[:60],
        )
    out.print(table)


def _progress_text(progress: dict[str, Any]) -> str:
    if not progress:
        return "-"
    done, total = progress.get("done"), progress.get("total")
    count = f" {done}/{total}" if total else (f" {done}" if done else "")
    return f"{progress.get('phase', '')}{count} {progress.get('info', '')}".strip()


@app.command("show")
def show(
    ctx: typer.Context, job_id: int = typer.Argument(..., metavar="ID"), as_json: bool = JSON_OPTION
) -> None:
    """A job: settings, status, attempts, owner and heartbeat, progress, result or error."""
    from cai.jobs import job_summary
    from cai.store import jobs

    with workspace(ctx).session() as session:
        job = jobs.get_job(session, job_id)
    summary = job_summary(job)
    if as_json:
        print_json(summary)
        return
    for key in ("id", "kind", "round_id", "status", "attempts", "owner", "heartbeat_at", "requested_by"):
        out.print(f"{key:<13}{summary[key]}", highlight=False)
    out.print(f"{'progress':<13}{_progress_text(job.progress)}", highlight=False)
    if job.error:
        out.print(f"{'error':<13}{job.error}", highlight=False, markup=False)
    out.print(f"{'settings':<13}{json.dumps(job.settings, sort_keys=True)}", highlight=False, markup=False)
    if job.result is not None:
        out.print(f"{'result':<13}{json.dumps(job.result, default=str)}", highlight=False, markup=False)


@app.command("cancel")
def cancel(ctx: typer.Context, job_id: int = typer.Argument(..., metavar="ID")) -> None:
    """Cancel a job: a queued one at once; a running one stops at its next batch boundary and
    leaves its round resumable (resubmit to go on)."""
    from cai.store import jobs

    with workspace(ctx).session() as session:
        job = jobs.request_cancel(session, job_id)
    out.print(
        f"job {job.id}: {'cancelled' if job.status == 'cancelled' else 'cancel requested'}", highlight=False
    )


@app.command("logs")
def logs(ctx: typer.Context, job_id: int = typer.Argument(..., metavar="ID")) -> None:
    """The tail of a job's log (the store keeps the last 16,000 characters)."""
    from cai.store import jobs

    with workspace(ctx).session() as session:
        job = jobs.get_job(session, job_id)
    if job.log:
        out.print(job.log, highlight=False, markup=False, soft_wrap=True)


def worker(
    ctx: typer.Context,
    kinds: str = typer.Option(
        "generate,judge,export,eval,calibrate,revise",
        "--kinds",
        help="Job kinds to take, comma-separated. Training is not taken unless listed: give train "
        "and sft (and loop, which trains) to the worker on the GPU machine.",
    ),
    once: bool = typer.Option(False, "--once", help="Run at most one job, then exit."),
    poll: float = typer.Option(2.0, "--poll", min=0.05, help="Seconds between looks for work when idle."),
    heartbeat: float = typer.Option(5.0, "--heartbeat", min=0.05, help="Seconds between heartbeats."),
    stale_after: float = typer.Option(
        60.0, "--stale-after", min=0.1, help="Take over a running job whose heartbeat is older than this."
    ),
    accelerate_config: Path = typer.Option(
        None,
        "--accelerate-config",
        help="Run train jobs as `accelerate launch --config_file FILE` (several devices).",
    ),
    join: bool = typer.Option(
        True, "--join/--no-join", help="When idle, help with running generate and judge jobs (PostgreSQL)."
    ),
) -> None:
    """Claim jobs from the database and run them through the stage layer until stopped. SIGTERM
    finishes the current batch and hands the job back; a killed worker's job is taken over by
    another once its heartbeat is older than --stale-after, and resumes from what is stored."""
    from cai.cli.app import quiet_libraries
    from cai.errors import BadInput
    from cai.store.models import JOB_KINDS
    from cai.worker import Worker, WorkerOptions

    chosen = tuple(k.strip() for k in kinds.split(",") if k.strip())
    unknown = [k for k in chosen if k not in JOB_KINDS]
    if unknown or not chosen:
        raise BadInput(f"--kinds: {', '.join(unknown) or '(none)'}: choose from {', '.join(JOB_KINDS)}")
    if heartbeat >= stale_after:
        raise BadInput("--heartbeat must be shorter than --stale-after (or live jobs would be taken over)")
    quiet_libraries()
    options = WorkerOptions(chosen, once, poll, heartbeat, stale_after, accelerate_config, join)
    running = Worker(workspace(ctx), options, say=lambda line: err.print(line, highlight=False, markup=False))
    running.handle_signals()
    running.run()
