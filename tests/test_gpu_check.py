"""bench/gpu_check.sh is run on a GPU machine only when one is lent, with one try to spare; its
dry run here takes every code path once on the CPU, so a broken check is found before that."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_measures_every_part_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    failed = {part: report[part]["error"] for part in ("dpo", "sampling", "judge") if "error" in report[part]}
    assert not failed, failed
    dpo = report["dpo"]
    assert set(dpo["runs"]) == {"cai", "trl_defaults"} and dpo["ratio_cai_over_trl"] > 0
    assert all(run["steps"] >= 1 and run["tokens_per_s"] > 0 for run in dpo["runs"].values())
    assert (
        report["sampling"]["hf_sampler"]["tokens"] > 0
        and report["sampling"]["batched_generate"]["tokens"] > 0
    )
    assert report["judge"]["judgments"] >= 1 and report["judge"]["judgments_per_s"] > 0


def test_gpu_check_refuses_to_run_without_a_gpu_unless_dry() -> None:
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--parts", "judge"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--dry-run" in done.stderr
