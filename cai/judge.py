"""Judge requests and verdicts, as pure functions: render a request (a pair in one order, or one
response to score or revise), parse the judge's reply leniently into a typed result, un-swap
pairwise verdicts, and aggregate both orders into a label."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cai.backends.base import ChatRequest
from cai.constitution import Constitution, Principle
from cai.templates import Rendered, TemplateSet, pairwise_context, single_context

ORDERS = ("AB", "BA")
VERDICTS = ("A", "B", "tie")
MODES = ("pairwise", "score", "revise")
SCORE_SCALE = (1, 10)

PAIRWISE_SCHEMA: dict[str, Any] = {
    "name": "pairwise_verdict",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {
            "rationale": {"type": "string"},
            "preferred": {"type": "string", "enum": list(VERDICTS)},
        },
        "required": ["rationale", "preferred"],
        "additionalProperties": False,
    },
}


SCORE_SCHEMA: dict[str, Any] = {
    "name": "score_verdict",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {"rationale": {"type": "string"}, "score": {"type": "integer"}},
        "required": ["rationale", "score"],
        "additionalProperties": False,
    },
}

REVISE_SCHEMA: dict[str, Any] = {
    "name": "critique_and_revision",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {"critique": {"type": "string"}, "revision": {"type": "string"}},
        "required": ["critique", "revision"],
        "additionalProperties": False,
    },
}


class ParseError(ValueError):
    """The judge's reply is not a verdict; the message says why (stored with the raw text)."""


@dataclass(frozen=True)
class Verdict:
    verdict: str
    """'A', 'B' or 'tie' in the pair's own terms (already un-swapped)."""
    rationale: str
    confidence: float | None = None
    """Probability the judge gave its choice, when the backend can read it."""
    choice_probs: dict[str, float] | None = None
    """The judge's probability of each verdict, in the pair's own terms (un-swapped)."""

    def columns(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "rationale": self.rationale,
            "confidence": self.confidence,
            "choice_probs": self.choice_probs,
        }


@dataclass(frozen=True)
class Score:
    score: int
    rationale: str

    def columns(self) -> dict[str, Any]:
        return {"score": float(self.score), "rationale": self.rationale}


@dataclass(frozen=True)
class Revision:
    critique: str
    revision: str

    def columns(self) -> dict[str, Any]:
        # The revision itself becomes a response row; the judgment keeps the critique.
        return {"rationale": self.critique}


Parsed = Verdict | Score | Revision


@dataclass(frozen=True)
class PairLabel:
    verdict: str
    confidence: float | None
    """How sure the label is of its verdict: the judge's probability for the chosen response, or
    for an ensemble without probabilities the share of principles that voted for it."""
    inconsistent: bool
    """The two orders picked opposite winners: position bias, stored as a tie."""
    prob_a: float | None = None
    """The judge's probability that A is the better response, both orders combined (None when
    the backend gave no probabilities)."""


def pairwise_request(
    templates: TemplateSet,
    constitution: Constitution,
    principle: Principle,
    conversation: list[dict[str, str]],
    response_a: str,
    response_b: str,
    order: str,
    max_tokens: int = 384,
    reasoning: str = "brief",
) -> tuple[Rendered, ChatRequest]:
    """The rendered prompt and the chat request for one order; 'BA' shows B first, as "A".
    `reasoning` 'cot' asks for step-by-step reasoning before the verdict."""
    first, second = (response_a, response_b) if order == "AB" else (response_b, response_a)
    context = pairwise_context(constitution, principle, conversation, first, second, reasoning)
    rendered = templates.render("judge_pairwise", **context)
    request = ChatRequest(
        messages=[{"role": "user", "content": rendered.text}],
        max_tokens=max_tokens,
        temperature=0.0,
        json_schema=PAIRWISE_SCHEMA,
        choice_field="preferred",
        choices=VERDICTS,
    )
    return rendered, request


def score_request(
    templates: TemplateSet,
    constitution: Constitution,
    principle: Principle,
    conversation: list[dict[str, str]],
    response: str,
    max_tokens: int = 384,
) -> tuple[Rendered, ChatRequest]:
    low, high = SCORE_SCALE
    context = single_context(constitution, principle, conversation, response, scale_min=low, scale_max=high)
    rendered = templates.render("judge_score", **context)
    request = ChatRequest(
        messages=[{"role": "user", "content": rendered.text}],
        max_tokens=max_tokens,
        json_schema=SCORE_SCHEMA,
    )
    return rendered, request


def revise_request(
    templates: TemplateSet,
    constitution: Constitution,
    principle: Principle,
    conversation: list[dict[str, str]],
    response: str,
    max_tokens: int = 768,
) -> tuple[Rendered, ChatRequest]:
    context = single_context(constitution, principle, conversation, response)
    rendered = templates.render("revision", **context)
    request = ChatRequest(
        messages=[{"role": "user", "content": rendered.text}],
        max_tokens=max_tokens,
        json_schema=REVISE_SCHEMA,
    )
    return rendered, request


