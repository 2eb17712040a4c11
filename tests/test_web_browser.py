"""The web UI in a real browser: `cai web` runs as its own process on a free loopback port and
headless Chromium (Debian's package, driven by Playwright) browses, filters, opens a pair, logs
in, overrides the judge, and the next export follows the override. Hostile HTML in a response
is shown as text and never runs, with the Content-Security-Policy on and with it bypassed."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from cai.store.db import session_scope
from tests.cai_process import running_cai
from tests.conftest import Cli
from tests.test_audit import RoundBuilder, exported
from tests.test_web import TOKEN, Site, build_site

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(
        "no Chromium at /usr/bin/chromium: install Debian's package (apt-get install -y chromium)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="the dev extra installs playwright")

PWN_SCRIPT = '<script>window.pwned = 1; document.title = "pwned"</script>'
PWN_IMG = '<img src="x" onerror="window.pwned = 2; document.title = &quot;pwned&quot;">'


@pytest.fixture
def server(db_url: str, cli: Cli, engine: Engine, tmp_path: Path) -> Iterator[tuple[str, Site, int]]:
    """`cai web` in a child process over a database with the test_web pairs plus one whose
    responses try to run script; yields the base URL, the pairs and that pair's id."""
    site = build_site(cli, engine, tmp_path)
    with session_scope(engine) as session:
        pwn = RoundBuilder(session, site.round_id).pair(texts=(f"GOOD {PWN_SCRIPT}", f"plain {PWN_IMG}"))
    with running_cai(db_url, "web", tmp_path / "server.log", {"CAI_WEB_TOKEN": TOKEN}) as base:
        yield base, site, pwn


@pytest.fixture
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def test_browse_filter_override_and_export(
    server: tuple[str, Site, int], browser: Any, cli: Cli, tmp_path: Path
) -> None:
    base, site, _ = server
    tie = site.ids["tie"]
    before = exported(cli, site.round_id, tmp_path / "before")
    assert tie not in before  # a tie is no training pair until someone decides it

    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

    page.goto(base + "/")
    assert page.locator("h1").inner_text() == "Rounds"
    assert page.locator("#rounds tbody tr").count() == 2
    plot = page.locator('img[src="/plots/principles.png"]')
    plot.wait_for()
    assert page.evaluate("img => img.complete && img.naturalWidth > 0", plot.element_handle())

    page.get_by_role("link", name="Pairs", exact=True).click()
    page.wait_for_url(base + "/pairs")
    assert page.locator("#pairs tbody tr").count() == 8  # the test_web pairs plus the script one

    page.select_option('select[name="round"]', str(site.round_id))
    page.select_option('select[name="principle"]', "honest-claims")
    page.check('input[name="ties"]')
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**/pairs?*principle=honest-claims*")
    rows = page.locator("#pairs tbody tr")
    assert rows.count() == 2
    assert {int(t) for t in rows.locator("td:first-child a").all_inner_texts()} == {
        site.ids["flip"],
        tie,
    }
    assert page.locator('input[name="ties"]').is_checked()  # the form remembers the filter

    page.locator(f'#pairs a[href="/pairs/{tie}"]').click()
    page.wait_for_url(f"{base}/pairs/{tie}")
    assert page.locator("#response-a").is_visible() and page.locator("#response-b").is_visible()
    assert page.locator("tr.rationale pre.text").first.inner_text() == "Both are equally VAGUE."
    assert "Verdict tie" in page.locator("#verdict").inner_text()

    page.locator("#login-needed a").click()
    page.wait_for_url("**/login?next=*")
    page.fill('input[name="token"]', TOKEN)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{base}/pairs/{tie}")  # back where the login started

    form = page.locator("#override-form")
    form.get_by_label("Response A").check()
    form.get_by_label("Note (why)").fill("A answers the question; B only hedges")
    form.get_by_label("Author").fill("ana")
    form.get_by_role("button", name="Save override").click()
    page.wait_for_url(f"{base}/pairs/{tie}?done=override*")
    assert "Override saved" in page.locator("#done").inner_text()
    verdict = page.locator("#verdict").inner_text()
    assert "Verdict A" in verdict and "human override" in verdict and "the judge said tie" in verdict
    assert "A answers the question; B only hedges" in page.locator(".audit").inner_text()
    assert dialogs == []

    after = exported(cli, site.round_id, tmp_path / "after")
    assert after[tie]["label_source"] == "human"
    assert after[tie]["chosen"][0]["content"].startswith("GOOD")  # response A, as overridden
    assert after[tie]["rejected"][0]["content"].startswith("plain")
    page.close()


@pytest.mark.parametrize("bypass_csp", [False, True], ids=["csp", "escaping-alone"])
def test_injected_script_is_shown_and_never_runs(
    server: tuple[str, Site, int], browser: Any, bypass_csp: bool
) -> None:
    base, site, pwn = server
    context = browser.new_context(bypass_csp=bypass_csp)
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    for path in (f"/pairs/{pwn}", f"/pairs/{site.ids['xss']}", "/pairs?search=pwned"):
        page.goto(base + path)
        page.wait_for_load_state("load")
        assert page.evaluate("window.pwned") is None, path
        assert page.title() != "pwned", path
    page.goto(f"{base}/pairs/{pwn}")
    assert page.locator("#response-a pre").inner_text() == f"GOOD {PWN_SCRIPT}"
    assert page.locator("#response-b pre").inner_text() == f"plain {PWN_IMG}"
    assert page.locator("#response-a script, #response-b img").count() == 0  # text, not elements
    assert dialogs == []
    context.close()
