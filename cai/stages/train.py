"""The train stage: TRL's DPOTrainer on the round's snapshot; the result is registered as the next
policy with its lineage. In-process, or (for a worker with several devices) as a multi-process
`accelerate launch` of `cai train`, whose rank 0 records the run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai.errors import BadInput
from cai.stages.progress import Progress, Silent, Stopped, check
from cai.stages.settings import TrainSettings
from cai.stages.status import Event, Stage, advance, check_kind, failure_recorded
from cai.store import repo, training
from cai.trackers import TrackedRun, tracked_run
from cai.workspace import Workspace

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from cai.train import OnLog, TrainResult


def default_run_dir(round_id: int, artifacts: Path = Path(".")) -> Path:
    return artifacts / "runs" / f"round-{round_id}"


def run_train(
    ws: Workspace, round_id: int, settings: TrainSettings, progress: Progress | None = None
) -> dict[str, Any]:
    """Train and register the next policy; returns a summary of the run. Under a multi-process
    launch every rank trains its share, and only rank 0 touches the store (and returns the
    summary; the others return `{"worker_rank": True, ...}`). A killed or stopped run resumes
    from its last complete checkpoint when run again; one a kill cut short is moved aside."""
    from cai.backends import policy_location
    from cai.export import FORMAT
    from cai.train import is_main_process, last_complete_checkpoint, set_aside_incomplete_checkpoints

    progress = progress or Silent()
    config = settings.dpo
    main_process = is_main_process()
    with ws.session() as session:
        round_ = repo.get_round(session, round_id)
        check_kind(round_.kind, Stage.TRAIN, round_id)
        policy = repo.get_policy(session, round_.policy)
        snapshot_dir, digest, snapshot_id = snapshot_to_train(session, round_id, settings.snapshot, FORMAT)
        ref_row = training.root_policy(session, policy.id) if settings.reference == "sft" else None
        reference_id = ref_row.id if ref_row else policy.id
        output_dir = (settings.output or default_run_dir(round_id)).resolve()
        settings_json = config.model_dump(mode="json") | {"reference": settings.reference}
        run_id: int | None = None
        if main_process:
            run_id, resumed = training.start_or_resume_run(
                session, round_id, snapshot_id, reference_id, settings_json, str(output_dir)
            )
            advance(session, round_id, Stage.TRAIN, Event.START)
        tracked = tracked_run_of(session, round_, policy.id, "dpo", digest, run_id)
    policy_dir = Path(policy_location(policy.name, policy.model_ref, ws.cache_dir))
    reference_dir = Path(policy_location(ref_row.name, ref_row.model_ref, ws.cache_dir)) if ref_row else None
    if not main_process:
        # Only after the transaction: on SQLite it holds the write lock (BEGIN IMMEDIATE), which
        # rank 0 needs to record the run while this process waits for rank 0 inside training.
        result = _train(snapshot_dir, policy_dir, output_dir, settings, reference_dir, None, tracked)
        return {
            "round": round_id,
            "worker_rank": True,
            "steps": result.steps,
            "model_dir": str(result.model_dir),
        }
    assert run_id is not None  # the main process recorded it
    progress.note(f"training run {run_id}{' (resuming)' if resumed else ''}: {policy.name} on {snapshot_dir}")
    moved = set_aside_incomplete_checkpoints(output_dir)
    for aside in moved:
        name = aside.name.split(".")[0]
        progress.note(f"{name} was incomplete (a run killed while saving it): moved to {aside}")
    if moved:
        last = last_complete_checkpoint(output_dir)
        progress.note(
            f"resuming from {last.name}" if last else "no complete checkpoint: training starts afresh"
        )
    progress.task(f"round {round_id}: DPO")
    summary = train_and_register(
        ws,
        round_,
        policy,
        Stage.TRAIN,
        "dpo",
        run_id,
        digest,
        settings_json,
        progress,
        lambda on_log: _train(snapshot_dir, policy_dir, output_dir, settings, reference_dir, on_log, tracked),
    )
    with ws.session() as session:
        steps = training.training_steps(session, run_id)
    return summary | {"last_step": steps[-1][1] if steps else {}}


def train_and_register(
    ws: Workspace,
    round_: repo.RoundRecord,
    policy: repo.PolicyRecord,
    stage: Stage,
    method: str,
    run_id: int,
    snapshot_sha256: str,
    settings_json: dict[str, Any],
    progress: Progress,
    train: Callable[[OnLog], TrainResult],
) -> dict[str, Any]:
    """Run `train` (given the step recorder) as training run `run_id` of the round's `stage`,
    then register what it trained as the policy that follows `policy` (named for the `method`)
    and finish the stage. A failed or stopped run is marked so (its checkpoints resume).
    Returns the run's summary."""
    with failure_recorded(ws, round_.id, stage):
        try:
            result = train(step_recorder(ws, run_id, progress))
        except BaseException:
            with ws.session() as session:
                training.fail_run(session, run_id)
            raise
        with ws.session() as session:
            new_policy = training.finish_run(
                session,
                run_id,
                result.metrics,
                str(result.model_dir),
                f"{policy.name}+{method}-r{round_.id}-t{run_id}",
                policy.id,
                snapshot_sha256,
                round_.constitution_id,
                settings_json,
            )
            advance(session, round_.id, stage, Event.FINISH)
    return {
        "training_run": run_id,
        "policy_id": new_policy,
        "model_dir": str(result.model_dir),
        "steps": result.steps,
        "resumed": result.resumed,
        "metrics": result.metrics,
        "config": settings_json,
    }


