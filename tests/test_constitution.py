"""Constitution files: every shipped file is valid, and every kind of bad input is named with
its file, line and field."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from cai.constitution import Constitution, load_constitution, parse_ref, validate_files
from cai.errors import BadInput
from tests.conftest import REPO

SHIPPED = sorted((REPO / "constitutions").glob("*/v*.yaml"))

VALID = """\
name: tiny
version: 1
description: A tiny constitution.
principles:
  - id: honest
    critique: Is anything false?
    revision: Make it true.
  - id: short
    kind: rule
    critique: Under 50 words.
    rule:
      check: max_words
      max: 50
"""


def write(tmp_path: Path, text: str | bytes, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(BadInput) as caught:
        load_constitution(path)
    return caught.value.problems


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_every_shipped_constitution_is_valid(path: Path) -> None:
    constitution = load_constitution(path).constitution
    assert path.parent.name == constitution.name
    assert path.name == f"v{constitution.version}.yaml"
    for principle in constitution.principles:
        assert principle.critique.strip()


def test_the_main_constitution_is_a_full_one() -> None:
    constitution = load_constitution(REPO / "constitutions/helpful-harmless/v1.yaml").constitution
    assert 12 <= len(constitution.principles) <= 16
    assert all(p.kind == "llm" and p.revision for p in constitution.principles)


def test_a_shipped_constitution_uses_every_rule_check() -> None:
    checks = {
        p.rule.check
        for path in SHIPPED
        for p in load_constitution(path).constitution.principles
        if p.rule is not None
    }
    assert checks >= {"max_words", "min_words", "must_not_match"}


def test_hash_ignores_comments_and_formatting_but_not_content(tmp_path: Path) -> None:
    base = load_constitution(write(tmp_path, VALID)).constitution.sha256()
    reformatted = "# a comment\n" + VALID.replace(
        "critique: Is anything false?", "critique:   'Is anything false?'"
    )
    assert load_constitution(write(tmp_path, reformatted, "b.yaml")).constitution.sha256() == base
    changed = VALID.replace("Is anything false?", "Is anything untrue?")
    assert load_constitution(write(tmp_path, changed, "c.yaml")).constitution.sha256() != base


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("  - id: short\n", "  - id: short\n   bad: [unclosed\n"))
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:9: invalid YAML: ")  # line 9 is the mis-indented one


def test_missing_field_names_the_line_of_the_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("    critique: Is anything false?\n", ""))
    assert problems_of(path) == [f"{path}:5: principles[0].critique: Field required"]


def test_mistyped_field_suggests_the_right_name(tmp_path: Path) -> None:
    path = write(
        tmp_path, VALID.replace("    critique: Is anything false?", "    critque: Is anything false?")
    )
    problems = problems_of(path)
    assert f"{path}:6: principles[0].critque: unknown field (did you mean 'critique'?)" in problems
    assert f"{path}:5: principles[0].critique: Field required" in problems


def test_wrong_type_names_field_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("version: 1", "version: one"))
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:2: version: ")
    assert "integer" in problem


def test_duplicate_principle_ids_point_at_both(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("id: short", "id: honest"))
    assert problems_of(path) == [
        f"{path}:8: principles[1].id: duplicate principle id 'honest' (first used on line 5)"
    ]


def test_unknown_rule_check(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("check: max_words", "check: max_sentences"))
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:11: principles[1].rule: unknown rule check 'max_sentences'")
    assert "max_words" in problem


def test_rule_principle_without_rule_and_bad_regex(tmp_path: Path) -> None:
    text = VALID + (
        "  - id: needs-rule\n    kind: rule\n    critique: x\n"
        "  - id: bad-regex\n    kind: rule\n    critique: y\n    rule: {check: must_match, pattern: '(unclosed'}\n"
    )
    problems = problems_of(write(tmp_path, text))
    assert any(":14: principles[2]: kind 'rule' needs a 'rule' mapping" in p for p in problems), problems
    assert any(
        ":20: principles[3].rule.pattern: principle 'bad-regex': not a valid regular expression" in p
        for p in problems
    ), problems


def test_unknown_principle_kind(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("kind: rule", "kind: regex"))
    assert any(f"{path}:9: principles[1].kind:" in p for p in problems_of(path))


def test_empty_principle_list(tmp_path: Path) -> None:
    text = VALID.split("principles:")[0] + "principles: []\n"
    path = write(tmp_path, text)
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:4: principles: List should have at least 1 item")


def test_duplicate_yaml_keys_are_not_silently_merged(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("version: 1\n", "version: 1\nversion: 2\n"))
    assert f"{path}:3: version: duplicate key" in problems_of(path)


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.encode().replace(b"A tiny", b"A t\xefny"))
    assert problems_of(path) == [f"{path}:3: not valid UTF-8 (byte 0xef at offset 38)"]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- just\n- a list\n")
    assert "expected a mapping" in problems_of(path)[0]


def test_file_name_must_agree_with_content(tmp_path: Path) -> None:
    (tmp_path / "tiny").mkdir()
    path = write(tmp_path, VALID, "tiny/v2.yaml")
    assert problems_of(path) == [f"{path}:2: version: is 1 but the file is named v2.yaml"]
    other = tmp_path / "other"
    other.mkdir()
    path = write(tmp_path, VALID, "other/v1.yaml")
    assert problems_of(path) == [f"{path}:1: name: is 'tiny' but the file lives in other/"]


def test_validate_files_reports_every_file(tmp_path: Path) -> None:
    good = write(tmp_path, VALID, "good.yaml")
    bad1 = write(tmp_path, VALID.replace("version: 1", "version: 0"), "bad1.yaml")
    bad2 = write(tmp_path, VALID.replace("name: tiny", "name: Not A Slug"), "bad2.yaml")
    problems = validate_files([good, bad1, bad2])
    assert [p.split(":")[0] for p in problems] == [str(bad1), str(bad2)]


def test_rules_check_text() -> None:
    c = Constitution.model_validate(
        {
            "name": "r",
            "version": 1,
            "description": "d",
            "principles": [
                {"id": "max", "kind": "rule", "critique": "c", "rule": {"check": "max_words", "max": 3}},
                {"id": "min", "kind": "rule", "critique": "c", "rule": {"check": "min_words", "min": 2}},
                {
                    "id": "must",
                    "kind": "rule",
                    "critique": "c",
                    "rule": {"check": "must_match", "pattern": "^sure", "ignore_case": True},
                },
                {
                    "id": "not",
                    "kind": "rule",
                    "critique": "c",
                    "rule": {"check": "must_not_match", "pattern": "!"},
                },
            ],
        }
    )
    results = {p.id: p.rule.passes("Sure, here it is") for p in c.principles if p.rule}
    assert results == {"max": False, "min": True, "must": True, "not": True}
    results = {p.id: p.rule.passes("no!") for p in c.principles if p.rule}
    assert results == {"max": True, "min": False, "must": False, "not": False}


def test_principles_are_sampled_by_weight() -> None:
    c = Constitution.model_validate(
        {
            "name": "w",
            "version": 1,
            "description": "d",
            "principles": [
                {"id": "heavy", "critique": "c", "weight": 3},
                {"id": "light", "critique": "c", "weight": 1},
                {"id": "rule", "kind": "rule", "critique": "c", "rule": {"check": "max_words", "max": 1}},
            ],
        }
    )
    rng = random.Random(0)
    counts = Counter(c.sample_principle(rng).id for _ in range(4000))
    assert set(counts) == {"heavy", "light"}  # rules are checked in code, never sampled for the judge
    assert 2.6 < counts["heavy"] / counts["light"] < 3.4
    assert [c.sample_principle(random.Random(7)).id for _ in range(3)] == [
        c.sample_principle(random.Random(7)).id
    ] * 3


@pytest.mark.parametrize(
    ("ref", "expected"),
    [("hh", ("hh", None)), ("hh@3", ("hh", 3)), ("helpful-harmless@12", ("helpful-harmless", 12))],
)
def test_parse_ref(ref: str, expected: tuple[str, int | None]) -> None:
    assert parse_ref(ref) == expected


@pytest.mark.parametrize("ref", ["hh@", "hh@0", "hh@x", "Bad Name", "@1"])
def test_parse_ref_rejects(ref: str) -> None:
    with pytest.raises(BadInput):
        parse_ref(ref)


def rule_passes(pattern: str, text: str, check: str = "must_match", ignore_case: bool = False) -> bool:
    c = Constitution.model_validate(
        {
            "name": "r",
            "version": 1,
            "description": "d",
            "principles": [
                {
                    "id": "p",
                    "kind": "rule",
                    "critique": "c",
                    "rule": {"check": check, "pattern": pattern, "ignore_case": ignore_case},
                }
            ],
        }
    )
    rule = c.principles[0].rule
    assert rule is not None
    return rule.passes(text)


def test_rule_flags_keep_their_meaning_on_re2() -> None:
    assert rule_passes("^sure", "SURE thing", ignore_case=True)
    assert not rule_passes("^sure", "SURE thing")
    assert rule_passes("élan", "ÉLAN", ignore_case=True)  # case folding beyond ASCII
    assert rule_passes("(?i)^sure", "Sure")  # inline flags work too
    assert rule_passes("(?m)^second$", "first\nsecond\nthird")
    assert not rule_passes("^second$", "first\nsecond\nthird")
    assert not rule_passes("https?://", "see http://x", check="must_not_match", ignore_case=True)
    assert not rule_passes("HTTPS?://", "see http://x", check="must_not_match", ignore_case=True)
    # As in Python, `$` also matches before one final newline, but not before other text.
    assert rule_passes("[.!?]$", "Done.\n")
    assert not rule_passes("[.!?]$", "Done.\nAnd then")
    assert not rule_passes("[.!?]$", "Done.\n\n")


def test_nested_quantifiers_run_in_linear_time() -> None:
    # Python's re took 0.3 s on 7 words here and 7 times longer per further word; RE2 is linear.
    # In a child process with a timeout, so that a regression fails instead of hanging the suite.
    code = (
        "from tests.test_constitution import rule_passes\n"
        "words = ' '.join(['word'] * 5000)\n"
        "print(rule_passes(r'^(\\w+\\s?)+[.!?]$', words), rule_passes(r'^(\\w+\\s?)+[.!?]$', words + '.'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.split() == ["False", "True"]


def test_patterns_re2_cannot_run_name_the_principle(tmp_path: Path) -> None:
    text = (
        VALID
        + "  - id: polite\n    kind: rule\n    critique: y\n    rule: {check: must_not_match, pattern: '(?<!not )rude'}\n"
    )
    (problem,) = problems_of(write(tmp_path, text))
    assert problem.startswith(
        f"{tmp_path / 'tiny.yaml'}:17: principles[2].rule.pattern: principle 'polite': "
        "RE2 cannot run this pattern: invalid perl operator: (?<!"
    )
    assert "lookahead/lookbehind" in problem


def test_aliases_are_checked_once_not_once_per_use(tmp_path: Path) -> None:
    # A duplicate key inside an aliased mapping is one problem, reported where it is written.
    text = VALID.replace(
        "description: A tiny constitution.",
        "description: A tiny constitution.\nx: &m {a: 1, a: 2}\ny: [*m, *m, *m]",
    )
    duplicates = [p for p in problems_of(write(tmp_path, text)) if "duplicate" in p]
    assert duplicates == [f"{tmp_path / 'tiny.yaml'}:4: a: duplicate key"]


def test_deep_nesting_is_bad_input_not_a_crash(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "x: " + "[" * 20_000 + "]" * 20_000 + "\n")
    assert problems_of(path) == [f"{path}: invalid YAML: nested too deeply"]


WITH_EXAMPLE = VALID.replace(
    "    revision: Make it true.\n",
    """    revision: Make it true.
    examples:
      - prompt: Is the Earth flat?
        response_a: No. It is very nearly a sphere.
        response_b: Yes, it is flat.
        preferred: A
        why: B states a falsehood.
