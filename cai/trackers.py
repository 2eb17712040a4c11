"""The experiment trackers a training run reports to (TRL's `report_to`) and what the run is
called there: a name and tags that say which round, method, policy lineage and constitution it
belongs to, so a run found in MLflow or W&B leads back to the database rows that made it.

The trackers themselves are transformers' integrations, configured by their own environment
variables (MLFLOW_TRACKING_URI, WANDB_PROJECT, WANDB_MODE, TRACKIO_DIR...); cai only names the
run and tags it."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cai.errors import BadInput

TRACKERS: dict[str, tuple[str, str]] = {
    # --report-to value -> (module it needs, how to install it)
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "trackio": ("trackio", "pip install trackio"),
    "mlflow": ("mlflow", "pip install mlflow-skinny (or mlflow)"),
    "wandb": ("wandb", "pip install wandb"),
}
PROJECT = "cai"
"""The project (trackio) a run is filed under; W&B's comes from WANDB_PROJECT, MLflow's
experiment from MLFLOW_EXPERIMENT_NAME."""


def known_trackers(names: list[str]) -> list[str]:
    """`names` without repeats, or ValueError naming what is not a tracker (for a pydantic field)."""
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker {', '.join(unknown)}; choose from {', '.join(TRACKERS)}")
    return list(dict.fromkeys(names))


def tensorboard_flag_as_report_to(values: Any) -> Any:
    """Config files and recorded settings from before `report_to` say `report_to_tensorboard`
    (a model_validator(mode="before") for the training configs)."""
    if isinstance(values, dict) and "report_to_tensorboard" in values:
        values = dict(values)
        if values.pop("report_to_tensorboard"):
            values["report_to"] = [*(values.get("report_to") or []), "tensorboard"]
    return values


def check_installed(report_to: list[str]) -> None:
    """BadInput, before any training starts, for a tracker whose package is missing."""
    for name in report_to:
        module, install = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise BadInput(f"--report-to {name} needs the {module} package: {install}")


@dataclass(frozen=True)
class TrackedRun:
    """How a training run appears in the trackers: its name, and tags (all strings, as every
    tracker stores them)."""

    name: str
    tags: dict[str, str] = field(default_factory=dict)


def tracked_run(
    round_id: int,
    method: str,
    lineage: list[str],
    constitution: str,
    constitution_sha256: str,
    snapshot_sha256: str,
    training_run: int | None = None,
) -> TrackedRun:
    """Name `cai-round-R-METHOD`; tags with the round, the method (dpo or sft), the policy being
    trained and its lineage (base model first), the constitution (`name@version` and its sha256)
    and the snapshot's manifest sha256."""
    tags = {
        "cai.round": str(round_id),
        "cai.method": method,
        "cai.policy": lineage[-1],
        "cai.lineage": " > ".join(lineage),
        "cai.constitution": constitution,
        "cai.constitution_sha256": constitution_sha256,
        "cai.snapshot_sha256": snapshot_sha256,
    }
    if training_run is not None:
        tags["cai.training_run"] = str(training_run)
    return TrackedRun(f"cai-round-{round_id}-{method}", tags)


def tracker_args(report_to: list[str], run: TrackedRun | None) -> dict[str, Any]:
    """The TrainingArguments that select the trackers and name the run."""
    args: dict[str, Any] = {"report_to": list(report_to) or "none"}
    if run is not None:
        args["run_name"] = run.name
        args["project"] = PROJECT
    return args


def tags_callback(run: TrackedRun) -> Any:
    """A TrainerCallback that sets the run's tags in each tracker once its run has started.
    Trainer runs callbacks in order and the tracker integrations come first, so by this one's
    `on_train_begin` they have opened their runs."""
    from transformers import TrainerCallback

    class SetTrackerTags(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not state.is_world_process_zero:
                return
            for name in args.report_to or ():
                tag = _TAGGERS.get(name)
                if tag is not None:
                    tag(run.tags)

    return SetTrackerTags()


def _tag_mlflow(tags: dict[str, str]) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tags(tags)


def _tag_wandb(tags: dict[str, str]) -> None:
    import wandb

    if wandb.run is not None:
        # W&B tags are short labels (64 characters at most); the full values go in the config.
        wandb.run.tags = tuple(wandb.run.tags or ()) + tuple(f"{k}={v}"[:64] for k, v in tags.items())
        wandb.run.config.update(tags, allow_val_change=True)


def _tag_trackio(tags: dict[str, str]) -> None:
    import trackio

    # trackio has no tags: the run's config (a dict) is what its dashboard shows beside the metrics.
    trackio.config.update(tags)


_TAGGERS: dict[str, Callable[[dict[str, str]], None]] = {
    # TensorBoard has no run metadata to set: its runs are told apart by their log directory.
    "mlflow": _tag_mlflow,
    "wandb": _tag_wandb,
    "trackio": _tag_trackio,
}