def snapshot_to_train(
    session: Session, round_id: int, given: Path | None, expected_format: str
) -> tuple[Path, str, int]:
    """(directory, manifest sha256, snapshot id) of what a training stage trains on: `given`, else
    the round's latest export. Complete, unaltered, of `expected_format` and exported by this
    database, or refused (BadInput) before any run is recorded."""
    from cai.export import load_manifest, manifest_sha256

    if given is not None:
        load_manifest(given, expected_format)
    snapshot_dir = given if given is not None else recorded_snapshot(session, round_id, expected_format)
    digest = manifest_sha256(snapshot_dir)
    snapshot_row = training.snapshot_by_manifest(session, digest)
    if snapshot_row is None:
        raise BadInput(f"snapshot: {snapshot_dir} was not exported by this database (cai export)")
    return snapshot_dir, digest, snapshot_row.id


def tracked_run_of(
    session: Session,
    round_: repo.RoundRecord,
    policy_id: int,
    method: str,
    snapshot_sha256: str,
    run_id: int | None,
) -> TrackedRun:
    """What the run is called in the experiment trackers, from the rows it trains on."""
    return tracked_run(
        round_.id,
        method,
        repo.policy_lineage(session, policy_id),
        round_.constitution,
        round_.constitution_sha256,
        snapshot_sha256,
        run_id,
    )


def step_recorder(ws: Workspace, run_id: int, progress: Progress) -> OnLog:
    """A training callback that stores each step's metrics, shows the loss, and stops the run at
    a step boundary when asked (its last checkpoint resumes)."""

    def on_log(step: int, metrics: dict[str, float]) -> None:
        with ws.session() as session:
            training.record_step(session, run_id, step, metrics)
        loss = metrics.get("loss")
        progress.update(step, None, f"loss {loss:.4f}" if loss is not None else "")
        check(progress, "between training steps (the last checkpoint resumes)")

    return on_log


