"""The service from a browser: `cai serve` (with its in-process worker) as its own process, and
headless Chromium. An operator starts a round from the browser, runs a one-round loop on the tiny
model against the loopback judge and watches its page until it finishes; then two annotators,
each in their own browser, work through overlapping review queues, and the stats page shows
their agreement."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests import fake_openai as fake
from tests.cai_process import running_cai
from tests.conftest import REPO, Cli
from tests.test_service_e2e import loop_settings
from tests.test_web_browser import CHROMIUM, browser, sync_api
from tests.test_worker import deterministic
from tests.tiny_model import smollm2_tokenizer_dir, tiny_model_dir

__all__ = ["browser", "smollm2_tokenizer_dir", "sync_api", "tiny_model_dir"]
assert CHROMIUM


def log_in(page: Any, base: str, token: str) -> None:
    page.goto(base + "/login")
    page.fill('input[name="token"]', token)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(base + "/")


def test_an_operator_runs_a_round_from_the_browser_and_two_annotators_share_queues(
    db_url: str, cli: Cli, browser: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cli("constitution", "register", REPO / "constitutions/helpful-harmless/v1.yaml")
    cli("prompts", "import", REPO / "prompt_sets/helpful-harmless.jsonl")
    tokens = {
        name: cli("token", "create", "--name", name, "--role", role).stdout.strip()
        for name, role in (("olga", "operator"), ("ana", "annotator"), ("bo", "annotator"))
    }
    with (
        fake.FakeOpenAI(deterministic()) as server,
        running_cai(db_url, "serve", tmp_path / "serve.log", None, "--worker") as base,
    ):
        operator = browser.new_context().new_page()
        log_in(operator, base, tokens["olga"])
        operator.goto(base + "/rounds/new")
        form = operator.locator("#round-form")
        form.get_by_label("Constitution").select_option("helpful-harmless@1")
        form.get_by_label("Policy").fill(str(tiny_model_dir))
        form.get_by_role("button", name="Start the round").click()
        operator.wait_for_url(re.compile(r".*/rounds/\d+\?started=1"))
        round_id = int(re.search(r"/rounds/(\d+)", operator.url).group(1))

        settings = loop_settings(server, tmp_path / "artifacts")
        settings["loop"]["generate"].pop("limit")  # the form's own field sizes the round
        job = operator.locator("#job-form")
        job.get_by_label("Kind").select_option("loop")
        job.get_by_label("Prompts").fill("12")
        job.get_by_label("Samples per prompt").fill("2")
        job.get_by_label("Other settings").fill(json.dumps(settings))
        job.get_by_role("button", name="Queue the job").click()
        operator.wait_for_url(re.compile(r".*/jobs/\d+$"))
        # The page reloads itself while the job runs; no script needed to watch it finish.
        status = operator.locator("#job-status")
        status.filter(has_text=re.compile("succeeded|failed|cancelled")).wait_for(timeout=480_000)
        assert status.inner_text() == "succeeded", operator.locator("#job-log").inner_text()[-2000:]
        operator.goto(f"{base}/rounds/{round_id}")
        assert "Status <strong>done</strong>" in operator.content()

        queues = operator.locator("#queues")
        queues.get_by_label("Annotators").fill("ana, bo")
        queues.get_by_label("Pairs each").fill("4")
        queues.get_by_label("Overlap").fill("0.5")
        queues.get_by_role("button", name="Assign queues").click()
        operator.wait_for_url(re.compile(r".*queues=1.*"))

        decided: dict[str, list[str]] = {}
        for name, prefer in (("ana", "Response A"), ("bo", "Response B")):
            page = browser.new_context().new_page()
            log_in(page, base, tokens[name])
            page.get_by_role("link", name="My queue").click()
            decided[name] = []
            while not page.locator("#queue-done").count():
                pair = page.locator("h2 a").first.inner_text()
                form = page.locator("#override-form")
                form.get_by_label(prefer).check()
                form.get_by_label("Note (why)").fill(f"{name} prefers {prefer}")
                with page.expect_navigation():
                    form.get_by_role("button", name="Save override").click()
                decided[name].append(pair)
            assert "4 of 4 done" in page.locator("#queue-state").inner_text()
            page.context.close()
        assert len(set(decided["ana"]) & set(decided["bo"])) == 2

        operator.goto(f"{base}/stats?round={round_id}")
        cells = operator.locator("#humans td").all_inner_texts()
        assert cells[:2] == ["2", "2"] and cells[2] == "-0.50"  # A against B on both shared pairs
