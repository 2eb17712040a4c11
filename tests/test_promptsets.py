"""Prompt-set files: three formats, one canonical hash, and every malformed row named."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cai.errors import BadInput
from cai.promptsets import read_prompt_file
from tests.conftest import REPO

SHIPPED = REPO / "prompt_sets/helpful-harmless.jsonl"


def jsonl(tmp_path: Path, rows: list[object], name: str = "p.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_shipped_prompt_set_is_valid_and_balanced() -> None:
    prompts = read_prompt_file(SHIPPED)
    assert len(prompts) >= 200
    assert len({p.sha256 for p in prompts}) == len(prompts)
    splits = {p.split for p in prompts}
    assert splits == {"train", "eval"}
    kinds = [p.tags[0] for p in prompts]
    assert kinds.count("red-team") >= 60 and kinds.count("helpful") >= 100
    eval_kinds = {p.tags[0] for p in prompts if p.split == "eval"}
    assert eval_kinds == {"helpful", "red-team"}


def test_text_and_messages_hash_alike(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        [{"prompt": "Hello?"}, {"messages": [{"role": "user", "content": "Hello?"}]}],
    )
    a, b = read_prompt_file(path)
    assert a.sha256 == b.sha256
    assert a.text == b.text == "Hello?"


def test_split_and_tags_from_rows_and_options(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [{"prompt": "a", "split": "eval", "tags": ["x"]}, {"prompt": "b"}])
    a, b = read_prompt_file(path, tags=("cli",))
    assert (a.split, a.tags, b.split, b.tags) == ("eval", ("x", "cli"), "train", ("cli",))
    a, b = read_prompt_file(path, split="eval")
    assert a.split == b.split == "eval"


def test_csv_with_messages_and_comma_tags(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    messages = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["prompt", "messages", "tags"], ["Multi\nline", "", "a, b"], ["", messages, ""]])
    first, second = read_prompt_file(path)
    assert (first.row, second.row) == (f"{path}:2", f"{path}:4")
    assert first.text == "Multi\nline" and first.tags == ("a", "b")
    assert second.messages == (("system", "Be brief."), ("user", "Hi")) and second.text is None


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["one", "two"], "split": ["train", "eval"]}), path)
    assert [(p.text, p.split) for p in read_prompt_file(path)] == [("one", "train"), ("two", "eval")]


def test_every_bad_row_is_named(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        [
            {"prompt": "fine"},
            {"prompt": ""},
            {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
            {"messages": [{"role": "robot", "content": "y"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"prompt": "x", "split": "test"},
            {"prompt": "x", "tags": [1]},
        ],
    )
    with pytest.raises(BadInput) as caught:
        read_prompt_file(path)
    assert caught.value.problems == [
        f"{path}:2: prompt: must be a non-empty string",
        f"{path}:3: needs exactly one of 'prompt' or 'messages'",
        f"{path}:4: messages[0].role: 'robot' is not one of system, user, assistant",
        f"{path}:5: messages: the last turn must be the user's (the policy answers it)",
        f"{path}:6: split: 'test' is not one of train, eval",
        f"{path}:7: tags: must be a list of non-empty strings",
    ]


def test_invalid_json_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n[1, 2]\n')
    with pytest.raises(BadInput) as caught:
        read_prompt_file(path)
    assert caught.value.problems[0].startswith(f"{path}:2: invalid JSON")
    assert caught.value.problems[1] == f"{path}:3: expected a JSON object, got list"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_missing_column_is_named(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"p{suffix}"
    if suffix == ".csv":
        path.write_text("question,answer\nwhy,because\n")
    else:
        pq.write_table(pa.table({"question": ["why"]}), path)
    with pytest.raises(BadInput, match=r"needs a 'prompt' or a 'messages' column \(found: question"):
        read_prompt_file(path)


def test_unsupported_type_bad_split_option_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"unsupported file type '\.txt'"):
        read_prompt_file(tmp_path / "p.txt")
    with pytest.raises(BadInput, match="split: 'dev'"):
        read_prompt_file(jsonl(tmp_path, [{"prompt": "a"}]), split="dev")
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(BadInput, match=r"bad\.jsonl:2: not valid UTF-8"):
        read_prompt_file(path)


def test_only_newline_ends_a_jsonl_row(tmp_path: Path) -> None:
    # JSON strings may hold U+2028 and U+0085 raw, which str.splitlines() treats as line breaks.
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one\u2028two\x85three"}\r\n{"prompt": ""}\n', newline="")
    with pytest.raises(BadInput) as caught:
        read_prompt_file(path)
    assert caught.value.problems == [f"{path}:2: prompt: must be a non-empty string"]
    path.write_text('{"prompt": "one\u2028two\x85three"}\r\n', newline="")
    assert read_prompt_file(path)[0].text == "one\u2028two\x85three"


def test_json_python_cannot_read_is_a_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok", "n": ' + "9" * 5000 + "}\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(BadInput) as caught:
        read_prompt_file(path)
    first, second = caught.value.problems
    assert first.startswith(f"{path}:1: invalid JSON: Exceeds the limit")
    assert second == f"{path}:2: invalid JSON: nested too deeply"


def test_csv_field_over_the_csv_limit_is_a_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("prompt\nfine\n" + "x" * 200_000 + "\n")
    with pytest.raises(BadInput) as caught:
        read_prompt_file(path, max_chars=300_000)
    assert caught.value.problems == [f"{path}:3: invalid CSV: field larger than field limit (131072)"]
