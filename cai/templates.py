"""Judge, critique and revision prompts: jinja2 templates rendered in a sandbox with
StrictUndefined. Templates are user-editable, so rendering must never execute arbitrary Python
and a misspelt variable must fail loudly, naming the template file and line."""

from __future__ import annotations

import hashlib
import traceback
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cai.constitution import Constitution, Principle
from cai.errors import BadInput
from cai.resources import data_dir

REQUIRED = ("judge_pairwise", "judge_score", "critique", "revision", "chain_critique", "chain_revision")
CHAIN_TEMPLATES = ("chain_critique", "chain_revision")
"""The follow-up turns of a critique-revision chain (cai.chains)."""


@dataclass(frozen=True)
class Rendered:
    text: str
    template: str
    template_sha256: str
    """Hash of the template and every file it imports: part of a judge's identity."""

    @property
    def request_sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


class TemplateSet:
    """The templates in one directory (the shipped `prompts/` unless told otherwise)."""

    def __init__(self, directory: Path | str | None = None) -> None:
        self.directory = Path(directory) if directory else data_dir("prompts")
        if not self.directory.is_dir():
            raise BadInput(f"templates directory {self.directory} does not exist")
        self.env = ImmutableSandboxedEnvironment(
            loader=FileSystemLoader(self.directory),
            undefined=StrictUndefined,
            autoescape=False,  # plain-text prompts, not HTML; fencing handles untrusted text
            keep_trailing_newline=False,
        )

    @cached_property
    def sha256(self) -> dict[str, str]:
        """Per template: hash over its own source and the shared files, in a stable order."""
        shared = sorted(p for p in self.directory.glob("_*.jinja"))
        hashes = {}
        for path in sorted(self.directory.glob("*.jinja")):
            digest = hashlib.sha256()
            for part in [path, *shared]:
                digest.update(part.name.encode() + b"\0" + part.read_bytes() + b"\0")
            hashes[path.stem] = digest.hexdigest()
        return hashes

    def render(self, name: str, **context: Any) -> Rendered:
        filename = f"{name}.jinja"
        path = self.directory / filename
        if not path.is_file():
            raise BadInput(f"{path}: template not found (templates needed: {', '.join(REQUIRED)})")
        try:
            text = self.env.get_template(filename).render(**context)
        except TemplateSyntaxError as exc:
            raise BadInput(
                f"{exc.filename or path}:{exc.lineno}: template syntax error: {exc.message}"
            ) from None
        except UndefinedError as exc:
            raise BadInput(f"{_where(exc, path)}: undefined variable: {exc.message}") from None
        except SecurityError as exc:
            raise BadInput(f"{_where(exc, path)}: unsafe template refused by the sandbox: {exc}") from None
        except TemplateError as exc:
            raise BadInput(f"{_where(exc, path)}: template error: {exc}") from None
        return Rendered(text.strip() + "\n", name, self.sha256[name])

    def check(self) -> list[str]:
        """Render every required template with sample values; returns the problems found."""
        problems = []
        for name in REQUIRED:
            try:
                self.render(name, **sample_context(name))
            except BadInput as exc:
                problems.append(str(exc))
        return problems


def _where(exc: Exception, fallback: Path) -> str:
    # jinja rewrites tracebacks so template frames carry the template's file name and line.
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.endswith(".jinja")]
    if frames:
        return f"{frames[-1].filename}:{frames[-1].lineno}"
    return str(fallback)


def boundary_for(*texts: str) -> str:
    """A fence token derived from the fenced texts: a response cannot contain its own closing
    fence without changing the token (that would need a SHA-256 fixed point)."""
    digest = hashlib.sha256("\x1f".join(texts).encode())
    return digest.hexdigest()[:16]


def _conversation(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _constitution_view(constitution: Constitution) -> dict[str, Any]:
    return {
        "name": constitution.name,
        "version": constitution.version,
        "description": constitution.description,
    }


def _principle_view(principle: Principle) -> dict[str, Any]:
    return {
        "id": principle.id,
        "critique": principle.critique,
        "revision": principle.revision,
        "examples": [example.model_dump() for example in principle.examples],
    }


def pairwise_context(
    constitution: Constitution,
    principle: Principle,
    conversation: list[dict[str, str]],
    response_a: str,
    response_b: str,
    reasoning: str = "brief",
) -> dict[str, Any]:
    """`reasoning`: 'brief' (a short rationale, then the verdict) or 'cot' (step by step first)."""
    # The principle's worked examples are fenced like the pair: a constitution is data a user
    # wrote, and its example responses must not be able to close a fence either.
    example_texts = [t for e in principle.examples for t in (e.prompt, e.response_a, e.response_b, e.why)]
    texts = [m["content"] for m in conversation] + [response_a, response_b, *example_texts]
    return {
        "constitution": _constitution_view(constitution),
        "principle": _principle_view(principle),
        "conversation": _conversation(conversation),
        "response_a": response_a,
        "response_b": response_b,
        "boundary": boundary_for(*texts),
        "reasoning": reasoning,
    }


def single_context(
    constitution: Constitution,
    principle: Principle,
    conversation: list[dict[str, str]],
    response: str,
    **extra: Any,
) -> dict[str, Any]:
    """Context for judge_score, critique and revision (extra: scale_min/scale_max, critique)."""
    texts = [m["content"] for m in conversation] + [response, *[str(v) for v in extra.values()]]
    return {
        "constitution": _constitution_view(constitution),
        "principle": _principle_view(principle),
        "conversation": _conversation(conversation),
        "response": response,
        "boundary": boundary_for(*texts),
        **extra,
    }


def chain_context(constitution: Constitution, principle: Principle) -> dict[str, Any]:
    """Context for chain_critique and chain_revision: turns in the conversation under review,
    so nothing is fenced (they carry only the constitution's own text)."""
    return {"constitution": _constitution_view(constitution), "principle": _principle_view(principle)}


def sample_context(name: str) -> dict[str, Any]:
    """Representative values for `templates check` and the golden tests."""
    constitution = Constitution(
        name="example",
        version=1,
        description="An example constitution.",
        principles=[
            Principle(
                id="honesty",
                critique="Point out anything in the response that is false or misleading.",
                revision="Rewrite the response so that every claim in it is true.",
            )
        ],
    )
    principle = constitution.principles[0]
    conversation = [{"role": "user", "content": "How far away is the Moon?"}]
    if name in CHAIN_TEMPLATES:
        return chain_context(constitution, principle)
    if name == "judge_pairwise":
        return pairwise_context(
            constitution,
            principle,
            conversation,
            "About 384,000 km on average.",
            "It is about 38,000 km away.",
        )
    extra: dict[str, Any] = {"scale_min": 1, "scale_max": 10} if name == "judge_score" else {}
    return single_context(constitution, principle, conversation, "It is about 38,000 km away.", **extra)