""",
)


def test_examples_are_part_of_the_hash_and_their_absence_changes_nothing(tmp_path: Path) -> None:
    plain = load_constitution(write(tmp_path, VALID)).constitution
    assert '"examples"' not in plain.canonical_json()  # hashes as before principles had examples
    assert "examples" not in plain.to_yaml()
    shown = load_constitution(write(tmp_path, WITH_EXAMPLE, "b.yaml")).constitution
    assert shown.sha256() != plain.sha256()
    (example,) = shown.principles[0].examples
    assert (example.preferred, example.why) == ("A", "B states a falsehood.")
    reworded = WITH_EXAMPLE.replace("B states a falsehood.", "B is false.")
    assert load_constitution(write(tmp_path, reworded, "c.yaml")).constitution.sha256() != shown.sha256()


def test_malformed_examples_name_their_line(tmp_path: Path) -> None:
    bad = WITH_EXAMPLE.replace("preferred: A", "preferred: C").replace(
        "        why: B states a falsehood.\n", ""
    )
    path = write(tmp_path, bad)
    assert problems_of(path) == [
        f"{path}:12: principles[0].examples[0].preferred: Input should be 'A', 'B' or 'tie'",
        f"{path}:9: principles[0].examples[0].why: Field required",  # the example's mapping
    ]
    on_rule = (
        VALID + "    examples:\n      - {prompt: p, response_a: a, response_b: b, preferred: A, why: w}\n"
    )
    path = write(tmp_path, on_rule, "rule.yaml")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:8: principles[1]: ") and "judged principles" in problem
