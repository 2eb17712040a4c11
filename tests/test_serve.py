"""`cai serve` as a user runs it: one process serving the API and, on SQLite, running the jobs
submitted through it; over real HTTP."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.cai_process import running_cai
from tests.conftest import Cli
from tests.test_audit import World, world

__all__ = ["world"]  # the audit tests' round of judged pairs, as a fixture here too


def test_a_job_submitted_through_the_api_runs_in_the_serving_process(
    db_url: str, cli: Cli, world: World, tmp_path: Path
) -> None:
    token = cli("token", "create", "--name", "ops-bot", "--role", "operator").stdout.strip()
    snapshot = tmp_path / "snapshot"
    # --worker: the default on SQLite; spelled out so the PostgreSQL pass runs it in-process too.
    with running_cai(db_url, "serve", tmp_path / "serve.log", None, "--worker") as base:

        def call(path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
            request = urllib.request.Request(
                f"{base}/api/v1{path}",
                data=json.dumps(body).encode() if body is not None else None,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())

        status, submitted = call(
            "/jobs", {"kind": "export", "round_id": world.round_id, "settings": {"out": str(snapshot)}}
        )
        assert status == 201, submitted
        deadline = time.monotonic() + 120
        while (job := call(f"/jobs/{submitted['id']}")[1])["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, f"job {job['id']} still {job['status']} after 120 s"
            time.sleep(0.3)
    assert job["status"] == "succeeded", job
    assert job["requested_by"] == "ops-bot" and job["owner"]
    manifest = json.loads((snapshot / "manifest.json").read_text())
    assert manifest["round"] == world.round_id
