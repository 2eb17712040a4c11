"""What an OpenAI-compatible endpoint accepts, learned by asking it once. Servers differ:
vLLM takes JSON-schema structured output, llama.cpp's server only `json_object` (optionally with
a schema it enforces; `json_schema` gets HTTP 500), others neither; most return logprobs, some refuse them. The judge tries
the richest request first and steps down on a refusal, and the outcome is stored with the judge's
configuration so that a rerun starts where the last one settled."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

RESPONSE_FORMATS = ("json_schema", "json_object_schema", "json_object", "text")
"""Richest first: OpenAI's JSON-schema structured output; `json_object` carrying a `schema` key,
which llama.cpp's server (and other Anyscale-style servers) turn into a grammar; JSON enforced
with the schema stated in the prompt; plain text parsed leniently (schema in the prompt too)."""

TOP_LOGPROBS = 5
"""Alternatives asked for at each token: enough to see 'A', 'B' and 'tie' side by side."""

_REFUSAL_WORDS = ("response_format", "json_schema", "schema", "logprob")


@dataclass
class EndpointFeatures:
    """What one endpoint accepted. `response_format` is the format to ask for (the first of
    RESPONSE_FORMATS not refused), settled once a request went through with it; `logprobs` is
    None until a reply shows whether they come back."""

    response_format: str = RESPONSE_FORMATS[0]
    format_settled: bool = False
    logprobs: bool | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> EndpointFeatures:
        if not data or data.get("response_format") not in RESPONSE_FORMATS:
            return cls()
        logprobs = data.get("logprobs")
        return cls(
            data["response_format"],
            bool(data.get("format_settled")),
            logprobs if isinstance(logprobs, bool) else None,
        )

    def step_down(self, detail: str, asked_logprobs: bool) -> bool:
        """After a refusal whose body says `detail`: stop asking for what it names (logprobs, or
        the response format), else for the richest thing still asked. False when nothing is
        left to give up: the refusal is about the request itself."""
        names_logprobs = "logprob" in detail.lower()
        if asked_logprobs and (names_logprobs or self.response_format == RESPONSE_FORMATS[-1]):
            self.logprobs = False
            return True
        if self.response_format != RESPONSE_FORMATS[-1]:
            self.response_format = RESPONSE_FORMATS[RESPONSE_FORMATS.index(self.response_format) + 1]
            self.format_settled = False
            return True
        return False


def is_refusal(status: int, detail: str) -> bool:
    """A refusal of a request feature rather than a fault: any 4xx (429 and 408 aside, which are
    load), and a 5xx whose body names the feature (llama.cpp's server answers a JSON schema with
    a validation error under HTTP 500)."""
    if 400 <= status < 500:
        return status not in (408, 409, 429)
    return status >= 500 and names_feature(detail)


def names_feature(detail: str) -> bool:
    """An error message about a negotiated feature (the response format, the schema, logprobs)."""
    return any(word in detail.lower() for word in _REFUSAL_WORDS)


def schema_instruction(schema: dict[str, Any]) -> str:
    """The schema in words, for requests that cannot carry it as `response_format`: its keys
    and what each holds. Short on purpose: small judges copy a dumped JSON Schema back."""
    body = schema.get("schema", schema)
    fields = []
    for key, spec in body.get("properties", {}).items():
        if "enum" in spec:
            kind = "one of " + ", ".join(json.dumps(value) for value in spec["enum"])
        else:
            kind = "an integer" if spec.get("type") == "integer" else f"a {spec.get('type', 'value')}"
        fields.append(f'"{key}" ({kind})')
    return "\n\nReply with one JSON object whose keys are " + ", ".join(fields) + "."


def choice_probs_from_logprobs(
    text: str, tokens: Iterable[tuple[str, list[tuple[str, float]]]], field: str, choices: tuple[str, ...]
) -> dict[str, float] | None:
    """The normalised probabilities of `choices` as the value of JSON field `field` in `text`,
    read from the top alternatives at the token where that value starts. `tokens` are the reply's
    tokens in order, each with its (alternative token, logprob) list. None when the value is not
    found, or no alternative names a choice."""
    match = re.search(rf'"{re.escape(field)}"\s*:\s*"', text)
    if match is None:
        return None
    value_at = match.end()
    offset = 0
    for token, alternatives in tokens:
        end = offset + len(token)
        if offset <= value_at < end or (value_at == end and not alternatives):
            prefix = token[: value_at - offset]
            return _normalise(prefix, alternatives, choices)
        offset = end
    return None


def _normalise(
    prefix: str, alternatives: list[tuple[str, float]], choices: tuple[str, ...]
) -> dict[str, float] | None:
    """Sum the probability of each alternative whose text after `prefix` starts a choice (the
    first character decides: 'A', 'B', 't' for tie), then normalise over the choices."""
    by_initial = {choice[0].lower(): choice for choice in choices}
    if len(by_initial) != len(choices):
        return None  # choices that share an initial cannot be told apart from one token
    mass: dict[str, float] = dict.fromkeys(choices, 0.0)
    for alternative, logprob in alternatives:
        if not alternative.startswith(prefix):
            continue
        rest = alternative[len(prefix) :].lstrip()
        choice = by_initial.get(rest[:1].lower()) if rest else None
        if choice is not None and _consistent(rest, choice):
            mass[choice] += math.exp(logprob)
    total = sum(mass.values())
    if total <= 0:
        return None
    return {choice: value / total for choice, value in mass.items()}


def _consistent(rest: str, choice: str) -> bool:
    """`rest` (up to the closing quote) is `choice` or its start: 'A', 'ti' for 'tie'; not 'Both'."""
    word = rest.split('"')[0].strip().lower()
    return bool(word) and choice.lower().startswith(word)
