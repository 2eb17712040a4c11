"""The two things a backend can do, as Protocols: sample policy responses, and answer judge
requests. Backends never touch the store; loop code wires them to it."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

Messages = list[dict[str, str]]
T = TypeVar("T")


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


@dataclass
class TokenUsage:
    """What a sampler's requests used, as its server reported it, over the sampler's life: what a
    budget is charged (per-sample counts miss what several samples of one request share)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens or 0
        self.completion_tokens += completion_tokens or 0


class SamplingIncomplete(Exception):
    """Some requests of a `Sampler.sample` call still failed after their retries. `samples` has
    one entry per request, in order, None where it failed: the others are kept, not lost."""

    def __init__(self, message: str, samples: list[Sample | None]) -> None:
        super().__init__(message)
        self.samples = samples


class Sampler(Protocol):
    """Generates policy responses."""

    model: str

    def sample(self, requests: Sequence[SampleRequest], params: SamplingParams) -> list[Sample]:
        """One sample per request, in order. A sampler that can fail per request (a server)
        raises SamplingIncomplete with the samples that did finish."""
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


def backoff_delay(attempt: int, retry_after: float | None, base: float = 0.5, cap: float = 30.0) -> float:
    """Seconds to wait after failed try number `attempt` (from 1): the server's Retry-After, within
    reason, else a jittered exponential backoff."""
    if retry_after is not None:
        return min(retry_after, cap * 4)  # honour the server, within reason
    delay = min(cap, base * 2 ** (attempt - 1))
    return delay * (0.5 + random.random() / 2)  # jitter: many workers must not retry in step


@dataclass(frozen=True)
class Retry:
    """How many tries a request gets, and the backoff between them (see `backoff_delay`)."""

    max_attempts: int = 4
    backoff_base: float = 0.5
    backoff_cap: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        return backoff_delay(attempt, retry_after, self.backoff_base, self.backoff_cap)


async def retry_transient(
    call: Callable[[], Awaitable[T]], max_attempts: int, delay: Callable[[int, float | None], float]
) -> T:
    """Await `call()` until it returns. A TransientError is retried after `delay(attempt,
    retry_after)` seconds, up to `max_attempts` tries in all, then raised; a PermanentError (or
    anything else) is raised at once. The one retry loop of the judge and of policy sampling."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except TransientError as exc:
            if attempt >= max_attempts:
                raise
            if (wait := delay(attempt, exc.retry_after)) > 0:
                await asyncio.sleep(wait)


class ChatBackend(Protocol):
    """Answers judge requests. Implementations raise TransientError or PermanentError."""

    model: str

    async def complete(self, request: ChatRequest) -> ChatResult: ...

    async def aclose(self) -> None: ...
