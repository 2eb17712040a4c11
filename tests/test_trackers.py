"""`--report-to`: training runs report to the experiment trackers TRL knows, named and tagged with
the round, the policy lineage and the constitution. MLflow (a local SQLite store) and trackio
(its local SQLite files) are checked end to end through `cai train`; W&B needs an account and is
checked only for its clear error when missing."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cai.errors import BadInput
from cai.export import load_manifest
from cai.sft import load_sft_config
from cai.trackers import tracked_run
from cai.train import load_config
from tests.conftest import REPO, Cli
from tests.test_train_cli import judged_round
from tests.tiny_model import smollm2_tokenizer_dir, tiny_model_dir

__all__ = ["smollm2_tokenizer_dir", "tiny_model_dir"]  # session fixtures


def test_unknown_and_missing_trackers_are_refused_before_training(cli: Cli, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"report_to.*unknown tracker comet"):
        load_config(report_to=["mlflow", "comet"])
    config = tmp_path / "sft.yaml"
    config.write_text("report_to: neptune\n")
    with pytest.raises(BadInput, match=rf"{config}: report_to.*unknown tracker neptune"):
        load_sft_config(config)
    refused = cli("train", "--round", "1", "--report-to", "comet", expect=2)
    assert "unknown tracker comet" in refused.stderr
    if importlib.util.find_spec("wandb") is None:
        from cai.trackers import check_installed

        with pytest.raises(BadInput, match="--report-to wandb needs the wandb package: pip install wandb"):
            check_installed(["wandb"])


def test_config_files_that_say_report_to_tensorboard_still_load(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("report_to_tensorboard: true\nreport_to: [mlflow]\n")
    assert load_config(old).report_to == ["mlflow", "tensorboard"]
    old.write_text("report_to_tensorboard: false\n")
    assert load_sft_config(old).report_to == []
    assert load_config(report_to=["mlflow", "mlflow"]).report_to == ["mlflow"]


def test_run_name_and_tags_say_round_method_lineage_and_constitution() -> None:
    run = tracked_run(4, "dpo", ["smollm2", "smollm2+sft-r1-t1"], "concise-safe@2", "c" * 64, "s" * 64, 7)
    assert run.name == "cai-round-4-dpo"
    assert run.tags == {
        "cai.round": "4",
        "cai.method": "dpo",
        "cai.policy": "smollm2+sft-r1-t1",
        "cai.lineage": "smollm2 > smollm2+sft-r1-t1",
        "cai.constitution": "concise-safe@2",
        "cai.constitution_sha256": "c" * 64,
        "cai.snapshot_sha256": "s" * 64,
        "cai.training_run": "7",
    }


@pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None or importlib.util.find_spec("trackio") is None,
    reason="needs mlflow-skinny and trackio (the dev extra)",
)
def test_cai_train_reports_to_mlflow_and_trackio_with_its_tags(
    cli: Cli, db_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    round_id = judged_round(cli, tiny_model_dir, limit=8)
    # An eval split: it is scored at the end of training, inside the trackers' one run.
    cli("export", "-r", round_id, "--out", tmp_path / "snap", "--eval-fraction", 0.5)
    counts = load_manifest(tmp_path / "snap")["counts"]
    assert counts["train"] > 0 and counts["eval"] > 0, f"the fake judge left a split empty: {counts}"
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "MLFLOW_EXPERIMENT_NAME": "cai-test",
        "TRACKIO_DIR": str(tmp_path / "trackio"),
        "HF_HUB_OFFLINE": "1",
    }
    # A child process, as a user runs it: trackio reads TRACKIO_DIR when it is first imported.
    done = subprocess.run(
        [
            *(sys.executable, "-m", "cai", "--db", db_url, "train", "-r", str(round_id), "--json"),
            *("--output", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2"),
            *("--max-length", "128", "--report-to", "mlflow", "--report-to", "trackio"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)

    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("cai-test")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == f"cai-round-{round_id}-dpo"
    tags = run.data.tags
    assert tags["cai.round"] == str(round_id) and tags["cai.method"] == "dpo"
    assert tags["cai.constitution"] == "helpful-harmless@1"
    assert tags["cai.training_run"] == str(summary["training_run"])
    assert tags["cai.lineage"] == tags["cai.policy"]  # the base policy: a lineage of one
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert "eval_loss" in run.data.metrics

    stores = list((tmp_path / "trackio").rglob("*.db"))
    assert stores, f"trackio wrote nothing under {tmp_path / 'trackio'}"
    logged = []
    for store in stores:
        with sqlite3.connect(store) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "metrics" in tables:
                logged += db.execute("SELECT run_name, step, metrics FROM metrics").fetchall()
            configs = db.execute("SELECT config FROM configs").fetchall() if "configs" in tables else []
    assert {name for name, _, _ in logged} == {f"cai-round-{round_id}-dpo"}
    assert sum("train/loss" in json.loads(metrics) for _, _, metrics in logged) == 2
    assert any("eval/loss" in json.loads(metrics) for _, _, metrics in logged)
    assert any(json.loads(config).get("cai.round") == str(round_id) for (config,) in configs)