def recorded_snapshot(session: Session, round_id: int, expected_format: str) -> Path:
    """Where the round's latest snapshot was last exported, refused with what to do when that
    directory no longer holds it (moved or deleted since) or holds another kind of snapshot."""
    from cai.export import load_manifest

    recorded = training.latest_snapshot(session, round_id)
    path = Path(recorded.path)
    try:
        load_manifest(path, expected_format)
    except BadInput as exc:
        raise BadInput(
            f"round {round_id}: snapshot {recorded.id} was last exported to {path}, which no longer "
            f"holds it ({exc}); export the round again (cai export --round {round_id}) or pass --snapshot DIR"
        ) from None
    return path


def _train(
    snapshot_dir: Path,
    policy_dir: Path,
    output_dir: Path,
    settings: TrainSettings,
    reference_dir: Path | None,
    on_log: Any,
    tracked: TrackedRun,
) -> Any:
    from cai.train import train_dpo

    # transformers' progress callback prints logs to stdout; keep stdout for --json.
    with contextlib.redirect_stdout(sys.stderr):
        return train_dpo(snapshot_dir, policy_dir, output_dir, settings.dpo, reference_dir, on_log, tracked)


def run_train_launched(
    ws: Workspace,
    round_id: int,
    settings: TrainSettings,
    accelerate_config: Path,
    progress: Progress | None = None,
    poll_s: float = 2.0,
) -> dict[str, Any]:
    """The train stage as `accelerate launch --config_file CONFIG -m cai train ...` (the path
    `accelerate/cpu-ddp.yaml` exercises): every process trains its share, rank 0 records the run
    and prints its summary. Progress comes from the steps rank 0 stores; a stop request ends
    the launch (the last checkpoint resumes)."""
    progress = progress or Silent()
    with tempfile.TemporaryDirectory(prefix="cai-train-") as tmp:
        config_file = Path(tmp) / "dpo.json"
        config_file.write_text(settings.dpo.model_dump_json(), encoding="utf-8")
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(accelerate_config),
        ]
        command += _port_if_unset(accelerate_config)
        command += [
            "-m", "cai", "--db", ws.settings.database_url, "train", "--round", str(round_id),
            "--config", str(config_file), "--reference", settings.reference, "--json",
        ]  # fmt: skip
        if settings.snapshot:
            command += ["--snapshot", str(settings.snapshot)]
        if settings.output:
            command += ["--output", str(settings.output)]
        progress.note("launching: " + " ".join(command[2:]))
        progress.task(f"round {round_id}: DPO ({accelerate_config.name})")
        with tempfile.TemporaryFile() as stdout:
            child = subprocess.Popen(command, stdout=stdout, start_new_session=True, env=os.environ.copy())
            try:
                while child.poll() is None:
                    time.sleep(poll_s)
                    _report_steps(ws, round_id, progress)
                    if progress.stop_requested():
                        os.killpg(child.pid, signal.SIGTERM)
                        child.wait()
                        raise Stopped(
                            f"round {round_id}: training stopped on request (its checkpoint resumes)"
                        )
            except BaseException:
                if child.poll() is None:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
                raise
            stdout.seek(0)
            printed = stdout.read().decode("utf-8", "replace")
    if child.returncode != 0:
        raise RuntimeError(
            f"accelerate launch exited {child.returncode} (its messages are in the worker's stderr)"
        )
    return dict(json.loads(printed[printed.index("{") :]))


def _port_if_unset(accelerate_config: Path) -> list[str]:
    """A free rendezvous port for a one-machine launch whose config names none: accelerate's
    default (29500) may be taken by another launch on the same machine."""
    import yaml

    from cai.net import free_port

    try:
        config = yaml.safe_load(accelerate_config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BadInput(f"{accelerate_config}: cannot read the accelerate config: {exc}") from None
    if config.get("main_process_port") or int(config.get("num_machines") or 1) > 1:
        return []
    return ["--main_process_port", str(free_port())]


def _report_steps(ws: Workspace, round_id: int, progress: Progress) -> None:
    with ws.session() as session:
        step = training.latest_step(session, round_id)
    if step is not None:
        progress.update(step, None)
