"""Prompt-set files (JSONL, CSV, Parquet) -> validated prompts with a content hash. Pure: reading
and checking only; the store decides what is new."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.constitution import read_utf8, unstorable
from cai.errors import BadInput

SPLITS = ("train", "eval")
ROLES = ("system", "user", "assistant")
MAX_REPORTED = 20  # beyond this many bad rows, listing more helps nobody
MAX_PROMPT_CHARS = 32_000
"""Default cap on a row's text (all its turns together): far above a real request, and it keeps
one pasted document from filling the policy's context and the judge's bill on every sample."""

Row = tuple[str, dict[str, Any] | BadInput]
"""(where, parsed row), or (where, the reason a line could not be parsed at all)."""


@dataclass(frozen=True)
class PromptInput:
    messages: tuple[tuple[str, str], ...]
    """(role, content) turns; a plain `prompt` becomes one user turn."""
    split: str
    tags: tuple[str, ...]
    row: str
    """Where it came from, e.g. 'prompts.jsonl:12', for messages about it."""

    @property
    def sha256(self) -> str:
        return prompt_sha256(self.messages)

    @property
    def text(self) -> str | None:
        if len(self.messages) == 1 and self.messages[0][0] == "user":
            return self.messages[0][1]
        return None

    def messages_json(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


def prompt_sha256(messages: tuple[tuple[str, str], ...]) -> str:
    """Hash of the canonical turns, so the same request as `prompt` or `messages` is one prompt."""
    canonical = json.dumps([[role, content] for role, content in messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def read_prompt_file(
    path: Path | str,
    split: str | None = None,
    tags: tuple[str, ...] = (),
    max_chars: int = MAX_PROMPT_CHARS,
) -> list[PromptInput]:
    """Parse every row; BadInput names each bad row (the first MAX_REPORTED of them). `split`
    overrides a per-row `split` column (default 'train'); `tags` are added to any per-row `tags`;
    a row whose turns add up to more than `max_chars` characters is refused."""
    path = Path(path)
    if split is not None and split not in SPLITS:
        raise BadInput(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    rows = _read_rows(path)
    if not rows:
        raise BadInput(f"{path}: no rows")
    prompts: list[PromptInput] = []
    problems: list[str] = []
    for where, row in rows:
        try:
            if isinstance(row, BadInput):
                raise row
            prompts.append(_to_prompt(where, row, split, tags, max_chars))
        except BadInput as exc:
            problems.append(str(exc))
    if problems:
        shown = problems[:MAX_REPORTED]
        if len(problems) > MAX_REPORTED:
            shown.append(f"... and {len(problems) - MAX_REPORTED} more bad rows; nothing imported")
        raise BadInput(f"{path}: {len(problems)} bad row(s); nothing imported", shown)
    return prompts


def _read_rows(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in (".jsonl", ".csv"):
        raise BadInput(f"{path}: unsupported file type {suffix or '(none)'!r}; use .jsonl, .csv or .parquet")
    text = read_utf8(path)
    return _read_jsonl(path, text) if suffix == ".jsonl" else _read_csv(path, text)


def _read_jsonl(path: Path, text: str) -> list[Row]:
    rows: list[Row] = []
    # Only "\n" ends a JSONL record: str.splitlines() would also split at U+2028 or \x1c, which
    # JSON strings may hold raw, and shift every later line number.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append((where, BadInput(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})")))
            continue
        except (ValueError, RecursionError) as exc:  # a 5000-digit number, [[[[...]]]] nested 10**5 deep
            reason = str(exc) if isinstance(exc, ValueError) else "nested too deeply"
            rows.append((where, BadInput(f"{where}: invalid JSON: {reason}")))
            continue
        if not isinstance(value, dict):
            rows.append((where, BadInput(f"{where}: expected a JSON object, got {type(value).__name__}")))
            continue
        rows.append((where, value))
    return rows


def _read_csv(path: Path, text: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        _require_columns(path, reader.fieldnames or [])
    except csv.Error as exc:
        raise BadInput(f"{path}:1: invalid CSV: {exc}") from None
    rows: list[Row] = []
    while True:
        start = reader.line_num + 1  # a quoted field may span lines: name the record's first line
        try:
            record = next(reader, None)
        except csv.Error as exc:  # e.g. a field over csv's size limit: the rest cannot be trusted
            rows.append((f"{path}:{start}", BadInput(f"{path}:{start}: invalid CSV: {exc}")))
            break
        if record is None:
            break
        row: dict[str, Any] = {k: v for k, v in record.items() if k is not None and v not in (None, "")}
        if "messages" in row:
            # A cell that is not JSON stays a string, which _parse_messages reports with its row.
            with contextlib.suppress(ValueError, RecursionError):
                row["messages"] = json.loads(row["messages"])
        if "tags" in row:
            row["tags"] = [t.strip() for t in row["tags"].split(",") if t.strip()]
        rows.append((f"{path}:{start}", row))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path}: not a readable Parquet file: {exc}") from None
    _require_columns(path, table.column_names)
    return [(f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist())]


def _require_columns(path: Path, columns: Sequence[str]) -> None:
    if "prompt" not in columns and "messages" not in columns:
        found = ", ".join(columns) or "none"
        raise BadInput(f"{path}: needs a 'prompt' or a 'messages' column (found: {found})")


def _to_prompt(
    where: str, row: dict[str, Any], split: str | None, extra_tags: tuple[str, ...], max_chars: int
) -> PromptInput:
    prompt, messages = row.get("prompt"), row.get("messages")
    if (prompt is None) == (messages is None):
        raise BadInput(f"{where}: needs exactly one of 'prompt' or 'messages'")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadInput(f"{where}: prompt: must be a non-empty string")
        if why := unstorable(prompt):
            raise BadInput(f"{where}: prompt: {why}")
        turns: tuple[tuple[str, str], ...] = (("user", prompt),)
    else:
        turns = _parse_messages(where, messages)
    length = sum(len(content) for _, content in turns)
    if length > max_chars:
        field = "prompt" if prompt is not None else "messages"
        raise BadInput(
            f"{where}: {field}: {length:,} characters, over the limit of {max_chars:,} "
            "(raise it with --max-prompt-chars or CAI_MAX_PROMPT_CHARS)"
        )
    row_split = split or row.get("split") or "train"
    if row_split not in SPLITS:
        raise BadInput(f"{where}: split: {row_split!r} is not one of {', '.join(SPLITS)}")
    row_tags = row.get("tags") or []
    if isinstance(row_tags, str):
        row_tags = [row_tags]
    if not isinstance(row_tags, list) or not all(isinstance(t, str) and t.strip() for t in row_tags):
        raise BadInput(f"{where}: tags: must be a list of non-empty strings")
    tags = tuple(dict.fromkeys([*row_tags, *extra_tags]))
    if any(len(tag) > 64 for tag in tags):
        raise BadInput(f"{where}: tags: a tag is longer than 64 characters")
    if why := next(filter(None, map(unstorable, tags)), None):
        raise BadInput(f"{where}: tags: a tag {why}")
    return PromptInput(turns, row_split, tags, where)


def _parse_messages(where: str, messages: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise BadInput(f"{where}: messages: must be a non-empty JSON list of {{role, content}}")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadInput(f"{where}: messages[{i}]: must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadInput(f"{where}: messages[{i}].role: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise BadInput(f"{where}: messages[{i}].content: must be a non-empty string")
        if why := unstorable(content):
            raise BadInput(f"{where}: messages[{i}].content: {why}")
        turns.append((role, content))
    if turns[-1][0] != "user":
        raise BadInput(f"{where}: messages: the last turn must be the user's (the policy answers it)")
    return tuple(turns)
