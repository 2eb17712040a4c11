"""Hostile and careless inputs through the real command line: regexes that backtrack forever,
YAML alias bombs, huge files, oversized prompts, text the database cannot store, files full of
bad rows. Each must end quickly with exit 2, naming the file and line, and change nothing.
Where a regression would hang, the command runs in a subprocess with a timeout, so it fails
instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine, select

from cai.constitution import MAX_CONSTITUTION_BYTES, MAX_PRINCIPLES
from cai.promptsets import MAX_PROMPT_CHARS, MAX_REPORTED
from cai.store.db import session_scope
from cai.store.models import LabelRow, PairRow, ResponseRow
from tests import fake_openai as fake
from tests.conftest import Cli, table_counts

HEADER = "name: hostile\nversion: 1\ndescription: A constitution under attack.\n"
PRINCIPLES = "principles:\n  - id: honest\n    critique: Is anything false?\n"
# Catastrophic for a backtracking engine on a long line of words that does not end in [.!?]:
# Python's re took 0.3 s at 7 words and seven times longer with each further word.
NESTED = r"^(\w+\s?)+[.!?]$"


def run_cai(db_url: str, *args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`cai --db URL ARGS` in a child process that is killed (failing the test) at `timeout`."""
    env = {k: v for k, v in os.environ.items() if k != "CAI_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "cai", "--db", db_url, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def rule(pattern: str, pid: str = "rule", ignore_case: bool = False) -> str:
    flags = "\n      ignore_case: true" if ignore_case else ""
    return (
        f"  - id: {pid}\n    kind: rule\n    critique: Ends on a finished sentence.\n"
        f"    rule:\n      check: must_match\n      pattern: {json.dumps(pattern)}{flags}\n"
    )


# --- rule patterns ----------------------------------------------------------------------------


def long_answers(request: dict[str, Any], draws: Iterator[int]) -> str:
    """Policy answers of 40 words, every other one without final punctuation; the judge says tie."""
    prompt = fake.prompt_text(request)
    if "<<<RESPONSE A " in prompt:
        return json.dumps({"rationale": "Both are the same to me.", "preferred": "tie"})
    draw = next(draws)
    words = " ".join(f"word{draw}x{i}" for i in range(40))
    return words + ("." if draw % 2 else "")


@pytest.fixture
def server() -> Iterator[fake.FakeOpenAI]:
    with fake.FakeOpenAI(fake.with_draws(long_answers)) as running:
        yield running


def test_nested_quantifier_rule_is_checked_in_linear_time(
    cli: Cli, db_url: str, engine: Engine, server: fake.FakeOpenAI, tmp_path: Path
) -> None:
    path = tmp_path / "hostile" / "v1.yaml"
    path.parent.mkdir()
    path.write_text(HEADER + PRINCIPLES + rule(NESTED, "finished"))
    assert "ok" in cli("constitution", "validate", path).stdout  # linear on RE2, so allowed
    cli("constitution", "register", path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {n}."}) + "\n" for n in range(3)))
    cli("prompts", "import", prompts)
    round_id = int(cli("round", "start", "-c", "hostile@1", "--policy", "fake/policy").stdout)
    cli("generate", "-r", round_id, "--samples", 2, "--backend", "openai", "--base-url", server.base_url)

    # The rule runs on every 40-word answer here: a backtracking engine would take years.
    judged = run_cai(
        db_url, "judge", "-r", round_id, "--judge-base-url", server.base_url, "--judge-model", "fake-judge"
    )
    assert judged.returncode == 0, judged.stderr

    with session_scope(engine) as session:
        texts = dict(session.execute(select(ResponseRow.id, ResponseRow.text)).all())
        pairs = {p.id: p for p in session.scalars(select(PairRow))}
        labels = list(session.scalars(select(LabelRow)))
    separated = [
        label
        for label in labels
        if texts[pairs[label.pair_id].response_a_id].endswith(".")
        != texts[pairs[label.pair_id].response_b_id].endswith(".")
    ]
    assert separated, "every pair should have one finished and one unfinished answer"
    for label in separated:
        assert texts[label.chosen_response_id].endswith(".")  # the rule decided, and rightly


@pytest.mark.parametrize(
    ("pattern", "detail"),
    [
        (r"(\w+) \1", r"invalid escape sequence: \1"),
        (r"sure(?= thing)", "invalid perl operator: (?="),
        (r"(?<!not )thanks", "invalid perl operator: (?<!"),
        (r"(?>a+)b", "invalid perl operator: (?>"),
        (r"a++b", "bad repetition operator: ++"),
        (r"done\Z", r"invalid escape sequence: \Z (write \Z as \z)"),
    ],
)
def test_patterns_re2_cannot_run_are_refused(
    cli: Cli, engine: Engine, tmp_path: Path, pattern: str, detail: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(HEADER + PRINCIPLES + rule(pattern, "picky"))
    expected = (
        f"{path}:12: principles[1].rule.pattern: principle 'picky': RE2 cannot run this pattern: {detail}"
    )
    result = cli("constitution", "validate", path, expect=2)
    assert expected in result.stderr, result.stderr
    cli("db", "upgrade")
    before = table_counts(engine)
    assert expected in cli("constitution", "register", path, expect=2).stderr
    assert table_counts(engine) == before


# --- YAML: bombs, cycles, size ----------------------------------------------------------------


def billion_laughs() -> str:
    levels = ['  a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for n in range(1, 9):
        levels.append(f"  a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * 10) + "]")
    return HEADER + "x-shared:\n" + "\n".join(levels) + "\n" + PRINCIPLES + "    revision: *a8\n"


def merge_key_bomb() -> str:
    levels = ["  m0: &m0 {k0: x}"]
    for n in range(1, 40):
        levels.append(f"  m{n}: &m{n} {{<<: [*m{n - 1}, *m{n - 1}], k{n}: x}}")
    return HEADER + "x-shared:\n" + "\n".join(levels) + "\n" + PRINCIPLES


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (billion_laughs(), ":11: YAML aliases here expand the document past 4,194,304 nodes"),
        (merge_key_bomb(), ":23: YAML aliases here expand the document past 4,194,304 nodes"),
        (HEADER + "x-loop: &loop [*loop]\n" + PRINCIPLES, ":4: recursive YAML alias"),
    ],
    ids=["billion-laughs", "merge-keys", "recursive"],
)
def test_yaml_alias_bombs_fail_fast(
    cli: Cli, db_url: str, engine: Engine, tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    assert len(text) < 4000  # a few KB that would expand to gigabytes
    validated = run_cai(db_url, "constitution", "validate", path, timeout=30)
    assert validated.returncode == 2, validated.stderr
    assert f"error: {path}{expected}" in validated.stderr
    cli("db", "upgrade")
    before = table_counts(engine)
    registered = run_cai(db_url, "constitution", "register", path, timeout=30)
    assert registered.returncode == 2, registered.stderr
    assert f"error: {path}{expected}" in registered.stderr
    assert table_counts(engine) == before


def test_shared_text_through_aliases_is_still_fine(cli: Cli, tmp_path: Path) -> None:
    text = (
        HEADER
        + "principles:\n"
        + "".join(
            f"  - id: p{n}\n    critique: Is anything false?\n    revision: {'&fix ' if n == 0 else ''}"
            f"{'Make it true.' if n == 0 else '*fix'}\n"
            for n in range(50)
        )
    )
    path = tmp_path / "hostile" / "v1.yaml"
    path.parent.mkdir()
    path.write_text(text)
    assert "registered: 50 principles" in cli("constitution", "register", path).stdout


def test_oversized_constitution_is_refused_unread(
    cli: Cli, db_url: str, engine: Engine, tmp_path: Path
) -> None:
    path = tmp_path / "huge.yaml"
    filler = "".join(f"  - id: p{n}\n    critique: {'x' * 60}\n" for n in range(20_000))
    path.write_text(HEADER + "principles:\n" + filler)
    assert path.stat().st_size > MAX_CONSTITUTION_BYTES
    cli("db", "upgrade")
    before = table_counts(engine)
    for command in ("validate", "register"):
        result = run_cai(db_url, "constitution", command, path, timeout=30)
        assert result.returncode == 2, result.stderr
        assert f"error: {path}: larger than 1,048,576 bytes; refusing to read it" in result.stderr
    assert table_counts(engine) == before


def test_too_many_principles_are_refused(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(
        HEADER
        + "principles:\n"
        + "".join(f"  - {{id: p{n}, critique: c}}\n" for n in range(MAX_PRINCIPLES + 1))
    )
    assert path.stat().st_size < MAX_CONSTITUTION_BYTES
    cli("db", "upgrade")
    before = table_counts(engine)
    result = cli("constitution", "register", path, expect=2)
    assert f"{path}:4: principles: 1,001 principles; a constitution may have at most 1,000" in result.stderr
    assert table_counts(engine) == before


def test_text_the_database_cannot_store_is_refused_in_constitutions(
    cli: Cli, engine: Engine, tmp_path: Path
) -> None:
    path = tmp_path / "nul.yaml"
    path.write_text(HEADER.replace("A constitution under attack.", '"under\\0attack"') + PRINCIPLES)
    cli("db", "upgrade")
    before = table_counts(engine)
    for command in ("validate", "register"):
        result = cli("constitution", command, path, expect=2)
        assert f"{path}:3: text contains a NUL character (\\u0000), which cannot be stored" in result.stderr
    assert table_counts(engine) == before


# --- prompt sets --------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_prompt_longer_than_the_limit_is_refused(
    cli: Cli, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    long = "x" * (MAX_PROMPT_CHARS + 1)
    half = "y" * (MAX_PROMPT_CHARS // 2 + 1)
    path = write_jsonl(
        tmp_path / "long.jsonl",
        [
            {"prompt": "fine"},
            {"prompt": long},
            {"messages": [{"role": "system", "content": half}, {"role": "user", "content": half}]},
        ],
    )
    cli("db", "upgrade")
    before = table_counts(engine)
    result = cli("prompts", "import", path, expect=2)
    assert f"{path}:2: prompt: 32,001 characters, over the limit of 32,000" in result.stderr
    assert f"{path}:3: messages: 32,002 characters, over the limit of 32,000" in result.stderr
    assert table_counts(engine) == before

    result = cli("prompts", "import", path, "--max-prompt-chars", 3, expect=2)
    assert f"{path}:1: prompt: 4 characters, over the limit of 3" in result.stderr
    assert table_counts(engine) == before

    monkeypatch.setenv("CAI_MAX_PROMPT_CHARS", str(MAX_PROMPT_CHARS + 2))
    assert "imported 3" in cli("prompts", "import", path).stdout


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_text_the_database_cannot_store_is_refused_in_prompts(
    cli: Cli, engine: Engine, tmp_path: Path, suffix: str
) -> None:
    """PostgreSQL refused a NUL with a DataError (exit 1) and SQLite stored it; neither may."""
    path = tmp_path / f"nul{suffix}"
    if suffix == ".jsonl":
        write_jsonl(
            path,
            [
                {"prompt": "fine"},
                {"prompt": "before\x00after"},
                {"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "a\x00"}]},
                {"prompt": "fine too", "tags": ["t\x00"]},
            ],
        )
        path.write_text(path.read_text() + '{"prompt": "half a pair \\ud800"}\n')
        expected = [
            f"{path}:2: prompt: contains a NUL character (\\u0000), which cannot be stored",
            f"{path}:3: messages[1].content: contains a NUL character (\\u0000), which cannot be stored",
            f"{path}:4: tags: a tag contains a NUL character (\\u0000), which cannot be stored",
            f"{path}:5: prompt: contains a lone surrogate (U+D800), which is not valid Unicode text",
        ]
    elif suffix == ".csv":
        path.write_text('prompt\nfine\n"multi\nline\x00"\n')
        expected = [f"{path}:3: prompt: contains a NUL character (\\u0000), which cannot be stored"]
    else:
        pq.write_table(pa.table({"prompt": ["fine", "nul\x00"]}), path)
        expected = [f"{path}: row 1: prompt: contains a NUL character (\\u0000), which cannot be stored"]
    cli("db", "upgrade")
    before = table_counts(engine)
    result = cli("prompts", "import", path, expect=2)
    assert [line.removeprefix("error: ") for line in result.stderr.splitlines()] == expected
    assert table_counts(engine) == before


def test_every_bad_row_is_listed_up_to_a_cap(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": ""}\n{not json\n[1]\n{"prompt": "x", "split": "dev"}\n')
    cli("db", "upgrade")
    before = table_counts(engine)
    result = cli("prompts", "import", path, expect=2)
    assert result.stderr.splitlines() == [
        f"error: {path}:2: prompt: must be a non-empty string",
        f"error: {path}:3: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        f"error: {path}:4: expected a JSON object, got list",
        f"error: {path}:5: split: 'dev' is not one of train, eval",
    ]

    many = write_jsonl(tmp_path / "many.jsonl", [{"prompt": ""}] * (MAX_REPORTED + 5))
    lines = cli("prompts", "import", many, expect=2).stderr.splitlines()
    assert lines[:MAX_REPORTED] == [
        f"error: {many}:{n}: prompt: must be a non-empty string" for n in range(1, MAX_REPORTED + 1)
    ]
    assert lines[MAX_REPORTED:] == ["error: ... and 5 more bad rows; nothing imported"]
    assert table_counts(engine) == before
