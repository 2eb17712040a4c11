"""The API's data and quality resources over a real database: prompt files imported and paged,
policies with lineage, constitution diffs, snapshots (manifest and file), per-annotator queues
with an overlap and the agreement between humans they make measurable, evaluations,
calibrations, the round report, and the log of who wrote what."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from cai.audit import krippendorff_alpha
from cai.auth import Role
from cai.store import tokens
from cai.store.models import CalibrationRow
from tests.conftest import REPO, Cli, table_counts
from tests.test_api import BOOTSTRAP, api, assert_problem, holders
from tests.test_audit import World, world

__all__ = ["api", "holders", "world"]
ADMIN = {"Authorization": f"Bearer {BOOTSTRAP}"}


def test_prompt_files_import_all_or_nothing_and_page_by_cursor(
    api: TestClient, holders: dict, engine: Engine
) -> None:
    operator, viewer = holders[Role.OPERATOR], holders[Role.VIEWER]
    good = "\n".join(json.dumps({"prompt": f"Question {i}?", "tags": ["quiz"]}) for i in range(5)) + "\n"
    bad = good + '{"prompt": 3}\n{not json\n'
    before = table_counts(engine)
    refused = api.post("/prompts", content=bad.encode(), params={"filename": "quiz.jsonl"}, headers=operator)
    body = assert_problem(refused, 422, "quiz.jsonl")
    assert any(line.startswith("quiz.jsonl:7: invalid JSON") for line in body["errors"]), body["errors"]
    assert "cai-upload-" not in refused.text  # named as uploaded, not where the server put it
    assert_problem(
        api.post("/prompts", content=good.encode(), params={"filename": "../x.jsonl"}, headers=operator),
        422,
        "plain file name",
    )
    assert_problem(
        api.post("/prompts", content=good.encode(), params={"filename": "quiz.jsonl"}, headers=viewer),
        403,
        "operator",
    )
    assert table_counts(engine) == before

    made = api.post(
        "/prompts",
        content=good.encode(),
        params={"filename": "quiz.jsonl", "split": "eval", "tag": ["mine"]},
        headers=operator,
    )
    assert made.status_code == 201, made.text
    assert (made.json()["imported"], made.json()["by_split"]["eval"]) == (5, 5)
    again = api.post("/prompts", content=good.encode(), params={"filename": "quiz.jsonl"}, headers=operator)
    assert (again.json()["imported"], again.json()["already_stored"]) == (0, 5)

    seen, cursor = [], None
    while True:
        page = api.get(
            "/prompts",
            params={"tag": "mine", "limit": 2, **({"cursor": cursor} if cursor else {})},
            headers=viewer,
        ).json()
        assert page["total"] == 5
        seen += [p["text"] for p in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"Question {i}?" for i in range(5)]
    assert api.get("/prompts", params={"split": "train"}, headers=viewer).json()["total"] == 0

    log = api.get("/actions", headers=ADMIN).json()["items"]
    assert [(a["actor"], a["verb"], a["subject"], a["detail"]["imported"]) for a in log] == [
        ("operator", "prompts.import", "quiz.jsonl", 0),
        ("operator", "prompts.import", "quiz.jsonl", 5),
    ]
    assert_problem(api.get("/actions", headers=operator), 403, "admin")


def test_constitution_diff_names_the_changed_principles(api: TestClient, holders: dict) -> None:
    operator, viewer = holders[Role.OPERATOR], holders[Role.VIEWER]
    as_yaml = {**operator, "Content-Type": "application/yaml"}
    v1 = (REPO / "constitutions" / "concise-safe" / "v1.yaml").read_bytes()
    v2 = v1.replace(b"version: 1", b"version: 2").replace(b"stays under 200 words", b"stays under 150 words")
    for text in (v1, v2):
        assert api.post("/constitutions", content=text, headers=as_yaml).status_code == 201
    diff = api.get("/constitutions/concise-safe/diff", params={"from": 1, "to": 2}, headers=viewer).json()
    assert (diff["from_ref"], diff["to_ref"], diff["added"], diff["removed"]) == (
        "concise-safe@1",
        "concise-safe@2",
        [],
        [],
    )
    assert len(diff["changed"]) == 1 and "+" in diff["diff"] and "under 150 words" in diff["diff"]
    assert_problem(
        api.get("/constitutions/concise-safe/diff", params={"from": 1, "to": 9}, headers=viewer), 404, ""
    )
    log = api.get("/actions", headers=ADMIN).json()["items"]
    assert [(a["verb"], a["subject"]) for a in log] == [
        ("constitution.register", "concise-safe@2"),
        ("constitution.register", "concise-safe@1"),
    ]


def test_two_annotators_work_overlapping_queues_and_their_agreement_is_reported(
    api: TestClient, holders: dict, engine: Engine, world: World, cli: Cli
) -> None:
    with Session(engine) as session, session.begin():
        ana, bo = (
            {"Authorization": f"Bearer {tokens.create(session, name, Role.ANNOTATOR)}"}
            for name in ("ana", "bo")
        )
    operator, viewer, round_id = holders[Role.OPERATOR], holders[Role.VIEWER], world.round_id
    request = {"annotators": ["ana", "bo"], "per_annotator": 3, "overlap": 2 / 3, "seed": 1}
    before = table_counts(engine)
    assert_problem(api.post(f"/rounds/{round_id}/queues", json=request, headers=ana), 403, "operator")
    assert_problem(
        api.post(f"/rounds/{round_id}/queues", json={**request, "overlap": 2}, headers=operator),
        422,
        "overlap",
    )
    assert_problem(api.get(f"/rounds/{round_id}/queue", headers=viewer), 403, "annotator")
    assert_problem(
        api.get(f"/rounds/{round_id}/queue", params={"annotator": "bo"}, headers=ana), 403, "operator"
    )
    assert table_counts(engine) == before

    made = api.post(f"/rounds/{round_id}/queues", json=request, headers=operator)
    assert made.status_code == 201, made.text
    queues = made.json()["queues"]
    # The four labeled, unchecked pairs: two shared, then one each.
    assert queues["ana"][:2] == queues["bo"][:2] and len(queues["ana"]) == len(queues["bo"]) == 3
    assert set(queues["ana"]) | set(queues["bo"]) == {world.ids[n] for n in ("clear", "b", "flip", "tie")}

    shared = set(queues["ana"][:2])
    decisions = {"ana": "A", "bo": "B"}  # they differ on every shared pair they override

    def work_through(headers: dict, name: str) -> list[int]:
        done = []
        while True:
            state = api.get(f"/rounds/{round_id}/queue", headers=headers).json()
            assert state["annotator"] == name and state["assigned"] == 3 and state["done"] == len(done)
            pair = state["next"]
            if pair is None:
                return done
            if pair["pair_id"] == min(shared):  # both agree with the judge here
                response = api.post(f"/pairs/{pair['pair_id']}/review", json={}, headers=headers)
            else:
                override = {"prefer": decisions[name], "note": f"{name} decided"}
                response = api.post(f"/pairs/{pair['pair_id']}/override", json=override, headers=headers)
            assert response.status_code == 201, response.text
            done.append(pair["pair_id"])

    assert work_through(ana, "ana") == queues["ana"]
    assert work_through(bo, "bo") == queues["bo"]
    assert (
        api.get(f"/rounds/{round_id}/queue", params={"annotator": "ana"}, headers=operator).json()["done"]
        == 3
    )

    judged = {
        p["pair_id"]: p["judge_verdict"]
        for p in api.get("/pairs", params={"round_id": round_id, "limit": 50}, headers=viewer).json()["items"]
    }
    reviewed = min(shared)
    other = max(shared)
    expected = krippendorff_alpha([(judged[reviewed], judged[reviewed]), ("A", "B")])
    stats = api.get("/audit/stats", params={"round_id": round_id}, headers=viewer).json()
    assert stats["humans"]["items"] == 2 and stats["humans"]["raters"] == 2
    assert (
        stats["humans"]["alpha"] == pytest.approx(expected)
        if expected is not None
        else stats["humans"]["alpha"] is None
    )
    assert stats["overall"]["human_checked"] == 4
    assert (
        json.loads(cli("audit", "stats", "--round", round_id, "--json").stdout)["humans"] == stats["humans"]
    )
    assert other in shared


def test_policies_snapshots_evaluations_calibrations_and_report_read_back(
    api: TestClient, holders: dict, world: World, cli: Cli, engine: Engine, tmp_path: Path
) -> None:
    viewer, operator = holders[Role.VIEWER], holders[Role.OPERATOR]
    policies = api.get("/policies", headers=viewer).json()
    assert [(p["name"], p["lineage"], p["parent"]) for p in policies] == [
        ("fake/policy", ["fake/policy"], None)
    ]

    assert api.get(f"/rounds/{world.round_id}/snapshots", headers=viewer).json() == []
    cli("export", "--round", world.round_id, "--out", tmp_path / "snap")
    (snapshot,) = api.get(f"/rounds/{world.round_id}/snapshots", headers=viewer).json()
    manifest = api.get(f"/snapshots/{snapshot['id']}/manifest", headers=viewer).json()
    assert manifest["round"] == world.round_id and manifest["counts"] == snapshot["counts"]
    assert (
        hashlib.sha256((tmp_path / "snap" / "manifest.json").read_bytes()).hexdigest()
        == snapshot["manifest_sha256"]
    )
    train = api.get(f"/snapshots/{snapshot['id']}/files/train", headers=viewer)
    assert train.status_code == 200 and train.content[:4] == b"PAR1"
    (train_name,) = [name for name in manifest["files"] if name.startswith("data/train-")]
    assert train.content == (tmp_path / "snap" / train_name).read_bytes()
    assert_problem(api.get("/snapshots/999/manifest", headers=viewer), 404, "snapshot 999")
    assert api.get(f"/snapshots/{snapshot['id']}/files/secrets", headers=viewer).status_code == 422

    assert_problem(api.get(f"/rounds/{world.round_id}/evaluation", headers=viewer), 404, "no evaluation yet")
    with Session(engine) as session, session.begin():
        session.add(
            CalibrationRow(
                judge_id=world.judge_id,
                constitution_id=world.constitution_id,
                gold_sha256="0" * 64,
                pairs=8,
                accuracy=0.75,
                consistency=0.875,
                injection_follow_rate=0.125,
                details={},
            )
        )
    calibrations = api.get("/calibrations", headers=viewer).json()
    assert [
        (c["constitution"], c["pairs"], c["accuracy"], c["injection_follow_rate"]) for c in calibrations
    ] == [("helpful-harmless@1", 8, 0.75, 0.125)]
    assert_problem(
        api.post("/calibrations", json={"constitution": "helpful-harmless@1"}, headers=viewer), 403, ""
    )
    queued = api.post("/calibrations", json={"constitution": "helpful-harmless@1"}, headers=operator)
    assert queued.status_code == 202
    job = api.get(f"/jobs/{queued.json()['job_id']}", headers=viewer).json()
    assert (job["kind"], job["requested_by"]) == ("calibrate", "operator")

    report = api.get(f"/rounds/{world.round_id}/report", headers=viewer).json()
    assert [r["id"] for r in report["rounds"]] == [world.round_id]
    assert report["rounds"][0]["constitution"] == "helpful-harmless@1"
