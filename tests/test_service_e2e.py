"""The service end to end on PostgreSQL, as a team deploys it: `cai serve` (the API, no worker in
its process) and a separate `cai worker`, both real processes, driven over HTTP with tokens of
three roles. An operator registers a constitution, imports prompts, starts a round and runs a
loop job on the tiny model against the loopback judge; the snapshot's manifest is fetched; an
annotator overrides a label; a viewer's write is refused; a new export carries the override."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests import fake_openai as fake
from tests.cai_process import running_cai
from tests.conftest import REPO, TEST_DATABASE_URL, Cli
from tests.test_worker import PROMPTS, deterministic, processes, worker
from tests.tiny_model import smollm2_tokenizer_dir, tiny_model_dir

__all__ = ["processes", "smollm2_tokenizer_dir", "tiny_model_dir"]

pytestmark = pytest.mark.skipif(
    TEST_DATABASE_URL == "sqlite",
    reason="the multi-process deployment is PostgreSQL's (SQLite runs `cai serve` alone)",
)


class Api:
    def __init__(self, base: str) -> None:
        self.base = base

    def call(
        self,
        token: str,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        **query: Any,
    ) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
        url = f"{self.base}/api/v1{path}"
        if query:
            url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        request = urllib.request.Request(
            url,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": content_type},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def wait_for_job(self, token: str, job_id: int, timeout: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            _, job = self.call(token, "GET", f"/jobs/{job_id}")
            if job["status"] not in ("queued", "running"):
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout} s"
            time.sleep(0.5)


def loop_settings(server: fake.FakeOpenAI, artifacts: Path) -> dict[str, Any]:
    """A one-round loop on the tiny model: sampling and judging against the loopback server."""
    sampling = {"backend": "openai", "base_url": server.base_url, "batch_size": 2}
    judging = {"judge_base_url": server.base_url, "judge_model": "fake-judge", "concurrency": 1}
    return {
        "rounds": 1,
        "loop": {
            "generate": {**sampling, "limit": PROMPTS},
            "judge": judging,
            "train": {"dpo": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 128}},
            "eval": {**sampling, **judging, "limit": 6},
            "artifacts": str(artifacts),
        },
    }


def test_serve_and_a_worker_run_a_round_for_three_roles_over_http(
    db_url: str, cli: Cli, tiny_model_dir: Path, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    operator, annotator, viewer = (
        cli("token", "create", "--name", name, "--role", role).stdout.strip()
        for name, role in (("ops", "operator"), ("ana", "annotator"), ("vic", "viewer"))
    )
    with (
        fake.FakeOpenAI(deterministic()) as server,
        running_cai(db_url, "serve", tmp_path / "serve.log", None, "--no-worker") as base,
    ):
        processes.append(worker(db_url, "--kinds", "loop,export"))
        api = Api(base)
        yaml_text = (REPO / "constitutions" / "helpful-harmless" / "v1.yaml").read_bytes()
        status, registered = api.call(operator, "POST", "/constitutions", yaml_text, "application/yaml")
        assert status == 201 and registered["constitution"]["ref"] == "helpful-harmless@1", registered
        prompts = (REPO / "prompt_sets" / "helpful-harmless.jsonl").read_bytes()
        status, imported = api.call(
            operator,
            "POST",
            "/prompts",
            prompts,
            "application/octet-stream",
            filename="helpful-harmless.jsonl",
        )
        assert status == 201 and imported["imported"] > PROMPTS, imported
        status, round_ = api.call(
            operator, "POST", "/rounds", {"constitution": "helpful-harmless@1", "policy": str(tiny_model_dir)}
        )
        assert status == 201, round_
        round_id = round_["id"]

        loop_job = {"kind": "loop", "round_id": round_id, "settings": loop_settings(server, tmp_path / "art")}
        status, job = api.call(operator, "POST", "/jobs", loop_job)
        assert status == 201, job
        done = api.wait_for_job(viewer, job["id"])
        assert done["status"] == "succeeded", (done["error"], done["owner"])
        assert int(done["owner"].split(":")[1]) == processes[0].pid  # the separate worker ran it

        status, snapshots = api.call(viewer, "GET", f"/rounds/{round_id}/snapshots")
        assert status == 200 and len(snapshots) == 1
        status, manifest = api.call(viewer, "GET", f"/snapshots/{snapshots[0]['id']}/manifest")
        assert (
            status == 200
            and manifest["round"] == round_id
            and manifest["counts"]["by_source"].get("human", 0) == 0
        )

        status, page = api.call(viewer, "GET", "/pairs", round_id=round_id, limit=500)
        target = next(p for p in page["items"] if p["verdict"] in ("A", "B"))
        flipped = "B" if target["verdict"] == "A" else "A"
        before = api.call(viewer, "GET", f"/pairs/{target['pair_id']}")[1]
        status, refused = api.call(
            viewer, "POST", f"/pairs/{target['pair_id']}/override", {"prefer": flipped, "note": "no"}
        )
        assert status == 403 and refused["status"] == 403
        assert api.call(viewer, "GET", f"/pairs/{target['pair_id']}")[1] == before  # nothing written
        status, audit = api.call(
            annotator,
            "POST",
            f"/pairs/{target['pair_id']}/override",
            {"prefer": flipped, "note": "the judge erred"},
        )
        assert status == 201 and audit["author"] == "ana"

        status, export = api.call(
            operator,
            "POST",
            "/jobs",
            {"kind": "export", "round_id": round_id, "settings": {"out": str(tmp_path / "again")}},
        )
        assert status == 201, export
        assert api.wait_for_job(viewer, export["id"])["status"] == "succeeded"
        status, snapshots = api.call(viewer, "GET", f"/rounds/{round_id}/snapshots")
        assert len(snapshots) == 2
        status, manifest = api.call(viewer, "GET", f"/snapshots/{snapshots[-1]['id']}/manifest")
        assert manifest["counts"]["by_source"]["human"] == 1
        assert api.call(operator, "GET", "/actions")[0] == 403  # the log of writes is an admin's
    listed = json.loads(cli("token", "list", "--json").stdout)
    assert {t["name"] for t in listed} == {"ops", "ana", "vic"}
