"""The web UI through FastAPI's TestClient over a real database: every page renders, the pair
browser filters and pages like `cai audit list`, unknown ids are 404 pages, writes need the
token, a login and a CSRF token (and change nothing when refused), user text is escaped, and an
override made in the UI is what the next export uses."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from cai.store.db import session_scope
from cai.store.models import AuditRow, LabelRow
from cai.web.app import create_app
from tests.conftest import REPO, Cli, table_counts
from tests.test_audit import RoundBuilder, exported, new_round

TOKEN = "correct-horse-battery-staple"
SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(2)>"
HH = REPO / "constitutions/helpful-harmless/v1.yaml"


@dataclass
class Site:
    round_id: int
    other_round: int
    ids: dict[str, int]


@pytest.fixture
def site(cli: Cli, engine: Engine, tmp_path: Path) -> Site:
    return build_site(cli, engine, tmp_path)


def build_site(cli: Cli, engine: Engine, tmp_path: Path) -> Site:
    """Two rounds of pairs with known flags (as in test_audit), one pair whose responses and
    rationale are hostile HTML, and two constitution versions to diff."""
    cli("constitution", "register", HH)
    v2 = tmp_path / "helpful-harmless" / "v2.yaml"
    v2.parent.mkdir()
    v2.write_text(
        HH.read_text()
        .replace("version: 1", "version: 2")
        .replace(
            "  - id: transparent-limits", "  - id: admits-ai\n    critique: x\n  - id: transparent-limits"
        )
    )
    cli("constitution", "register", v2)
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    round_id, other_round = new_round(cli), new_round(cli)
    with session_scope(engine) as session:
        build = RoundBuilder(session, round_id)
        ids = {
            "clear": build.pair(confidence=0.9),
            "b": build.pair(
                verdicts=("B", "B"), confidence=0.6, texts=("plain one", "GOOD with a Needle in it")
            ),
            "flip": build.pair("honest-claims", ("A", "B"), confidence=0.8),
            "tie": build.pair("honest-claims", ("tie", "tie"), 0.5, rationale="Both are equally VAGUE."),
            "failed": build.pair("real-harm", failed=True),
            "eval": build.pair(kind="eval"),
            "xss": build.pair(texts=(f"GOOD {SCRIPT}", f"plain {IMG}"), rationale=f"A wins {SCRIPT}"),
        }
        ids["other"] = RoundBuilder(session, other_round).pair()
    return Site(round_id, other_round, ids)


@pytest.fixture
def reader(db_url: str, site: Site) -> Iterator[TestClient]:
    """A client of a server started without a token: read-only."""
    with TestClient(create_app(db_url)) as client:
        yield client


@pytest.fixture
def writer(db_url: str, site: Site) -> Iterator[TestClient]:
    """A client of a server with a token, not logged in yet."""
    with TestClient(create_app(db_url, TOKEN)) as client:
        yield client


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


def log_in(client: TestClient, next_path: str = "/") -> None:
    form = client.get("/login")
    done = client.post(
        "/login",
        data={"token": TOKEN, "csrf": csrf_of(form.text), "next": next_path},
        follow_redirects=False,
    )
    assert done.status_code == 303 and done.headers["location"] == next_path


def pair_ids(html: str) -> set[int]:
    return {int(i) for i in re.findall(r'<td><a href="/pairs/(\d+)">', html)}


def problems(html: str) -> str:
    found = re.search(r'<ul class="problems" id="problems">(.*?)</ul>', html, re.S)
    assert found, "no problems listed on the page"
    return found.group(1)


# --- pages -------------------------------------------------------------------------------------


def test_every_page_renders(reader: TestClient, site: Site) -> None:
    r, xss = site.round_id, site.ids["xss"]
    pages = {
        "/": ["Rounds", f'href="/rounds/{r}"', "/plots/principles.png"],
        f"/rounds/{r}": [
            f"Round {r}",
            "helpful-harmless@1",
            "honest-claims",
            f"/plots/principles.png?round={r}",
        ],
        "/pairs": ["Pairs", f'href="/pairs/{xss}"'],
        f"/pairs/{xss}": ["Response A", "Response B", "fake-judge", "raw output"],
        "/stats": ["Judge stats", "honest-claims", "all principles"],
        f"/stats?round={r}": [f"round {r}", "real-harm"],
        "/constitutions": ["helpful-harmless@1", "helpful-harmless@2", 'action="/constitutions/diff"'],
        "/constitutions/helpful-harmless/1": ["helpful-harmless@1", "transparent-limits"],
        "/constitutions/diff?old=helpful-harmless@1&new=helpful-harmless@2": ["admits-ai", "+  critique: x"],
        "/login": ["read-only"],
    }
    for path, expected in pages.items():
        page = reader.get(path)
        assert page.status_code == 200, (path, page.text)
        assert page.headers["content-type"].startswith("text/html")
        for text in expected:
            assert text in page.text, (path, text)


def test_dashboard_plots_are_the_reports_pngs(reader: TestClient, site: Site) -> None:
    dashboard = reader.get("/").text
    shown = re.findall(r'<img src="/plots/([a-z_]+\.png)"', dashboard)
    assert "principles.png" in shown and "response_length.png" in shown
    for name in shown:
        png = reader.get(f"/plots/{name}")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert "No training yet." in dashboard  # a plot without data says so instead of a broken image
    assert reader.get("/plots/training.png").status_code == 404
    assert reader.get(f"/plots/principles.png?round={site.round_id}").status_code == 200


def test_pair_page_shows_both_sides_and_every_rationale(reader: TestClient, site: Site) -> None:
    page = reader.get(f"/pairs/{site.ids['tie']}").text
    assert page.count("Both are equally VAGUE.") == 2  # both orders' rationales
    assert page.count('class="judgment"') == 2
    assert 'id="response-a"' in page and 'id="response-b"' in page
    failed = reader.get(f"/pairs/{site.ids['failed']}").text
    assert "no JSON object in the output" in failed and "parse" in failed and "No label yet" in failed


# --- the pair browser ----------------------------------------------------------------------------


def test_filters_match_the_audit_list(reader: TestClient, site: Site) -> None:
    ids, r = site.ids, site.round_id

    def listed(**params: object) -> set[int]:
        page = reader.get("/pairs", params={k: str(v) for k, v in params.items()})
        assert page.status_code == 200, page.text
        return pair_ids(page.text)

    def named(*names: str) -> set[int]:
        return {ids[n] for n in names}

    assert listed() == named("clear", "b", "flip", "tie", "failed", "xss", "other")  # no eval pairs
    assert listed(round=r) == named("clear", "b", "flip", "tie", "failed", "xss")
    assert listed(inconsistent=1) == named("flip")
    assert listed(ties="on", round=r) == named("flip", "tie")
    assert listed(failed=1) == named("failed")
    assert listed(max_confidence=0.6) == named("b", "tie")
    assert listed(principle="honest-claims") == named("flip", "tie")
    assert listed(search="needle") == named("b")  # in a response, any case
    assert listed(search="vague") == named("tie")  # in a rationale
    assert listed(kind="eval") == named("eval")
    assert listed(ties=1, principle="actually-helpful") == set()
    assert listed(round="", principle="", search="") == listed()  # an empty form field is no filter
    page = reader.get("/pairs", params={"round": r, "principle": "honest-claims"}).text
    assert f'<option value="{r}" selected>' in page and '<option value="honest-claims" selected>' in page


def test_pagination(reader: TestClient, site: Site) -> None:
    everything = sorted(pair_ids(reader.get("/pairs").text))
    seen = []
    url = "/pairs?per=3&ties=0"
    for expected_page in (1, 2, 3):
        page = reader.get(url).text
        assert f"page {expected_page} of 3" in page
        seen += sorted(pair_ids(page))
        nxt = re.search(r'<a href="([^"]+)" rel="next">', page)
        if expected_page < 3:
            assert nxt
            url = nxt.group(1).replace("&amp;", "&")
            assert "per=3" in url and "ties=0" in url  # the filters travel with the page
        else:
            assert nxt is None and 'rel="prev"' in page
    assert seen == everything and len(seen) == 7
    assert "Pairs 7\u20137 of 7" in reader.get("/pairs?per=3&page=3").text
    gone = reader.get("/pairs?per=3&page=4")
    assert gone.status_code == 404 and "past the last page (3)" in gone.text


def test_bad_filters_are_400_with_the_problem(reader: TestClient, site: Site) -> None:
    for params, message in [
        ({"principle": "no-such-thing"}, "no principle &#39;no-such-thing&#39;"),
        ({"kind": "training"}, "kind: expected one of"),
        ({"max_confidence": "2"}, "max confidence"),
        ({"max_confidence": "nan"}, "max confidence"),
        ({"max_confidence": "lots"}, "max confidence"),
        ({"inconsistent": "maybe"}, "inconsistent: expected 1 or 0"),
        ({"round": "abc"}, "round: expected a round id"),
        ({"page": "0"}, "page: expected a positive whole number"),
        ({"per": "100000"}, "per: at most 500"),
    ]:
        page = reader.get("/pairs", params=params)
        assert page.status_code == 400, params
        assert message in problems(page.text), params
        assert 'id="filters"' in page.text  # the form is still there to fix the query


def test_unknown_ids_are_404_pages(reader: TestClient, site: Site) -> None:
    for path, message in [
        ("/pairs/99999", "pair 99999 not found"),
        ("/rounds/99999", "round 99999 not found"),
        ("/pairs?round=99999", "round 99999 not found"),
        ("/stats?round=99999", "round 99999 not found"),
        ("/plots/nothing.png", "no plot"),
        ("/constitutions/helpful-harmless/9", "not found"),
        ("/constitutions/diff?old=helpful-harmless@1&new=nope@1", "not found"),
        ("/no/such/page", "There is no page at /no/such/page"),
    ]:
        page = reader.get(path)
        assert page.status_code == 404, path
        assert page.headers["content-type"].startswith("text/html")
        assert message in problems(page.text), path
    for path in (
        "/pairs/abc",
        "/rounds/1x",
        "/stats?round=abc",
        "/constitutions/diff?old=Not%20A%20Ref&new=x",
    ):
        assert reader.get(path).status_code == 400, path


# --- escaping ----------------------------------------------------------------------------------


def test_user_text_is_escaped_everywhere(writer: TestClient, engine: Engine, site: Site) -> None:
    xss = site.ids["xss"]
    log_in(writer)
    page = writer.get(f"/pairs/{xss}").text
    writer.post(
        f"/pairs/{xss}/override",
        data={"prefer": "B", "note": f"note {SCRIPT}", "author": IMG, "csrf": csrf_of(page)},
    )
    shown = writer.get(f"/pairs/{xss}").text
    for raw in (SCRIPT, IMG, "<script", "<img"):
        assert raw not in shown
    assert "GOOD &lt;script&gt;alert(1)&lt;/script&gt;" in shown  # response A
    assert "plain &lt;img src=x onerror=alert(2)&gt;" in shown  # response B
    assert "A wins &lt;script&gt;" in shown  # the judge's rationale
    assert "note &lt;script&gt;" in shown and '<span class="author">&lt;img src=x' in shown
    # Query values shown back in forms and error messages are escaped too.
    echoed = writer.get("/pairs", params={"search": f'"><b>{SCRIPT}', "principle": SCRIPT}).text
    assert SCRIPT not in echoed and "<b>" not in echoed and "&#34;&gt;&lt;b&gt;" in echoed
    assert "script-src" not in writer.get("/").headers["content-security-policy"]  # no script at all
    assert "default-src 'none'" in writer.get("/").headers["content-security-policy"]


# --- writes ------------------------------------------------------------------------------------


def test_read_only_without_a_token(reader: TestClient, engine: Engine, site: Site) -> None:
    page = reader.get(f"/pairs/{site.ids['clear']}").text
    assert 'id="read-only"' in page and "<form" not in page.split("<main>")[1]
    before = table_counts(engine)
    csrf = "x"  # a read-only page offers no forms, so no CSRF token either
    for path, data in [
        (f"/pairs/{site.ids['clear']}/override", {"prefer": "B", "note": "n", "author": "a", "csrf": csrf}),
        (f"/pairs/{site.ids['clear']}/review", {"author": "a", "csrf": csrf}),
        ("/login", {"token": "", "csrf": csrf}),
    ]:
        refused = reader.post(path, data=data)
        assert refused.status_code == 403, path
        assert "read-only" in problems(refused.text)
    assert table_counts(engine) == before


def test_writes_need_a_login_and_a_matching_csrf_token(
    writer: TestClient, engine: Engine, site: Site, db_url: str
) -> None:
    clear = site.ids["clear"]
    override = f"/pairs/{clear}/override"
    fields = {"prefer": "B", "note": "B is better", "author": "ana"}
    page = writer.get(f"/pairs/{clear}").text
    assert 'id="login-needed"' in page and 'id="override-form"' not in page
    csrf = csrf_of(writer.get("/login").text)
    before = table_counts(engine)

    refused = writer.post(override, data={**fields, "csrf": csrf})
    assert refused.status_code == 403 and "Log in" in problems(refused.text)
    assert f'href="/login?next=%2Fpairs%2F{clear}"' in refused.text  # back to the pair, not the POST

    wrong = writer.post("/login", data={"token": TOKEN + "x", "csrf": csrf})
    assert wrong.status_code == 403 and "unknown or revoked" in problems(wrong.text)
    no_csrf = writer.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert no_csrf.status_code == 403 and "security token" in problems(no_csrf.text)
    assert "cai_auth" not in writer.cookies

    log_in(writer, f"/pairs/{clear}")
    for data in (fields, {**fields, "csrf": ""}, {**fields, "csrf": csrf}):  # csrf: the pre-login one
        refused = writer.post(override, data=data)
        assert refused.status_code == 403 and "security token" in problems(refused.text)
    # Another browser's session and token do not fit this browser's cookie either.
    with TestClient(create_app(db_url, TOKEN)) as other:
        foreign = csrf_of(other.get("/login").text)
    refused = writer.post(override, data={**fields, "csrf": foreign})
    assert refused.status_code == 403
    # Nor does a login from before a restart: the new server signs with a new key.
    with TestClient(create_app(db_url, TOKEN), cookies=dict(writer.cookies)) as restarted:
        page = restarted.get(f"/pairs/{clear}").text
        assert 'id="login-needed"' in page
        stale = restarted.post(override, data={**fields, "csrf": csrf_of(restarted.get("/login").text)})
        assert stale.status_code == 403 and "Log in" in problems(stale.text)
    assert table_counts(engine) == before


def test_bad_override_fields_are_400_and_change_nothing(
    writer: TestClient, engine: Engine, site: Site
) -> None:
    clear, failed = site.ids["clear"], site.ids["failed"]
    log_in(writer)
    csrf = csrf_of(writer.get(f"/pairs/{clear}").text)
    before = table_counts(engine)
    for pair_id, data, messages in [
        (clear, {"prefer": "C", "note": "x", "author": "ana"}, ["prefer: choose A, B or tie"]),
        (clear, {"note": "x", "author": "ana"}, ["prefer"]),
        (clear, {"prefer": "A", "note": "   ", "author": "ana"}, ["note: must not be empty"]),
        (clear, {"prefer": "A", "note": "x", "author": " "}, ["author: must not be empty"]),
        (clear, {"prefer": "A", "note": "x", "author": "a" * 201}, ["author: at most 200"]),
        (clear, {"prefer": "maybe", "note": ""}, ["prefer", "note", "author"]),  # every problem at once
        (failed, {"prefer": "A", "note": "x", "author": "ana"}, [f"pair {failed} has no judge label"]),
    ]:
        page = writer.post(f"/pairs/{pair_id}/override", data={**data, "csrf": csrf})
        assert page.status_code == 400, data
        for message in messages:
            assert message in problems(page.text), (data, message)
        assert f"Pair {pair_id}" in page.text  # the pair page again, with the form
    kept = writer.post(
        f"/pairs/{clear}/override", data={"prefer": "B", "note": "kept note", "author": "", "csrf": csrf}
    )
    assert "kept note" in kept.text and 'value="B" required checked' in kept.text  # nothing retyped
    missing = writer.post(
        "/pairs/99999/override", data={"prefer": "A", "note": "x", "author": "a", "csrf": csrf}
    )
    assert missing.status_code == 404 and "pair 99999 not found" in problems(missing.text)
    review = writer.post(f"/pairs/{failed}/review", data={"author": "ana", "csrf": csrf})
    assert review.status_code == 400 and "no judge label" in problems(review.text)
    assert writer.post(f"/pairs/{clear}/review", data={"csrf": csrf}).status_code == 400
    assert table_counts(engine) == before


def test_an_override_in_the_ui_is_what_export_uses(
    writer: TestClient, engine: Engine, cli: Cli, site: Site, tmp_path: Path
) -> None:
    clear = site.ids["clear"]
    first = exported(cli, site.round_id, tmp_path / "before")
    log_in(writer, f"/pairs/{clear}")
    page = writer.get(f"/pairs/{clear}").text
    assert 'id="override-form"' in page
    done = writer.post(
        f"/pairs/{clear}/override",
        data={"prefer": "b", "note": "A invents a citation", "author": "ana", "csrf": csrf_of(page)},
        follow_redirects=False,
    )
    assert done.status_code == 303 and done.headers["location"] == f"/pairs/{clear}?done=override#audits"
    shown = writer.get(done.headers["location"]).text
    assert "Override saved" in shown and "human override" in shown and "(the judge said A)" in shown
    assert "A invents a citation" in shown and '<span class="author">ana</span>' in shown
    listing = writer.get("/pairs", params={"round": site.round_id}).text
    assert re.search(rf'href="/pairs/{clear}">.*?<strong>B</strong> <span class="tag human">', listing, re.S)

    with session_scope(engine) as session:
        audit = session.scalars(select(AuditRow)).one()
        label = session.get_one(LabelRow, audit.label_id)
        assert (audit.action, audit.author, audit.note) == ("override", "ana", "A invents a citation")
        assert (label.source, label.verdict) == ("human", "B")
    second = exported(cli, site.round_id, tmp_path / "after")
    assert second[clear]["chosen"] == first[clear]["rejected"]
    assert second[clear]["rejected"] == first[clear]["chosen"]
    assert second[clear]["label_source"] == "human"


def test_a_review_counts_toward_agreement(writer: TestClient, engine: Engine, site: Site) -> None:
    b = site.ids["b"]
    log_in(writer)
    page = writer.get(f"/pairs/{b}").text
    done = writer.post(f"/pairs/{b}/review", data={"note": "", "author": "bo", "csrf": csrf_of(page)})
    assert done.status_code == 200 and "Review saved" in done.text and "review</strong> B by" in done.text
    stats = writer.get("/stats", params={"round": site.round_id}).text
    total = re.search(r'<tr class="total">(.*?)</tr>', stats, re.S)
    assert total and re.findall(r'<td class="n">([^<]*)</td>', total.group(1))[-3:] == ["1", "100%", "—"]
    with session_scope(engine) as session:
        audit = session.scalars(select(AuditRow)).one()
        assert (audit.action, audit.label_id, audit.author) == ("review", None, "bo")


def test_session_cookies_and_logout(writer: TestClient, site: Site) -> None:
    first = writer.get("/")
    cookie = first.headers["set-cookie"].lower()
    assert "cai_session=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    assert first.headers["x-frame-options"] == "DENY"
    before = writer.cookies["cai_session"]
    log_in(writer)
    assert writer.cookies["cai_session"] != before  # a new session id on login
    page = writer.get("/").text
    assert "Log out" in page and "can write" in page
    writer.post("/logout", data={"csrf": csrf_of(page)})
    assert "cai_auth" not in writer.cookies
    page = writer.get(f"/pairs/{site.ids['clear']}").text
    assert 'id="login-needed"' in page and "Log in" in page
    assert writer.post("/logout", data={"csrf": "forged"}).status_code == 403


def test_login_only_redirects_within_the_site(writer: TestClient, site: Site) -> None:
    for target, expected in [("https://evil.example/", "/"), ("//evil.example", "/"), ("/stats", "/stats")]:
        writer.cookies.clear()
        csrf = csrf_of(writer.get("/login").text)
        done = writer.post(
            "/login", data={"token": TOKEN, "csrf": csrf, "next": target}, follow_redirects=False
        )
        assert done.headers["location"] == expected, target
