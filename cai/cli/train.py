"""`cai train`: DPO on a round's snapshot with TRL; the result is registered as the next policy."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cai.cli.app import (
    JSON_OPTION,
    engine,
    err,
    out,
    print_json,
    progress_bar,
    quiet_libraries,
    settings,
    transaction,
)

if TYPE_CHECKING:
    from cai.train import TrainConfig


def train(
    ctx: typer.Context,
    round_id: int = typer.Option(..., "--round", "-r", metavar="ID", show_default=False),
    snapshot: Path = typer.Option(
        None, "--snapshot", help="Snapshot directory (default: the round's latest export)."
    ),
    config_file: Path = typer.Option(
        None, "--config", help="YAML/JSON with DPO settings (see cai.train.TrainConfig)."
    ),
    output: Path = typer.Option(
        None, "--output", help="Checkpoints and final model (default: runs/round-ID)."
    ),
    reference: str = typer.Option(
        "start", "--reference", help="start: the round's policy; sft: the first policy of the lineage."
    ),
    max_steps: int = typer.Option(
        None, "--max-steps", help="Stop after N optimizer steps (overrides epochs)."
    ),
    epochs: float = typer.Option(None, "--epochs", min=0.0),
    learning_rate: float = typer.Option(None, "--lr", min=0.0),
    beta: float = typer.Option(None, "--beta", min=0.0),
    loss_type: list[str] = typer.Option(
        None, "--loss-type", help="Any loss type the installed TRL accepts; repeat to combine."
    ),
    batch_size: int = typer.Option(None, "--batch-size", min=1),
    grad_accum: int = typer.Option(None, "--grad-accum", min=1),
    max_length: int = typer.Option(None, "--max-length", min=16),
    lora_r: int = typer.Option(
        None, "--lora-r", min=1, help="Train LoRA adapters of this rank (needs peft)."
    ),
    tensorboard: bool = typer.Option(None, "--tensorboard/--no-tensorboard", help="Also log to TensorBoard."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Train the round's policy with DPO on its snapshot (reference: the round's starting policy,
    or --reference sft). Per-step metrics go to the database; a killed run resumes from its last
    checkpoint when run again; the result becomes policy p_{r+1} with its lineage."""
    from cai.errors import BadInput
    from cai.train import load_config

    if reference not in ("start", "sft"):
        raise BadInput(f"--reference: {reference!r} is not 'start' or 'sft'")
    config = load_config(
        config_file,
        max_steps=max_steps,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        beta=beta,
        loss_type=loss_type or None,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        max_length=max_length,
        lora_r=lora_r,
        report_to_tensorboard=tensorboard,
    )
    summary = run_train(ctx, round_id, config, reference, snapshot, output)
    if summary.get("worker_rank"):
        return  # another process of a multi-process launch: rank 0 reports the run
    if as_json:
        print_json(summary)
        return
    accuracy = summary["last_step"].get("rewards/accuracies")
    margin = summary["last_step"].get("rewards/margins")
    out.print(
        f"round {round_id}: trained {summary['steps']} steps -> policy {summary['policy_id']} "
        f"at {summary['model_dir']}"
        + (
            f"; last reward accuracy {accuracy:.2f}, margin {margin:.3f}"
            if accuracy is not None and margin is not None
            else ""
        ),
        highlight=False,
    )


