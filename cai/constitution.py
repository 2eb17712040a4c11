"""Constitutions: the pydantic schema, the YAML loader that reports `file:line: field: message`,
the canonical hash, rule checks and weighted principle sampling.

Constitution files and rule patterns may come from anyone, so loading them is bounded: files are
capped in size, YAML aliases may not expand past a budget, and rule patterns run on RE2, whose
matching time is linear in the text whatever the pattern."""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import re2
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from cai.errors import BadInput

SLUG = r"^[a-z0-9][a-z0-9_-]*$"

MAX_CONSTITUTION_BYTES = 1024 * 1024
"""Real constitutions are a few KB; a file near this size is a mistake or an attack, and parsing
one costs seconds and hundreds of MB."""
MAX_PRINCIPLES = 1000
MAX_EXPANDED_YAML = 4 * MAX_CONSTITUTION_BYTES
"""Budget for the document with its aliases resolved: one per node plus each scalar's length. A
file without aliases stays under about twice its size, so only alias bombs reach it."""


class _Strict(BaseModel):
    # Unknown keys are almost always typos ("critque:"); refusing them is kinder than ignoring them.
    model_config = ConfigDict(extra="forbid", frozen=True)


class MaxWords(_Strict):
    check: Literal["max_words"]
    max: PositiveInt

    def passes(self, text: str) -> bool:
        return len(text.split()) <= self.max


class MinWords(_Strict):
    check: Literal["min_words"]
    min: PositiveInt

    def passes(self, text: str) -> bool:
        return len(text.split()) >= self.min


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str, ignore_case: bool) -> Any:
    options = re2.Options()
    options.case_sensitive = not ignore_case
    options.log_errors = False  # RE2 would print parse errors to stderr; we report them ourselves
    return re2.compile(pattern, options)


def _pattern_problem(pattern: str, exc: Exception) -> str:
    detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
    try:
        re.compile(pattern)
    except re.error:
        return f"not a valid regular expression: {detail}"
    hint = " (write \\Z as \\z)" if "\\Z" in detail else ""
    return (
        f"RE2 cannot run this pattern: {detail}{hint}. Rule patterns use RE2 syntax, which matches "
        "in linear time: no backreferences, lookahead/lookbehind, atomic groups or possessive "
        "quantifiers, and repetition counts up to 1000"
    )


class _Pattern(_Strict):
    pattern: str
    ignore_case: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        # Validated with the engine that runs it: a Python-only pattern would pass here and then
        # fail (or, with nested quantifiers, backtrack for hours) when a response is checked.
        try:
            _compiled(value, False)
        except re2.error as exc:
            raise ValueError(_pattern_problem(value, exc)) from None
        return value

    def _search(self, text: str) -> bool:
        regex = _compiled(self.pattern, self.ignore_case)
        if regex.search(text) is not None:
            return True
        # Python's `$` also matches before a final newline, RE2's only at the very end; searching
        # without that newline keeps patterns like `[.!?]$` meaning what their authors expect.
        return text.endswith("\n") and regex.search(text[:-1]) is not None


class MustMatch(_Pattern):
    check: Literal["must_match"]

    def passes(self, text: str) -> bool:
        return self._search(text)


class MustNotMatch(_Pattern):
    check: Literal["must_not_match"]

    def passes(self, text: str) -> bool:
        return not self._search(text)


Rule = Annotated[MaxWords | MinWords | MustMatch | MustNotMatch, Field(discriminator="check")]
RULE_CHECKS = ("max_words", "min_words", "must_match", "must_not_match")


MAX_EXAMPLES = 8
"""Worked examples per principle: each is rendered into every judge prompt under it."""


class Example(_Strict):
    """A worked example for the judge: a prompt, two responses, the preferred one and why."""

    prompt: Annotated[str, Field(min_length=1)]
    response_a: Annotated[str, Field(min_length=1)]
    response_b: Annotated[str, Field(min_length=1)]
    preferred: Literal["A", "B", "tie"]
    why: Annotated[str, Field(min_length=1)]


