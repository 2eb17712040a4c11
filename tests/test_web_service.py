"""The web UI as the service's front end, through TestClient over a real database: logging in with
named tokens (roles, revocation), an operator starting a round and queueing and cancelling a job,
and annotators working through overlapping queues with the agreement on the stats page."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from cai.auth import Role
from cai.store import tokens
from cai.store.models import ActionRow, AuditRow, JobRow, RoundRow
from cai.web.app import create_app
from tests.conftest import table_counts
from tests.test_web import Site, csrf_of, problems, site

__all__ = ["site"]


@pytest.fixture
def named(engine: Engine, site: Site) -> dict[str, str]:
    """Plaintext tokens: one per role, and a second annotator."""
    with Session(engine) as session, session.begin():
        made = {role.label: tokens.create(session, role.label, role) for role in Role}
        made["ana"] = tokens.create(session, "ana", Role.ANNOTATOR)
        made["bo"] = tokens.create(session, "bo", Role.ANNOTATOR)
    return made


@pytest.fixture
def browser(db_url: str, named: dict[str, str]) -> Iterator[TestClient]:
    """A browser of a server started without CAI_WEB_TOKEN: only named tokens log in."""
    with TestClient(create_app(db_url)) as client:
        yield client


def log_in_as(client: TestClient, token: str) -> None:
    client.cookies.clear()
    form = client.get("/login")
    done = client.post("/login", data={"token": token, "csrf": csrf_of(form.text)}, follow_redirects=False)
    assert done.status_code == 303, done.text


def test_named_tokens_log_in_show_who_and_a_revoked_one_is_logged_out(
    browser: TestClient, named: dict[str, str], engine: Engine
) -> None:
    assert "read-only" not in browser.get("/").text  # tokens exist: logging in is possible
    log_in_as(browser, named["viewer"])
    page = browser.get("/").text
    assert 'id="actor">viewer · viewer<' in page and "can write" not in page
    log_in_as(browser, named["ana"])
    assert "ana · annotator · can write" in browser.get("/").text
    with Session(engine) as session, session.begin():
        tokens.revoke(session, "ana")
    assert "Log in" in browser.get("/").text and "ana ·" not in browser.get("/").text


def test_an_operator_starts_a_round_queues_a_job_and_cancels_it(
    browser: TestClient, named: dict[str, str], engine: Engine, site: Site
) -> None:
    log_in_as(browser, named["annotator"])
    form = browser.get("/rounds/new").text
    assert 'id="role-needed"' in form
    before = table_counts(engine)
    refused = browser.post("/rounds", data={"constitution": "helpful-harmless@1", "csrf": csrf_of(form)})
    assert refused.status_code == 403 and "operator role" in refused.text
    assert table_counts(engine) == before

    log_in_as(browser, named["operator"])
    form = browser.get("/rounds/new").text
    unknown = browser.post(
        "/rounds", data={"constitution": "nope@1", "policy": "fake/policy", "csrf": csrf_of(form)}
    )
    assert unknown.status_code == 400 and "nope" in problems(unknown.text)
    assert table_counts(engine) == before
    started = browser.post(
        "/rounds",
        data={
            "constitution": "helpful-harmless@2",
            "policy": "fake/policy",
            "seed": "3",
            "csrf": csrf_of(form),
        },
        follow_redirects=False,
    )
    assert started.status_code == 303
    round_id = int(re.search(r"/rounds/(\d+)", started.headers["location"]).group(1))
    with Session(engine) as session:
        assert session.get_one(RoundRow, round_id).config["seed"] == 3

    page = browser.get(f"/rounds/{round_id}").text
    assert 'id="job-form"' in page
    bad = browser.post(
        f"/rounds/{round_id}/jobs",
        data={"kind": "loop", "prompts": "0", "settings": "{", "csrf": csrf_of(page)},
    )
    assert bad.status_code == 400 and "prompts: at least 1" in problems(bad.text)
    bad = browser.post(
        f"/rounds/{round_id}/jobs",
        data={"kind": "loop", "settings": '{"loop": {"judge": {"concurrency": 0}}}', "csrf": csrf_of(page)},
    )
    assert bad.status_code == 400 and "concurrency" in problems(bad.text)
    queued = browser.post(
        f"/rounds/{round_id}/jobs",
        data={"kind": "loop", "prompts": "3", "samples": "2", "csrf": csrf_of(page)},
        follow_redirects=False,
    )
    assert queued.status_code == 303
    job_id = int(queued.headers["location"].rsplit("/", 1)[1])
    with Session(engine) as session:
        job = session.get_one(JobRow, job_id)
        assert (job.kind, job.round_id, job.requested_by) == ("loop", round_id, "operator")
        assert job.settings["rounds"] == 1 and job.settings["loop"]["generate"]["limit"] == 3

    shown = browser.get(f"/jobs/{job_id}").text
    assert 'http-equiv="refresh"' in shown and 'id="job-status">queued<' in shown
    assert f'href="/jobs/{job_id}"' in browser.get("/jobs").text
    cancelled = browser.post(f"/jobs/{job_id}/cancel", data={"csrf": csrf_of(shown)}, follow_redirects=True)
    assert 'id="job-status">cancelled<' in cancelled.text and 'http-equiv="refresh"' not in cancelled.text
    with Session(engine) as session:
        verbs = [(a.actor, a.verb) for a in session.scalars(select(ActionRow).order_by(ActionRow.id))]
    assert verbs == [("operator", "round.create"), ("operator", "job.submit"), ("operator", "job.cancel")]


def test_two_annotators_work_through_overlapping_queues_and_the_stats_page_shows_alpha(
    browser: TestClient, named: dict[str, str], engine: Engine, site: Site
) -> None:
    log_in_as(browser, named["operator"])
    page = browser.get(f"/rounds/{site.round_id}").text
    assigned = browser.post(
        f"/rounds/{site.round_id}/queues",
        data={"annotators": "ana, bo", "per_annotator": "3", "overlap": "0.67", "csrf": csrf_of(page)},
        follow_redirects=False,
    )
    assert assigned.status_code == 303
    assert 'id="humans"' not in browser.get(f"/stats?round={site.round_id}").text

    decided: dict[str, list[int]] = {}
    for name, verdict in (("ana", "A"), ("bo", "B")):
        log_in_as(browser, named[name])
        decided[name] = []
        while True:
            queue = browser.get("/queue").text
            if 'id="queue-done"' in queue:
                break
            pair_id = int(re.search(r"<h2>Pair <a href=\"/pairs/(\d+)\">", queue).group(1))
            assert "Author" not in queue  # a named token decides as itself
            done = browser.post(
                f"/pairs/{pair_id}/override",
                data={
                    "prefer": verdict,
                    "note": f"{name} says {verdict}",
                    "next": f"/queue?round={site.round_id}",
                    "csrf": csrf_of(queue),
                },
                follow_redirects=False,
            )
            assert done.status_code == 303 and done.headers["location"] == f"/queue?round={site.round_id}"
            decided[name].append(pair_id)
        assert len(decided[name]) == 3
    shared = set(decided["ana"]) & set(decided["bo"])
    assert len(shared) == 2

    with Session(engine) as session:
        authors = {(a.pair_id, a.author) for a in session.scalars(select(AuditRow))}
    assert {(p, n) for n, ids in decided.items() for p in ids} == authors
    stats = browser.get(f"/stats?round={site.round_id}").text
    row = re.search(r'<table class="compact" id="humans">.*?</table>', stats, re.S).group(0)
    cells = re.findall(r'<td class="n">([^<]*)</td>', row)
    assert cells == ["2", "2", "-0.50"]  # A against B on both shared pairs: 1 - 3 * 4 / 8