def run_train(
    ctx: typer.Context,
    round_id: int,
    config: TrainConfig,
    reference: str = "start",
    snapshot: Path | None = None,
    output: Path | None = None,
) -> dict[str, Any]:
    """The `cai train` stage, shared with `cai loop`: a summary of the finished run."""
    from cai.backends import policy_location
    from cai.errors import BadInput
    from cai.export import load_manifest, manifest_sha256
    from cai.store import repo, training, work
    from cai.store.db import session_scope
    from cai.train import is_main_process, train_dpo

    cfg = settings(ctx)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
    main_process = is_main_process()
    with transaction(ctx) as session:
        round_ = repo.get_round(session, round_id)
        policy = repo.get_policy(session, round_.policy)
        if snapshot is None:
            stored = training.latest_snapshot(session, round_id)
            snapshot_dir = Path(stored.path)
        else:
            snapshot_dir = snapshot
        load_manifest(snapshot_dir)  # complete and unaltered, or refused before any run is recorded
        digest = manifest_sha256(snapshot_dir)
        snapshot_row = training.snapshot_by_manifest(session, digest)
        if snapshot_row is None:
            raise BadInput(f"--snapshot: {snapshot_dir} was not exported by this database (cai export)")
        ref_row = training.root_policy(session, policy.id) if reference == "sft" else None
        reference_id = ref_row.id if ref_row else policy.id
        output_dir = (output or Path("runs") / f"round-{round_id}").resolve()
        settings_json = config.model_dump(mode="json") | {"reference": reference}
        if main_process:
            run_id, resumed = training.start_or_resume_run(
                session, round_id, snapshot_row.id, reference_id, settings_json, str(output_dir)
            )
            work.set_round_status(session, round_id, "training")
    policy_dir = policy_location(policy.name, policy.model_ref, cache_dir)
    reference_dir = policy_location(ref_row.name, ref_row.model_ref, cache_dir) if ref_row else None
    if not main_process:
        # Only after the transaction: on SQLite it holds the write lock (BEGIN IMMEDIATE), which
        # rank 0 needs to record the run while this process waits for rank 0 inside training.
        return _train_on_worker_rank(round_id, config, snapshot_dir, policy_dir, reference_dir, output_dir)
    err.print(f"training run {run_id}{' (resuming)' if resumed else ''}: {policy.name} on {snapshot_dir}")

    store = engine(ctx)
    with progress_bar("loss {task.fields[loss]}") as progress:
        task = progress.add_task(f"round {round_id}: DPO", total=None, loss="-")

        def on_log(step: int, metrics: dict[str, float]) -> None:
            with session_scope(store) as session:
                training.record_step(session, run_id, step, metrics)
            loss = metrics.get("loss")
            progress.update(task, completed=step, loss=f"{loss:.4f}" if loss is not None else "-")

        quiet_libraries()
        try:
            # transformers' progress callback prints logs to stdout; keep stdout for --json.
            with contextlib.redirect_stdout(sys.stderr):
                result = train_dpo(
                    snapshot_dir,
                    Path(policy_dir),
                    output_dir,
                    config,
                    Path(reference_dir) if reference_dir else None,
                    on_log,
                )
        except BaseException:
            with session_scope(store) as session:
                training.fail_run(session, run_id)
            raise
    with transaction(ctx) as session:
        new_policy = training.finish_run(
            session,
            run_id,
            result.metrics,
            str(result.model_dir),
            f"{policy.name}+dpo-r{round_id}-t{run_id}",
            policy.id,
            digest,
            round_.constitution_id,
            settings_json,
        )
        work.set_round_status(session, round_id, "trained")
        steps = training.training_steps(session, run_id)
    last = steps[-1][1] if steps else {}
    summary = {
        "training_run": run_id,
        "policy_id": new_policy,
        "model_dir": str(result.model_dir),
        "steps": result.steps,
        "resumed": result.resumed,
        "metrics": result.metrics,
        "last_step": last,
        "config": settings_json,
    }
    return summary


def _train_on_worker_rank(
    round_id: int,
    config: TrainConfig,
    snapshot_dir: Path,
    policy_dir: Path | str,
    reference_dir: Path | str | None,
    output_dir: Path,
) -> dict[str, Any]:
    """Another process of `accelerate launch`: it trains its share and leaves the store (run
    rows, metrics, the new policy) to rank 0, which records them once."""
    from cai.train import train_dpo

    with contextlib.redirect_stdout(sys.stderr):
        result = train_dpo(
            snapshot_dir,
            Path(policy_dir),
            output_dir,
            config,
            Path(reference_dir) if reference_dir else None,
            None,
        )
    return {"round": round_id, "worker_rank": True, "steps": result.steps, "model_dir": str(result.model_dir)}