class Principle(_Strict):
    id: Annotated[str, Field(pattern=SLUG, max_length=64)]
    kind: Literal["llm", "rule"] = "llm"
    critique: Annotated[str, Field(min_length=1)]
    """The critique request: what the judge looks for (for rules, a human-readable statement)."""
    revision: str | None = None
    """The revision request used by the `revise` mode; optional."""
    weight: Annotated[float, Field(gt=0)] = 1.0
    rule: Rule | None = None
    examples: Annotated[tuple[Example, ...], Field(max_length=MAX_EXAMPLES)] = ()
    """Few-shot examples shown to the judge with this principle (judged principles only)."""

    @model_validator(mode="after")
    def _rule_matches_kind(self) -> Principle:
        if self.kind == "rule" and self.rule is None:
            raise ValueError("kind 'rule' needs a 'rule' mapping (check: " + "|".join(RULE_CHECKS) + ")")
        if self.kind == "llm" and self.rule is not None:
            raise ValueError("'rule' is only allowed with kind: rule")
        if self.kind == "rule" and self.examples:
            raise ValueError("'examples' are for judged principles (kind: llm); a rule is checked in code")
        return self


class Constitution(_Strict):
    name: Annotated[str, Field(pattern=SLUG, max_length=64)]
    version: PositiveInt
    description: Annotated[str, Field(min_length=1)]
    principles: Annotated[list[Principle], Field(min_length=1, max_length=MAX_PRINCIPLES)]

    @model_validator(mode="after")
    def _unique_ids(self) -> Constitution:
        seen: set[str] = set()
        for principle in self.principles:
            if principle.id in seen:
                raise ValueError(f"principle id {principle.id!r} is used more than once")
            seen.add(principle.id)
        return self

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def canonical_json(self) -> str:
        """Key-sorted JSON of the validated content: comments and formatting do not change it.
        A principle's examples are part of it; a principle without any hashes as it did before
        principles could carry them."""
        return json.dumps(self._dump(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def _dump(self, **options: Any) -> dict[str, Any]:
        data = self.model_dump(mode="json", **options)
        for principle in data["principles"]:
            if not principle.get("examples"):
                principle.pop("examples", None)
        return data

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def to_yaml(self) -> str:
        """A normalised YAML rendering (used for `show` and `diff`)."""
        return yaml.safe_dump(
            self._dump(exclude_none=True),
            sort_keys=False,
            allow_unicode=True,
            width=100,
        )

    def principle(self, principle_id: str) -> Principle:
        for principle in self.principles:
            if principle.id == principle_id:
                return principle
        raise KeyError(principle_id)

    def sample_principle(self, rng: random.Random, kind: str = "llm") -> Principle:
        """Draw one principle of `kind` with probability proportional to its weight."""
        candidates = [p for p in self.principles if p.kind == kind]
        if not candidates:
            raise ValueError(f"{self.ref} has no {kind!r} principles")
        return rng.choices(candidates, weights=[p.weight for p in candidates], k=1)[0]


@dataclass(frozen=True)
class LoadedConstitution:
    constitution: Constitution
    source_text: str
    path: Path


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`NAME@VERSION` -> (name, version); a bare `NAME` means its latest version (None)."""
    name, sep, version = ref.partition("@")
    if not re.match(SLUG, name):
        raise BadInput(f"{ref!r}: expected NAME or NAME@VERSION, e.g. helpful-harmless@1")
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise BadInput(f"{ref!r}: the version after '@' must be a positive integer")
    return name, int(version)


# --- loading with line numbers ---------------------------------------------------------------


def read_utf8(path: Path, max_bytes: int | None = None) -> str:
    """Read a text file, naming the line of the first byte that is not UTF-8. With `max_bytes`,
    a longer file is refused after reading at most one byte past the limit."""
    try:
        with path.open("rb") as handle:
            data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    except OSError as exc:
        raise BadInput(f"{path}: cannot read: {exc.strerror}") from None
    return decode_utf8(data, path, max_bytes)


def decode_utf8(data: bytes, where: Path | str, max_bytes: int | None = None) -> str:
    """`data` as text; BadInput naming `where` and the line of the first byte that is not UTF-8,
    or saying it is longer than `max_bytes`."""
    if max_bytes is not None and len(data) > max_bytes:
        raise BadInput(f"{where}: larger than {max_bytes:,} bytes; refusing to read it")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise BadInput(
            f"{where}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def unstorable(text: str) -> str | None:
    """Why `text` cannot be stored as text, or None. PostgreSQL refuses NUL characters (SQLite
    keeps them, so the two would disagree), and JSON's or YAML's "\\ud800" escape decodes to a lone
    surrogate that no UTF-8 encoder accepts."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which cannot be stored"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone surrogate (U+{ord(text[exc.start]):04X}), which is not valid Unicode text"
    return None


def load_constitution(path: Path | str) -> LoadedConstitution:
    """Load and validate one constitution file; BadInput lists every problem found."""
    path = Path(path)
    return parse_constitution(read_utf8(path, max_bytes=MAX_CONSTITUTION_BYTES), path)


def parse_constitution(text: str, path: Path) -> LoadedConstitution:
    """Validate a constitution's YAML text; `path` is where it came from (a file, or an upload's
    name), which every problem names with its line."""
    root, data = _parse_yaml(path, text)
    if not isinstance(data, dict) or root is None:
        raise BadInput(f"{path}:1: expected a mapping with name, version, description, principles")

    problems = [f"{path}:{line}: {msg}" for line, msg in _node_problems(root)]
    problems += [f"{path}:{line}: {field}: {msg}" for line, field, msg in _duplicate_ids(data, root)]
    try:
        constitution = Constitution.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(error["loc"])
            if not loc and "used more than once" in error["msg"]:
                continue  # already reported with its line by _duplicate_ids
            line, field = _locate(root, data, loc)
            message = _message(error, loc)
            if loc[-1:] == ("pattern",) and (pid := _principle_id(data, loc)):
                message = f"principle {pid!r}: {message}"  # patterns are hard to tell apart by index
            problems.append(f"{path}:{line}: {field or '(top level)'}: {message}")
        constitution = None
    if constitution is not None:
        problems += [
            f"{path}:{ln}: {fld}: {msg}" for ln, fld, msg in _path_convention(path, constitution, root)
        ]
    if problems or constitution is None:
        raise BadInput(f"{path}: {len(problems)} problem(s)", problems)
    return LoadedConstitution(constitution, text, path)


def _parse_yaml(path: Path, text: str) -> tuple[yaml.Node | None, Any]:
    """Compose the node graph once, check its size, then construct Python values from it."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        _check_size(path, root)
        return root, loader.construct_document(root)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{mark.line + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise BadInput(f"{path}:{where} invalid YAML: {problem}") from None
    except RecursionError:
        raise BadInput(f"{path}: invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_size(path: Path, root: yaml.Node) -> None:
    """Refuse, before anything is built from it, a document whose aliases expand it past
    MAX_EXPANDED_YAML ("billion laughs": nine levels of ten aliases are 10**9 nodes in a few
    hundred bytes), that contains itself, or that has too many principles.

    An alias is the very node object it names, so each distinct node is sized once (memoised by
    identity) and the walk is linear in the file, however large the expansion."""
    size: dict[int, int] = {}
    on_path: set[int] = set()  # the nodes being sized: meeting one again means a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative: a deep document must not exhaust Python's recursion limit
        node, sized_children = stack.pop()
        key = id(node)
        if sized_children:
            on_path.discard(key)
            own = 1 + (len(node.value) if isinstance(node, yaml.ScalarNode) else 0)
            total = own + sum(size[id(child)] for child in _children(node))
            if total > MAX_EXPANDED_YAML:
                raise BadInput(
                    f"{path}:{node.start_mark.line + 1}: YAML aliases here expand the document past "
                    f"{MAX_EXPANDED_YAML:,} nodes and characters (an alias bomb?); write the content out"
                )
            size[key] = total
        elif key in on_path:
            raise BadInput(f"{path}:{node.start_mark.line + 1}: recursive YAML alias: a node contains itself")
        elif key not in size:
            on_path.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))
    if isinstance(root, yaml.MappingNode):
        for key_node, value_node in root.value:
            count = len(value_node.value) if isinstance(value_node, yaml.SequenceNode) else 0
            if key_node.value == "principles" and count > MAX_PRINCIPLES:
                raise BadInput(
                    f"{path}:{key_node.start_mark.line + 1}: principles: {count:,} principles; "
                    f"a constitution may have at most {MAX_PRINCIPLES:,}"
                )


def validate_files(paths: list[Path]) -> list[str]:
    """Validate many files; returns every problem (empty when all are valid)."""
    problems: list[str] = []
    for path in paths:
        try:
            load_constitution(path)
        except BadInput as exc:
            problems += exc.problems
    return problems


def _message(error: ErrorDetails, loc: tuple[Any, ...]) -> str:
    msg = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden" and loc:
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        msg = "unknown field" + (
            f" (did you mean {close[0]!r}?)" if close else f"; allowed: {', '.join(allowed)}"
        )
    elif error["type"] == "union_tag_invalid":
        msg = f"unknown rule check {error['input'].get('check')!r}; expected one of: {', '.join(RULE_CHECKS)}"
    return msg


def _principle_id(data: dict[str, Any], loc: tuple[Any, ...]) -> str | None:
    principles = data.get("principles")
    if len(loc) < 2 or loc[0] != "principles" or not isinstance(principles, list):
        return None
    item = principles[loc[1]] if isinstance(loc[1], int) and loc[1] < len(principles) else None
    pid = item.get("id") if isinstance(item, dict) else None
    return pid if isinstance(pid, str) else None


def _allowed_keys(parent: tuple[Any, ...]) -> list[str]:
    if not parent:
        return list(Constitution.model_fields)
    if "rule" in parent:
        return ["check", "max", "min", "pattern", "ignore_case"]
    return list(Principle.model_fields)


def _locate(root: yaml.Node, data: Any, loc: tuple[Any, ...]) -> tuple[int, str]:
    """Map a pydantic error location to (line, dotted field) in the YAML source."""
    node, value, parts = root, data, []
    line = root.start_mark.line + 1
    for part in loc:
        if isinstance(part, int) and isinstance(node, yaml.SequenceNode) and part < len(node.value):
            node, value = node.value[part], value[part]
            parts.append(f"[{part}]")
            line = node.start_mark.line + 1
        elif isinstance(part, str) and isinstance(node, yaml.MappingNode):
            if isinstance(value, dict) and part not in value and value.get("check") == part:
                continue  # pydantic puts the union tag into the location; the file has no such key
            parts.append(("." if parts else "") + part)
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break  # a missing field: report the line of the mapping that lacks it
            key_node, node = match
            value = value.get(part) if isinstance(value, dict) else None
            line = key_node.start_mark.line + 1
        else:
            parts.append(f".{part}")
            break
    return line, "".join(parts)


def _node_problems(root: yaml.Node) -> list[tuple[int, str]]:
    """Duplicate keys and text that cannot be stored, each reported once per node: an aliased
    node is visited once, not once per alias (which made a small alias bomb hang this walk)."""
    found: list[tuple[int, str]] = []
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            # PyYAML keeps the last of two equal keys silently; a constitution should never rely on that.
            keys: set[str] = set()
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value in keys:
                    found.append((key.start_mark.line + 1, f"{key.value}: duplicate key"))
                keys.add(key.value if isinstance(key, yaml.ScalarNode) else str(id(key)))
        elif isinstance(node, yaml.ScalarNode) and (why := unstorable(node.value)):
            found.append((node.start_mark.line + 1, f"text {why}"))
        stack.extend(reversed(_children(node)))
    return sorted(found, key=lambda item: item[0])


def _duplicate_ids(data: dict[str, Any], root: yaml.Node) -> list[tuple[int, str, str]]:
    principles = data.get("principles")
    if not isinstance(principles, list):
        return []
    first_seen: dict[str, int] = {}
    found = []
    for index, item in enumerate(principles):
        pid = item.get("id") if isinstance(item, dict) else None
        if not isinstance(pid, str):
            continue
        if pid in first_seen:
            line, field = _locate(root, data, ("principles", index, "id"))
            first_line, _ = _locate(root, data, ("principles", first_seen[pid], "id"))
            found.append((line, field, f"duplicate principle id {pid!r} (first used on line {first_line})"))
        else:
            first_seen[pid] = index
    return found


def _path_convention(path: Path, constitution: Constitution, root: yaml.Node) -> list[tuple[int, str, str]]:
    """Files named `<name>/v<N>.yaml` must agree with their content, or `register` lies."""
    match = re.fullmatch(r"v(\d+)\.ya?ml", path.name)
    if not match:
        return []
    found = []
    data = {"name": constitution.name, "version": constitution.version}
    if int(match.group(1)) != constitution.version:
        line, _ = _locate(root, data, ("version",))
        found.append((line, "version", f"is {constitution.version} but the file is named {path.name}"))
    if path.parent.name != constitution.name:
        line, _ = _locate(root, data, ("name",))
        found.append((line, "name", f"is {constitution.name!r} but the file lives in {path.parent.name}/"))
    return found


def diff_text(old: Constitution, new: Constitution) -> str:
    """A unified diff of the normalised YAML of two constitutions."""
    return "".join(
        difflib.unified_diff(
            old.to_yaml().splitlines(keepends=True),
            new.to_yaml().splitlines(keepends=True),
            fromfile=old.ref,
            tofile=new.ref,
        )
    )


def diff_summary(old: Constitution, new: Constitution) -> dict[str, list[str]]:
    """Principle ids added, removed and changed between two constitutions."""
    old_ids = {p.id: p for p in old.principles}
    new_ids = {p.id: p for p in new.principles}
    return {
        "added": [pid for pid in new_ids if pid not in old_ids],
        "removed": [pid for pid in old_ids if pid not in new_ids],
        "changed": [pid for pid in new_ids if pid in old_ids and new_ids[pid] != old_ids[pid]],
    }
