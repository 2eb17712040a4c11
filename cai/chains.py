"""Critique-revision chains, the supervised stage of Constitutional AI (Bai et al. 2022, SL-CAI):
the pure part. Each step draws a principle by weight, asks the model to critique its current
answer under it, then to revise; the conversation grows turn by turn as in the paper, so the
model that answered can critique and revise itself. Rendering and parsing only; no I/O."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from cai.constitution import Constitution, Principle
from cai.labelling import same_answer, sampled_principle
from cai.templates import CHAIN_TEMPLATES, TemplateSet, chain_context

Messages = list[dict[str, str]]


def step_principle(constitution: Constitution, seed: int, prompt_id: int, step: int) -> Principle:
    """The principle step `step` of a prompt's chain revises under: drawn by weight among the
    LLM-judged principles, independently for every step (a chain may meet one principle twice),
    and the same on every rerun."""
    key = sampled_principle(constitution, seed, f"chain:{prompt_id}:{step}")
    return next(p for p in constitution.principles if p.id == key)


def step_seed(round_seed: int, prompt_id: int, step: int) -> int:
    """The sampling seed of one chain step (its critique uses it, its revision the next one)."""
    digest = hashlib.sha256(f"{round_seed}:chain:{prompt_id}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFE


@dataclass(frozen=True)
class ChainTurns:
    """The two follow-up turns of one step, rendered."""

    critique_request: str
    revision_request: str
    template_sha256: str
    """Over both templates (each already hashes the shared files it imports)."""


def chain_turns(templates: TemplateSet, constitution: Constitution, principle: Principle) -> ChainTurns:
    context = chain_context(constitution, principle)
    critique, revision = (templates.render(name, **context) for name in CHAIN_TEMPLATES)
    digest = hashlib.sha256(f"{critique.template_sha256}:{revision.template_sha256}".encode()).hexdigest()
    return ChainTurns(critique.text.strip(), revision.text.strip(), digest)


def critique_messages(conversation: Messages, answer: str, turns: ChainTurns) -> Messages:
    """The conversation, the answer under review as the assistant's turn, then the critique request."""
    return [
        *conversation,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": turns.critique_request},
    ]


def revision_messages(conversation: Messages, answer: str, critique: str, turns: ChainTurns) -> Messages:
    """The critique exchange, the model's critique, then the revision request."""
    return [
        *critique_messages(conversation, answer, turns),
        {"role": "assistant", "content": critique},
        {"role": "user", "content": turns.revision_request},
    ]


class UnusableRevision(ValueError):
    """A revision that cannot continue the chain: empty, or the answer unchanged."""


ANNOUNCEMENT = re.compile(
    r"^(?:here(?:'s| is)|sure[,!.]?\s*here(?:'s| is)|revised (?:response|answer))[^\n]{0,80}:[ \t]*\n+",
    re.IGNORECASE,
)
"""A first line that only announces the revision ("Here's the revised response:"): small models
write one despite the request, and it is not part of the answer a user would get."""


def check_revision(revision: str, answer: str) -> str:
    """The revision, stripped (of an announcing first line, too); UnusableRevision when it is
    empty or says the same as `answer` (whitespace aside, as pairing compares answers)."""
    text = ANNOUNCEMENT.sub("", revision.strip(), count=1).strip()
    if not text:
        raise UnusableRevision("the revision is empty")
    if same_answer(text) == same_answer(answer):
        raise UnusableRevision("the revision repeats the answer unchanged")
    return text


def revision_effect(constitution: Constitution, firsts: list[str], finals: list[str]) -> dict[str, Any]:
    """What the chains changed: mean length and rule pass rates of the first answers against the
    final revisions (the same measures `cai eval` reports for two policies)."""
    from cai.evaluate import policy_metrics

    return {
        "before": policy_metrics(constitution, firsts, []),
        "after": policy_metrics(constitution, finals, []),
    }
