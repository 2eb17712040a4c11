"""The two things a backend can do, as Protocols: sample policy responses, and answer judge
requests. Backends never touch the store; loop code wires them to it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 192

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}


@dataclass(frozen=True)
class SampleRequest:
    messages: Messages
    seed: int
    """Seed for this request; the same seed and prompt give the same sample on the same backend."""


@dataclass(frozen=True)
class Sample:
    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    """'stop' (end of turn) or 'length' (hit max_new_tokens)."""
    seed: int | None = None
    """The seed actually used, when the backend could not use the request's own (several
    samples drawn in one server request share that request's seed)."""


class Sampler(Protocol):
    """Generates policy responses."""

    model: str

    def sample(self, requests: Sequence[SampleRequest], params: SamplingParams) -> list[Sample]:
        """One sample per request, in order."""
        ...


@dataclass(frozen=True)
class ChatRequest:
    messages: Messages
    max_tokens: int = 384
    temperature: float = 0.0
    json_schema: dict[str, Any] | None = None
    """Requested as structured output where the server supports it."""
    choice_field: str | None = None
    """For in-process judges: the JSON field whose value is a choice (e.g. 'preferred')..."""
    choices: tuple[str, ...] = ()
    """...and its allowed values; the backend reports their next-token probabilities."""


@dataclass(frozen=True)
class ChatResult:
    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    choice_probs: dict[str, float] | None = field(default=None)
    """Normalised probabilities of `ChatRequest.choices`, when the backend can read them."""


class TransientError(Exception):
    """Worth retrying: 429, 5xx, timeouts, dropped connections. `retry_after` in seconds if known."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(Exception):
    """Retrying will not help (400, 401, 404...): the item is recorded as failed at once."""


class ChatBackend(Protocol):
    """Answers judge requests. Implementations raise TransientError or PermanentError."""

    model: str

    async def complete(self, request: ChatRequest) -> ChatResult: ...

    async def aclose(self) -> None: ...
