"""The REST API (/api/v1) through FastAPI's TestClient over a real database: bearer tokens and
their roles, problem details for every refusal, jobs submitted, paged and cancelled, tokens
managed by admins only."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from cai.auth import Role
from cai.store import tokens
from cai.web.app import create_app
from tests.conftest import REPO, Cli, table_counts
from tests.test_audit import World, world

__all__ = ["world"]  # the audit tests' round of judged pairs, as a fixture here too

BOOTSTRAP = "bootstrap-admin-token-0123456789"
PROBLEM = "application/problem+json"


@pytest.fixture
def api(db_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(db_url, token=BOOTSTRAP), base_url="http://testserver/api/v1") as client:
        yield client


@pytest.fixture
def holders(api: TestClient, engine: Engine) -> dict[Role, dict[str, str]]:
    """An Authorization header for one token of each role."""
    with Session(engine) as session, session.begin():
        return {
            role: {"Authorization": f"Bearer {tokens.create(session, role.label, role)}"} for role in Role
        }


def assert_problem(response: object, status: int, detail_part: str) -> dict[str, object]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    assert response.headers["content-type"] == PROBLEM  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert body["status"] == status and detail_part in body["detail"] + " ".join(body["errors"])
    return body


def test_the_schema_is_served_and_every_request_needs_a_valid_token(api: TestClient, holders: dict) -> None:
    schema = api.get("/openapi.json").json()
    assert {"/me", "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/cancel", "/tokens"} <= schema["paths"].keys()

    missing = api.get("/me")
    assert_problem(missing, 401, "Authorization: Bearer")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert_problem(api.get("/me", headers={"Authorization": "Bearer cai_wrong"}), 401, "unknown or revoked")
    assert api.get("/me", headers=holders[Role.VIEWER]).json() == {"name": "viewer", "role": "viewer"}
    assert api.get("/me", headers={"Authorization": f"Bearer {BOOTSTRAP}"}).json()["role"] == "admin"
    assert "set-cookie" not in missing.headers  # no browser session on the API


def test_each_role_boundary_is_a_403_one_level_below(api: TestClient, holders: dict, engine: Engine) -> None:
    job = {"kind": "calibrate", "settings": {"constitution": "demo@1"}}
    before = table_counts(engine)
    assert_problem(
        api.post("/jobs", json=job, headers=holders[Role.ANNOTATOR]), 403, "needs the operator role"
    )
    assert_problem(api.get("/tokens", headers=holders[Role.OPERATOR]), 403, "needs the admin role")
    assert table_counts(engine) == before
    assert api.get("/jobs", headers=holders[Role.VIEWER]).status_code == 200
    assert api.get("/tokens", headers=holders[Role.ADMIN]).status_code == 200


def test_jobs_are_submitted_by_their_actor_paged_in_sql_and_cancelled(
    api: TestClient, holders: dict, engine: Engine
) -> None:
    operator = holders[Role.OPERATOR]
    before = table_counts(engine)
    bad = api.post("/jobs", json={"kind": "calibrate", "settings": {"bogus": 1}}, headers=operator)
    body = assert_problem(bad, 422, "settings.bogus")
    assert any(line.startswith("settings.constitution") for line in body["errors"])
    as_json = {**operator, "Content-Type": "application/json"}
    assert_problem(api.post("/jobs", content=b"{not json", headers=as_json), 400, "JSON")
    assert_problem(api.post("/jobs", content=b"[1, 2]", headers=as_json), 400, "body")
    assert table_counts(engine) == before  # a refused request writes nothing

    ids = []
    for _ in range(5):
        made = api.post(
            "/jobs", json={"kind": "calibrate", "settings": {"constitution": "demo@1"}}, headers=operator
        )
        assert made.status_code == 201, made.text
        assert made.json()["requested_by"] == "operator" and made.json()["status"] == "queued"
        ids.append(made.json()["id"])

    seen, cursor = [], None
    while True:
        page = api.get(
            "/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=operator
        ).json()
        seen += [job["id"] for job in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]

    cancelled = api.post(f"/jobs/{ids[0]}/cancel", headers=operator)
    assert cancelled.json()["status"] == "cancelled"
    assert_problem(api.post(f"/jobs/{ids[0]}/cancel", headers=operator), 409, "cancelled already")
    assert_problem(api.get("/jobs/999999", headers=operator), 404, "job 999999 does not exist")


def test_admins_create_and_revoke_tokens_and_a_revoked_token_gets_401(api: TestClient, holders: dict) -> None:
    admin = holders[Role.ADMIN]
    created = api.post("/tokens", json={"name": "carol", "role": "annotator"}, headers=admin)
    assert created.status_code == 201
    carol = {"Authorization": f"Bearer {created.json()['token']}"}
    assert api.get("/me", headers=carol).json() == {"name": "carol", "role": "annotator"}
    listed = api.get("/tokens", headers=admin)
    assert created.json()["token"] not in listed.text
    assert [t["created_by"] for t in listed.json() if t["name"] == "carol"] == ["admin"]

    assert_problem(
        api.post("/tokens", json={"name": "carol", "role": "viewer"}, headers=admin), 409, "exists already"
    )
    assert_problem(api.post("/tokens", json={"name": "dave", "role": "root"}, headers=admin), 422, "role")
    assert api.delete("/tokens/carol", headers=admin).status_code == 204
    assert_problem(api.get("/me", headers=carol), 401, "unknown or revoked")
    assert_problem(api.delete("/tokens/carol", headers=admin), 404, "revoked already")


def test_failed_authentication_is_throttled(api: TestClient, holders: dict) -> None:
    for _ in range(20):
        assert api.get("/me", headers={"Authorization": "Bearer cai_guess"}).status_code == 401
    refused = api.get("/me", headers=holders[Role.VIEWER])
    assert_problem(refused, 429, "too many failed attempts")
    assert int(refused.headers["retry-after"]) > 0


def test_an_operator_registers_a_constitution_and_starts_a_round_over_imported_prompts(
    api: TestClient, holders: dict, engine: Engine, cli: Cli
) -> None:
    operator, viewer = holders[Role.OPERATOR], holders[Role.VIEWER]
    yaml_text = (REPO / "constitutions" / "concise-safe" / "v1.yaml").read_bytes()
    as_yaml = {**operator, "Content-Type": "application/yaml"}

    broken = yaml_text.replace(b"version: 1", b"version: one")
    before = table_counts(engine)
    refused = api.post("/constitutions", content=broken, params={"filename": "mine.yaml"}, headers=as_yaml)
    assert any(
        line.startswith("mine.yaml:4: version") for line in assert_problem(refused, 422, "version")["errors"]
    )
    assert_problem(
        api.post("/constitutions", content=yaml_text, headers={**viewer, "Content-Type": "application/yaml"}),
        403,
        "operator",
    )
    assert table_counts(engine) == before

    checked = api.post("/constitutions/validate", content=yaml_text, headers=as_yaml)
    assert checked.json()["ref"] == "concise-safe@1" and table_counts(engine) == before
    made = api.post("/constitutions", content=yaml_text, headers=as_yaml)
    assert made.status_code == 201 and made.json()["created"] is True
    again = api.post("/constitutions", content=yaml_text, headers=as_yaml)
    assert again.json()["created"] is False
    changed = yaml_text.replace(b"Short, direct answers", b"Brief answers")
    assert_problem(api.post("/constitutions", content=changed, headers=as_yaml), 409, "bump the version")

    listed = api.get("/constitutions", headers=viewer).json()
    assert [c["ref"] for c in listed] == ["concise-safe@1"]
    detail = api.get("/constitutions/concise-safe/1", headers=viewer).json()
    assert detail["source_text"] == yaml_text.decode() and detail["body"]["name"] == "concise-safe"
    assert_problem(api.get("/constitutions/concise-safe/7", headers=viewer), 404, "not found")

    no_prompts = api.post("/rounds", json={"constitution": "concise-safe@1"}, headers=operator)
    assert_problem(no_prompts, 422, "no train prompts")
    cli("prompts", "import", REPO / "prompt_sets" / "helpful-harmless.jsonl")
    started = [
        api.post("/rounds", json={"constitution": "concise-safe@1"}, headers=operator) for _ in range(3)
    ]
    assert [r.status_code for r in started] == [201] * 3
    ids = [r.json()["id"] for r in started]

    first = api.get("/rounds", params={"limit": 2}, headers=viewer).json()
    rest = api.get("/rounds", params={"limit": 2, "cursor": first["next_cursor"]}, headers=viewer).json()
    assert [r["id"] for r in first["items"] + rest["items"]] == ids and rest["next_cursor"] is None
    shown = api.get(f"/rounds/{ids[0]}", headers=viewer).json()
    assert shown["status"] == "created" and shown["counts"]["prompts"] > 0 and shown["counts"]["pairs"] == 0


def test_annotators_override_and_review_pairs_under_their_own_name(
    api: TestClient, holders: dict, engine: Engine, world: World
) -> None:
    ids, viewer, annotator = world.ids, holders[Role.VIEWER], holders[Role.ANNOTATOR]
    first = api.get("/pairs", params={"round_id": world.round_id, "limit": 3}, headers=viewer).json()
    rest = api.get(
        "/pairs", params={"round_id": world.round_id, "cursor": first["next_cursor"]}, headers=viewer
    ).json()
    assert first["total"] == 5 and rest["next_cursor"] is None
    assert [p["pair_id"] for p in first["items"] + rest["items"]] == sorted(
        ids[n] for n in ("clear", "b", "flip", "tie", "failed")
    )
    ties = api.get("/pairs", params={"ties": True, "round_id": world.round_id}, headers=viewer).json()
    assert {p["pair_id"] for p in ties["items"]} == {ids["flip"], ids["tie"]}

    before = table_counts(engine)
    refused = api.post(f"/pairs/{ids['clear']}/override", json={"prefer": "B", "note": "x"}, headers=viewer)
    assert_problem(refused, 403, "needs the annotator role")
    no_note = api.post(f"/pairs/{ids['clear']}/override", json={"prefer": "B"}, headers=annotator)
    assert_problem(no_note, 422, "body.note")
    assert table_counts(engine) == before

    done = api.post(
        f"/pairs/{ids['clear']}/override", json={"prefer": "B", "note": "A errs"}, headers=annotator
    )
    assert done.status_code == 201 and done.json()["author"] == "annotator"
    reviewed = api.post(f"/pairs/{ids['b']}/review", json={}, headers=annotator).json()
    assert (reviewed["action"], reviewed["author"], reviewed["verdict"]) == ("review", "annotator", "B")
    detail = api.get(f"/pairs/{ids['clear']}", headers=viewer).json()
    assert [(a["author"], a["verdict"]) for a in detail["audits"]] == [("annotator", "B")]
    assert_problem(api.get("/pairs/999999", headers=viewer), 404, "pair 999999 not found")


def test_the_reference_page_lists_every_operation_without_a_script(api: TestClient) -> None:
    schema = api.get("/openapi.json").json()
    page = api.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script" not in page.text
    expected = {(m.upper(), path) for path, item in schema["paths"].items() for m in item}
    shown = set(
        re.findall(r"<td><code>(GET|POST|PUT|PATCH|DELETE)</code></td><td><code>([^<]+)</code>", page.text)
    )
    assert shown == expected and len(shown) > 30