def extract_json(text: str) -> dict[str, Any]:
    """The first JSON object in `text`: whole, inside a code fence, or embedded in prose."""
    stripped = text.strip()
    # Lazily: most replies are a bare object, and scanning for embedded ones costs more than parsing.
    fenced = (
        match.group(1) for match in re.finditer(r"```(?:json)?\s*(\{.*?\})\s*```", text, flags=re.DOTALL)
    )
    for candidate in itertools.chain((stripped,), fenced, _balanced_objects(text)):
        try:
            value = json.loads(candidate)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    if not stripped:
        raise ParseError("empty reply")
    raise ParseError("no JSON object in the reply" + (" (truncated?)" if "{" in text else ""))


def _balanced_objects(text: str) -> Iterator[str]:
    depth, start, in_string, escaped = 0, -1, False, False
    for i, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"' and depth > 0:
            in_string = True
        elif char == "{":
            if depth == 0:
                start = i
            depth += 1
        elif char == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                yield text[start : i + 1]


def parse_pairwise(text: str, order: str, choice_probs: dict[str, float] | None = None) -> Verdict:
    """A verdict in the pair's own terms; ParseError for anything outside the schema."""
    data = extract_json(text)
    preferred = data.get("preferred")
    if not isinstance(preferred, str):
        raise ParseError("'preferred' is missing or not a string")
    normalised = {"a": "A", "b": "B", "tie": "tie"}.get(preferred.strip().lower())
    if normalised is None:
        raise ParseError(f"'preferred' is {preferred!r}; expected 'A', 'B' or 'tie'")
    rationale = data.get("rationale", "")
    if not isinstance(rationale, str):
        raise ParseError("'rationale' is not a string")
    confidence = choice_probs.get(normalised) if choice_probs else None
    own_terms = {unswap(shown, order): p for shown, p in choice_probs.items()} if choice_probs else None
    return Verdict(unswap(normalised, order), rationale.strip(), confidence, own_terms)


def parse_score(text: str, scale: tuple[int, int] = SCORE_SCALE) -> Score:
    data = extract_json(text)
    score = data.get("score")
    if isinstance(score, str) and score.strip().lstrip("-").isdigit():
        score = int(score)
    if isinstance(score, float) and score.is_integer():
        score = int(score)
    if not isinstance(score, int) or isinstance(score, bool):
        raise ParseError(f"'score' is {score!r}; expected an integer")
    if not scale[0] <= score <= scale[1]:
        raise ParseError(f"'score' {score} is outside the rubric's range {scale[0]}..{scale[1]}")
    rationale = data.get("rationale", "")
    return Score(score, rationale.strip() if isinstance(rationale, str) else str(rationale))


def parse_revision(text: str, original: str) -> Revision:
    data = extract_json(text)
    revision, critique = data.get("revision"), data.get("critique", "")
    if not isinstance(revision, str) or not revision.strip():
        raise ParseError("'revision' is missing or empty")
    if " ".join(revision.split()) == " ".join(original.split()):
        raise ParseError("the revision is identical to the original")
    return Revision(critique.strip() if isinstance(critique, str) else "", revision.strip())


def unswap(verdict: str, order: str) -> str:
    """Map a verdict about the shown order back to the pair's A/B."""
    if order == "AB" or verdict == "tie":
        return verdict
    return "B" if verdict == "A" else "A"


def prob_a(verdict: Verdict) -> float | None:
    """P(A is the better response) from one order's probabilities, in the pair's own terms: A's
    share of the mass on A and B (as the paper normalises over its two options; what a judge puts
    on "tie" is set aside). None without probabilities, or with no mass on either."""
    probs = verdict.choice_probs
    if not probs:
        return None
    a, b = probs.get("A", 0.0), probs.get("B", 0.0)
    return a / (a + b) if a + b > 0 else None


def pair_prob_a(first: Verdict, second: Verdict, band: tuple[float, float] | None = None) -> float | None:
    """P(A is better) over both orders: the mean of each order's, which cancels a judge's pull
    toward one position. `band` clamps it (chain-of-thought verdicts are overconfident: the
    Constitutional AI paper clamps them to 40-60 %). None unless both orders have probabilities."""
    first_a, second_a = prob_a(first), prob_a(second)
    if first_a is None or second_a is None:
        return None
    p = (first_a + second_a) / 2
    return min(max(p, band[0]), band[1]) if band else p


def aggregate_pairwise(first: Verdict, second: Verdict, band: tuple[float, float] | None = None) -> PairLabel:
    """Combine the two orders: agreement gives a winner, opposite winners give an inconsistent
    tie (position bias is never turned into a silent winner), a tie on either side is a tie.
    A winner's confidence is its probability over both orders where the judge gave them (see
    pair_prob_a), else the mean of the probability each order gave its verdict, else 1."""
    p_a = pair_prob_a(first, second, band)
    if first.verdict == second.verdict:
        if first.verdict == "tie":
            return PairLabel("tie", _mean(first.confidence, second.confidence), False, p_a)
        if p_a is not None:
            return PairLabel(first.verdict, p_a if first.verdict == "A" else 1 - p_a, False, p_a)
        return PairLabel(first.verdict, _mean(first.confidence, second.confidence) or 1.0, False)
    if "tie" in (first.verdict, second.verdict):
        return PairLabel("tie", None, False, p_a)
    return PairLabel("tie", None, True, p_a)


def _mean(a: float | None, b: float | None) -> float | None:
    values = [v for v in (a, b) if v is not None]
    return sum(values) / len(values) if values else None
